"""The model registry: every ready version of every model loaded, warmed up and served through its batcher.

Every replica follows the database: :meth:`ModelRegistry.sync` reads the catalog, loads each ready
version it does not hold yet (download ``model.onnx`` into a local cache, verify its sha256, build
the session with :func:`optimizer.runtime.create_session`, run one warm-up inference on zeros) and
only then makes it visible. Versions and models gone from the catalog are unloaded: their batcher
drains, then the session is dropped (and on CUDA a ``gc.collect()`` releases GPU memory at once).

Defaults and hot swap: a model's default is ``models.default_version``, or its highest ready version
when that is null. The default pointer is swapped by one assignment once the new version is loaded;
a request that already holds the old :class:`LoadedVersion` finishes on it, and the old version stays
loaded (servable by explicit version) until it is deleted. A version that fails to load is recorded
("failed to load: reason") and never replaces a working default: the model keeps its current
version, or the highest loaded one below the wanted default. Failures that retrying cannot fix
(a corrupt or invalid file) are not retried for the same file; others (storage down, out of
memory) are retried with a growing delay.

Readiness: true once the catalog was read and every model's wanted default is loaded or has
failed for good. A model whose new version is broken does not take the replica out of service
(its previous version keeps serving); one still loading does.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import anyio
import numpy as np

from optimizer.runtime import RuntimeOptions
from service.errors import Conflict, NotFound, ServiceError, Unavailable
from service.serving.batcher import Batcher, BatchingConfig, BatchObserver
from service.serving.loading import MODEL_FILE, LoadedVersion, LoadError, open_version, rows_are_coupled
from service.storage.artifacts import ArtifactStore
from service.storage.catalog import Catalog, FileRef, ModelRecord

_log = logging.getLogger(__name__)

#: Delays between retries of a load that failed for a passing reason.
_RETRY_FIRST_S = 2.0
_RETRY_MAX_S = 60.0

_Key = tuple[str, int]  # (model name, version number)
_Identity = tuple[int, str, str]  # (model id, storage key, sha256): a deleted and re-created model differs


@dataclass(frozen=True)
class VersionStatus:
    """One version as this replica sees it: ``ready`` (loaded), ``loading``, ``pending`` or ``failed``
    (in the catalog), or ``failed to load: <reason>``."""

    number: int
    state: str


@dataclass(frozen=True)
class ModelStatus:
    """One model: the version serving by default here, the one the catalog wants, and every version's state."""

    name: str
    default_version: int | None
    wanted_version: int | None
    versions: tuple[VersionStatus, ...]


class RegistryListener(Protocol):
    """Told when a version becomes servable and when it is gone (metrics series, prediction windows)."""

    def loaded(self, v: LoadedVersion) -> None:
        """``v`` is loaded and visible."""

    def unloaded(self, model: str, version: int) -> None:
        """That version was unloaded."""


@dataclass
class _Failure:
    identity: _Identity | None
    reason: str
    permanent: bool
    attempts: int = 1
    retry_at: float = math.inf


class ModelRegistry:
    """Every ready model version, loaded and served; follows the catalog (see the module docstring)."""

    def __init__(
        self,
        *,
        catalog: Catalog,
        artifacts: ArtifactStore,
        cache_dir: Path,
        runtime: RuntimeOptions,
        batching: BatchingConfig,
        listener: RegistryListener | None = None,
        observers: Callable[[str, int], BatchObserver | None] | None = None,
        executor: Executor | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._catalog = catalog
        self._artifacts = artifacts
        self._cache_dir = Path(cache_dir)
        self._runtime = runtime
        self._batching = batching
        self._listener = listener
        self._observers = observers
        self._executor = executor
        self._clock = clock
        self._lock = asyncio.Lock()
        self._view: dict[str, ModelRecord] = {}
        self._loaded: dict[_Key, LoadedVersion] = {}
        self._identity: dict[_Key, _Identity] = {}
        self._defaults: dict[str, LoadedVersion] = {}
        self._failures: dict[_Key, _Failure] = {}
        self._synced = False
        self._closed = False

    # -- following the catalog --

    async def sync(self) -> None:
        """Load every ready version not loaded, unload what is gone, and point each model at its default."""
        async with self._lock:
            if self._closed:
                return
            records = await anyio.to_thread.run_sync(self._catalog.list_models)
            view = {record.name: record for record in records}
            wanted = {
                (record.name, v.number): _identity(record, v.files.get(MODEL_FILE))
                for record in records
                for v in record.versions
                if v.state == "ready"
            }
            self._view = view
            self._synced = True  # from now on readiness depends on what is loaded
            gone = [self._hide(k) for k in list(self._loaded) if wanted.get(k) != self._identity[k]]
            self._failures = {k: f for k, f in self._failures.items() if k in wanted and f.identity == wanted[k]}
            for name in [n for n in self._defaults if n not in view]:
                del self._defaults[name]
            for name in view:
                self._point(name)
            await asyncio.gather(*(self._release(v) for v in gone))  # requests already holding them finish
            now = self._clock()
            todo = [k for k in wanted if k not in self._loaded and self._failures.get(k, _NO_FAILURE).retry_at <= now]
            todo.sort(key=lambda k: (k[1] != self._wanted(view[k[0]]), k[0], -k[1]))  # defaults first
            for key in todo:
                if self._closed:
                    return
                await self._load(view[key[0]], key[1])
                self._point(key[0])

    async def run_forever(self, stop: asyncio.Event, interval_s: float) -> None:
        """Sync every ``interval_s`` until ``stop`` is set; a failed sync is logged and the next one retried."""
        while not stop.is_set():
            try:
                await self.sync()
            except ServiceError as exc:
                _log.warning("model registry sync failed: %s", exc.message)
            except Exception:
                _log.exception("model registry sync failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)

    # -- serving --

    def get(self, model: str, version: int | None = None) -> LoadedVersion:
        """The loaded version (the default when ``version`` is None).

        NotFound for an unknown model or version; Unavailable when it is known but not loaded
        (still loading, failed to load, not ready in the catalog, or the registry is starting or closed).
        """
        if self._closed:
            raise Unavailable("the server is shutting down")
        if not self._synced:
            raise Unavailable("the model registry is starting")
        record = self._view.get(model)
        if record is None:
            raise NotFound(f"model {model!r} not found")
        if version is None:
            served = self._defaults.get(model)
            if served is None:
                raise Unavailable(f"model {model!r} has no version loaded{self._why(model, self._wanted(record))}")
            return served
        loaded = self._loaded.get((model, version))
        if loaded is not None:
            return loaded
        if any(v.number == version for v in record.versions):
            raise Unavailable(f"version {version} of model {model!r} is not loaded{self._why(model, version)}")
        raise NotFound(f"version {version} of model {model!r} not found")

    def versions(self, model: str) -> list[int]:
        """The loaded version numbers of ``model``, ascending (empty when none)."""
        return sorted(number for name, number in self._loaded if name == model)

    def models(self) -> list[ModelStatus]:
        """Every model in the catalog (as last synced) with its versions' states here, by name."""
        statuses = []
        for name in sorted(self._view):
            record = self._view[name]
            served = self._defaults.get(name)
            states = tuple(VersionStatus(v.number, self._state(name, v.number, v.state)) for v in record.versions)
            statuses.append(ModelStatus(name, served.version if served else None, self._wanted(record), states))
        return statuses

    def ready(self) -> bool:
        """Catalog read, not closed, and every model's wanted default loaded (or failed for good)."""
        if self._closed or not self._synced:
            return False
        for name, record in self._view.items():
            wanted = self._wanted(record)
            if wanted is None or (name, wanted) in self._loaded:
                continue
            failure = self._failures.get((name, wanted))
            if failure is None or not failure.permanent:
                return False
        return True

    async def deploy(self, model: str, version: int) -> None:
        """Make ``version`` the default: load it (if needed), record it in the catalog, then swap at once.

        NotFound unless the version exists and is ready. When it cannot be loaded nothing changes
        (the catalog keeps its default and the old version keeps serving): Conflict when the file
        is unusable, Unavailable when the cause may pass.
        """
        async with self._lock:
            if self._closed:
                raise Unavailable("the server is shutting down")
            record = await anyio.to_thread.run_sync(self._catalog.get_model, model)
            if record.version(version).state != "ready":
                raise NotFound("version not found or not ready")
            key = (model, version)
            identity = _identity(record, record.version(version).files.get(MODEL_FILE))
            if key in self._loaded and self._identity[key] != identity:
                await self._release(self._hide(key))
            if key not in self._loaded:  # an explicit deploy tries again, even a file that failed before
                await self._load(record, version)
                failure = self._failures.get(key)
                if failure is not None:
                    error = Conflict if failure.permanent else Unavailable
                    raise error(f"version {version} of model {model!r} failed to load: {failure.reason}")
            self._view[model] = await anyio.to_thread.run_sync(self._catalog.set_default_version, model, version)
            self._point(model)

    async def close(self) -> None:
        """Stop every batcher (queued requests drain) and drop every session; the registry serves nothing after."""
        self._closed = True  # a sync in progress stops before its next load
        async with self._lock:
            self._defaults.clear()
            self._view.clear()
            gone = [self._hide(key) for key in list(self._loaded)]
            await asyncio.gather(*(self._release(v) for v in gone))

    # -- internals --

    def _wanted(self, record: ModelRecord) -> int | None:
        """The version the catalog wants served by default: its default, else the highest ready version."""
        if record.default_version is not None:
            return record.default_version
        ready = [v.number for v in record.versions if v.state == "ready"]
        return max(ready) if ready else None

    def _point(self, model: str) -> None:
        """Swap ``model``'s default pointer (one assignment) to the wanted version once it is loaded.

        Until then the current default keeps serving; without one, the highest loaded version
        below the wanted one (else the highest loaded) stands in.
        """
        record = self._view.get(model)
        wanted = self._wanted(record) if record is not None else None
        target = self._loaded.get((model, wanted)) if wanted is not None else None
        if target is None:
            current = self._defaults.get(model)
            if current is not None and self._loaded.get((model, current.version)) is current:
                return
            numbers = self.versions(model)
            below = [n for n in numbers if wanted is None or n < wanted]
            if below or numbers:
                target = self._loaded[(model, max(below or numbers))]
        if target is None:
            self._defaults.pop(model, None)
        elif self._defaults.get(model) is not target:
            self._defaults[model] = target
            _log.info("model %s: version %d serves by default", model, target.version)

    def _state(self, model: str, number: int, catalog_state: str) -> str:
        if catalog_state != "ready":
            return catalog_state
        if (model, number) in self._loaded:
            return "ready"
        failure = self._failures.get((model, number))
        return f"failed to load: {failure.reason}" if failure is not None else "loading"

    def _why(self, model: str, version: int | None) -> str:
        failure = self._failures.get((model, version)) if version is not None else None
        return f" (failed to load: {failure.reason})" if failure is not None else ""

    async def _load(self, record: ModelRecord, number: int) -> None:
        """Load one version and make it visible, or record why it failed."""
        key = (record.name, number)
        ref = record.version(number).files.get(MODEL_FILE)
        identity = _identity(record, ref)
        try:
            if ref is None:
                raise LoadError(f"the version has no {MODEL_FILE}", permanent=True)
            path, session, inputs, outputs = await anyio.to_thread.run_sync(
                partial(open_version, ref, cache_dir=self._cache_dir, artifacts=self._artifacts, runtime=self._runtime)
            )
        except LoadError as exc:
            self._fail(key, identity, exc.reason, exc.permanent)
            return
        batching = self._batching
        coupled = await anyio.to_thread.run_sync(rows_are_coupled, path)
        if coupled or not all(spec.batch_dynamic for spec in inputs):  # fixed batch axis or rows mixed: one by one
            batching = replace(batching, max_batch_size=1, preferred_batch_size=())
        loaded: LoadedVersion

        def run(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return loaded.run(feed)

        observer = self._observers(record.name, number) if self._observers is not None else None
        batcher = Batcher(run, batching, executor=self._executor, observer=observer)
        summary = record.version(number).summary
        loaded = LoadedVersion(record.name, number, session, inputs, outputs, batcher, summary, path)
        assert identity is not None  # ref is not None here
        self._loaded[key] = loaded
        self._identity[key] = identity
        self._failures.pop(key, None)
        _log.info("model %s: version %d loaded", record.name, number)
        self._tell("loaded", loaded)

    def _fail(self, key: _Key, identity: _Identity | None, reason: str, permanent: bool) -> None:
        previous = self._failures.get(key)
        attempts = previous.attempts + 1 if previous is not None and previous.identity == identity else 1
        delay = math.inf if permanent else min(_RETRY_MAX_S, _RETRY_FIRST_S * 2 ** (attempts - 1))
        self._failures[key] = _Failure(identity, reason, permanent, attempts, self._clock() + delay)
        _log.warning("model %s: version %d failed to load: %s", key[0], key[1], reason)

    def _hide(self, key: _Key) -> LoadedVersion:
        """Take the version out of service at once (new requests no longer find it); the caller releases it."""
        loaded = self._loaded.pop(key)
        self._identity.pop(key, None)
        if self._defaults.get(key[0]) is loaded:
            del self._defaults[key[0]]
            self._point(key[0])
        return loaded

    async def _release(self, loaded: LoadedVersion) -> None:
        """Drain a hidden version's batcher, then drop its session and cached file."""
        await loaded.batcher.close(drain=True)
        key = (loaded.model, loaded.version)
        on_gpu = any(p != "CPUExecutionProvider" for p in loaded.session.get_providers())
        loaded.path.unlink(missing_ok=True)
        del loaded
        if on_gpu:
            gc.collect()  # the session sits in a reference cycle (batcher -> run -> version); free GPU memory now
        _log.info("model %s: version %d unloaded", *key)
        self._tell("unloaded", *key)

    def _tell(self, event: str, *args: Any) -> None:
        if self._listener is None:
            return
        try:
            getattr(self._listener, event)(*args)
        except Exception:  # a listener bug must not stop loading or serving
            _log.exception("registry listener failed on %s", event)


_NO_FAILURE = _Failure(None, "", permanent=False, retry_at=-math.inf)


def _identity(record: ModelRecord, ref: FileRef | None) -> _Identity | None:
    return (record.id, ref.key, ref.sha256) if ref is not None else None
