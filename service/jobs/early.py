"""Version 1 served before its job ends: the validated original, published as soon as it is measured.

The sandbox child writes the validated original (converted to ONNX) into the attempt's ``early``
folder once it has run on the whole validation split, then sends the event ``{"original":
"original.onnx", "metric": ..., "accuracy": ...}``. :class:`EarlyOriginal` (the worker's handler
for that event, on the sandbox's watch thread) uploads the file under
``models/<prefix>/jobs/<job>/early-<attempt>/`` and marks version 1 ready in one guarded write;
the registry then loads it while the candidates are still being built.

The key is outside the attempt's output prefix, so an attempt discarded later (lease lost, disk
full on the final upload) never deletes a file version 1 points at. A later attempt of the same
job finds version 1 ready and reuses it. Any failure here is logged and left to the final commit,
which publishes version 1 anyway: serving early is a bonus, never a reason to fail the job.
"""

from __future__ import annotations

import logging
import math
import stat
from pathlib import Path
from typing import Any

from service.errors import NotFound
from service.jobs.records import Claim
from service.jobs.store import JobStore
from service.jobs.task import EARLY_ORIGINAL
from service.storage.artifacts import ArtifactStore
from service.storage.catalog import Catalog, FileRef

_log = logging.getLogger(__name__)

_MAX_METRIC = 32


class EarlyOriginal:
    """Handles the child's ``original`` event once per attempt; ``ref`` is version 1's file after it."""

    def __init__(self, *, jobs: JobStore, catalog: Catalog, artifacts: ArtifactStore, claim: Claim, folder: Path):
        self._jobs = jobs
        self._catalog = catalog
        self._artifacts = artifacts
        self._claim = claim
        self.folder = folder
        self.ref: FileRef | None = None
        self._seen = False

    def __call__(self, event: dict[str, Any]) -> bool:
        """Publish version 1 from ``event``; True when it is ready now (False: left to the final commit)."""
        if self._seen or event.get("original") != EARLY_ORIGINAL:
            return self.ref is not None
        self._seen = True
        job = self._claim.job
        try:
            self.ref = self._publish(event)
        except Exception as exc:  # storage or database trouble: the final commit publishes version 1
            _log.warning("job %s: version 1 not served early (%s)", job.id, type(exc).__name__)
            return False
        if self.ref is not None:
            _log.info("job %s: version 1 of %s is ready (validated original)", job.id, job.model_name)
        return self.ref is not None

    def _publish(self, event: dict[str, Any]) -> FileRef | None:
        job = self._claim.job
        try:
            current = self._catalog.get_version(job.model_name, 1)
        except NotFound:
            return None  # the model was deleted meanwhile
        if current.state == "ready" and "model.onnx" in current.files:
            return current.files["model.onnx"]  # an earlier attempt published it
        path = self.folder / EARLY_ORIGINAL
        info = path.lstat()  # the child wrote it: a regular file, never a link it could aim anywhere
        if not stat.S_ISREG(info.st_mode):
            return None
        prefix = f"models/{job.storage_prefix}/jobs/{job.id}/early-{job.attempts}"
        stored = self._artifacts.put_file(f"{prefix}/model.onnx", path)
        ref = FileRef(key=stored.key, size=stored.size, sha256=stored.sha256)
        try:
            landed = self._jobs.publish_original(self._claim, {"model.onnx": ref}, _figures(event))
        except BaseException:
            self._artifacts.delete_prefix(prefix)
            raise
        if not landed:  # the lease is gone: another attempt owns the job
            self._artifacts.delete_prefix(prefix)
            return None
        return ref


def _figures(event: dict[str, Any]) -> dict[str, Any]:
    """The event's metric and accuracy, checked like any input from the child."""
    metric = event.get("metric")
    accuracy = event.get("accuracy")
    return {
        "metric": metric[:_MAX_METRIC] if isinstance(metric, str) else None,
        "accuracy": float(accuracy)
        if isinstance(accuracy, int | float) and not isinstance(accuracy, bool) and math.isfinite(accuracy)
        else None,
    }
