"""The four invariants of ../shared/RELIABILITY.md, checked on what a faulted service left behind.

Used after every fault test (``assert_invariants``). It only reads: the database (the SQLite file
opened read-only through a ``mode=ro`` URI, or a PostgreSQL URL inside a READ ONLY transaction) and
the artifact folder ``<SLIMSERVE_HOME>/artifacts``; then it talks HTTP to a server like a client.

1. Every upload the API acknowledged (202 + a job id, recorded by the test in a :class:`Ledger`)
   has its model row, version 1 with ``original.*`` and ``data.npz`` whose sha256 is that of the
   bytes the test sent, and a job row.
2. Every job is final once the service settled (with a live worker: within a bounded wait), with
   ``attempts <= max_attempts``; a lease only on a running job, one live lease per worker; each
   succeeded job added exactly one optimized version (a retried attempt never adds a second).
3. No half-written artifact is visible: every file a row points at exists, is a regular file and
   has the row's size and sha256; every file under the artifact folder has a row, except the names
   the service documents as temporary, which must be gone once nothing is in flight (after a
   clean restart). Temporary means a path component starting with ``.``: ``check_key`` in
   service/storage/artifacts.py refuses such keys, ``LocalStore`` stages uploads as
   ``.staging/.upload-*`` (service/uploads.py) and writes ``.<name>.<random>.tmp`` before the
   rename (``_copy_atomic``).
4. The server is live (``/v2/health/live`` 200) and a fresh valid upload's job succeeds.

A violation is one line naming the invariant; :func:`violations` returns them all (it is what the
checker's own tests exercise against a hand-broken home), :func:`assert_invariants` fails with them.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.e2e.conftest import MlpFiles, job_config, settings_env, upload
from tests.serverproc import Proc, start_server, start_worker, wait_job

#: Settings of the processes the checker starts: short leases (a dead worker's job is reclaimed within
#: seconds), fast polling, no drain wait on stop.
CHECK_SETTINGS = {
    "lease_seconds": "3",
    "heartbeat_seconds": "0.5",
    "poll_seconds": "0.2",
    "registry_poll_seconds": "0.5",
    "drain_seconds": "0",
}
#: Final job statuses (service/jobs/records.py FINISHED).
FINAL = frozenset({"succeeded", "failed", "cancelled"})
STATUSES = frozenset({"queued", "running", *FINAL})
#: The longest wait for jobs to end with a live worker, and for the fresh job of invariant 4.
SETTLE_SECONDS = 180.0

_fresh = itertools.count(1)


def sha256_of(content: Path | bytes) -> str:
    """The hex sha256 of a file or of bytes."""
    data = content.read_bytes() if isinstance(content, Path) else content
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Upload:
    """One acknowledged upload: the model name, its job, and the sha256 of the model and data sent."""

    name: str
    job_id: str
    model_sha256: str | None = None
    data_sha256: str | None = None


@dataclass
class Ledger:
    """The uploads the API acknowledged during a test (what invariant 1 holds the service to)."""

    uploads: list[Upload] = field(default_factory=list)

    def add(self, name: str, job_id: str, model: Path | bytes | None = None, data: Path | bytes | None = None) -> str:
        """Record an acknowledged upload of ``model`` and ``data`` (their bytes are hashed now); the job id."""
        self.uploads.append(
            Upload(
                name,
                job_id,
                sha256_of(model) if model is not None else None,
                sha256_of(data) if data is not None else None,
            )
        )
        return job_id

    def acknowledged(self, response: httpx.Response, name: str, model: Path | bytes, data: Path | bytes) -> str:
        """``response`` (to an upload of ``model`` and ``data`` as ``name``) is 202 with a job: recorded; its id."""
        assert response.status_code == 202, f"upload of {name!r} not acknowledged: {response.text[:500]}"
        return self.add(name, str(response.json()["job"]["id"]), model, data)

    def copy(self) -> Ledger:
        """An independent ledger with the same entries (for a test working on a copy of a home)."""
        return Ledger(list(self.uploads))


@dataclass(frozen=True)
class Exemptions:
    """What a test changed on purpose, each with the test's reason, so the checker does not report it.

    ``tampered``: artifact keys whose bytes the test corrupted (the fault it injects); their size
    and sha256 are not compared. ``unreferenced``: key prefixes that may hold files without a row or
    temporary files (only for a known service bug, with a strict-xfail test that checks the same
    thing without the exemption).
    """

    tampered: frozenset[str] = frozenset()
    unreferenced: tuple[str, ...] = ()


@dataclass(frozen=True)
class State:
    """The rows the service left: models, versions (``files`` decoded) and jobs, as dicts."""

    models: list[dict[str, Any]]
    versions: list[dict[str, Any]]
    jobs: list[dict[str, Any]]


# --------------------------------------------------------------------------- reading


def read_state(home: Path, database_url: str | None = None) -> State:
    """Every model, version and job row, read in one read-only transaction (empty when no database exists)."""
    if database_url is None:
        path = home / "slimserve.db"
        if not path.exists():
            return State([], [], [])
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        conn.row_factory = sqlite3.Row
        try:
            conn.execute("BEGIN")  # one snapshot for the three tables
            tables = [[dict(row) for row in conn.execute(f"SELECT * FROM {t}")] for t in ("models", "versions", "jobs")]
        finally:
            conn.close()
    else:
        tables = _read_postgres(database_url)
    models, versions, jobs = tables
    for row in versions:
        if isinstance(row["files"], str):
            row["files"] = json.loads(row["files"])
    return State(models, versions, jobs)


def _read_postgres(url: str) -> list[list[dict[str, Any]]]:
    from sqlalchemy import create_engine, text

    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.connect() as conn:
            conn.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY"))
            return [
                [dict(row._mapping) for row in conn.execute(text(f"SELECT * FROM {t}"))]
                for t in ("models", "versions", "jobs")
            ]
    finally:
        engine.dispose()


def artifact_files(root: Path) -> Iterator[tuple[str, Path]]:
    """Every non-folder entry under the artifact folder as (relative POSIX key, path); links included."""
    if not root.exists():
        return
    for path in sorted(root.rglob("*")):
        if path.is_symlink() or not path.is_dir():
            yield path.relative_to(root).as_posix(), path


def is_temporary(key: str) -> bool:
    """A name the service documents as temporary: some path component starts with ``.`` (never a valid key)."""
    return any(part.startswith(".") for part in key.split("/"))


# --------------------------------------------------------------------------- the checks


def violations(
    home: Path,
    ledger: Ledger,
    *,
    state: State | None = None,
    settled: bool = True,
    exempt: Exemptions = Exemptions(),
    database_url: str | None = None,
) -> list[str]:
    """Invariants 1-3 on the home as it is now, one line per violation (none: they hold).

    ``settled``: nothing is in flight (no live worker left, or it has finished), so every job must
    be final and no temporary file may remain.
    """
    state = state if state is not None else read_state(home, database_url)
    root = home / "artifacts"
    return [
        *_acknowledged_uploads(state, ledger),
        *_jobs(state, settled),
        *_artifacts(state, root, settled, exempt),
    ]


def _acknowledged_uploads(state: State, ledger: Ledger) -> Iterator[str]:
    models = {m["name"]: m for m in state.models}
    jobs = {j["id"]: j for j in state.jobs}
    originals = {v["model_id"]: v for v in state.versions if v["number"] == 1}
    for up in ledger.uploads:
        where = f"invariant 1: acknowledged upload {up.name!r} (job {up.job_id[:8]})"
        model = models.get(up.name)
        if model is None:
            yield f"{where}: no model row"
            continue
        job = jobs.get(up.job_id)
        if job is None:
            yield f"{where}: no job row"
        elif job["model_id"] != model["id"]:
            yield f"{where}: the job row belongs to another model"
        version = originals.get(model["id"])
        if version is None or version["kind"] != "original":
            yield f"{where}: no original version 1"
            continue
        files = version["files"] or {}
        originals_ = [name for name in files if name.startswith("original.")]
        if len(originals_) != 1 or "data.npz" not in files:
            yield f"{where}: version 1 lacks the uploaded files (has {sorted(files)})"
            continue
        for name, sent in ((originals_[0], up.model_sha256), ("data.npz", up.data_sha256)):
            if sent is not None and files[name].get("sha256") != sent:
                yield f"{where}: the row of {name} records other bytes than the client sent"
        # the files themselves (existence, size, sha256) are checked with every other row in invariant 3


def _jobs(state: State, settled: bool) -> Iterator[str]:
    versions_of: dict[int, dict[int, dict[str, Any]]] = {}
    for v in state.versions:
        versions_of.setdefault(v["model_id"], {})[v["number"]] = v
    live_leases: Counter[str] = Counter()
    succeeded: Counter[int] = Counter()
    for job in state.jobs:
        where = f"invariant 2: job {job['id'][:8]}"
        status = job["status"]
        if status not in STATUSES:
            yield f"{where}: unknown status {status!r}"
        if settled and status not in FINAL:
            yield f"{where}: still {status} after the service settled"
        if not 0 <= job["attempts"] <= job["max_attempts"]:
            yield f"{where}: attempts {job['attempts']} outside 0..{job['max_attempts']}"
        if status == "running":
            owner = job["lease_owner"]
            if not owner or job["lease_expires_at"] is None:
                yield f"{where}: running without a lease"
            else:
                worker, _, attempt = str(owner).rpartition(":")
                live_leases[worker] += 1
                if attempt != str(job["attempts"]):
                    yield f"{where}: its lease {owner!r} is not the one of attempt {job['attempts']}"
        elif job["lease_expires_at"] is not None:
            yield f"{where}: {status} but still holds a live lease"
        if status == "queued" and job["lease_owner"] is not None:
            yield f"{where}: queued but owned by {job['lease_owner']!r}"
        if status == "failed" and not (job["error"] or "").strip():
            yield f"{where}: failed without a reason"
        if status == "succeeded":
            succeeded[job["model_id"]] += 1
            result = versions_of.get(job["model_id"], {}).get(job["result_version"])
            if result is None or (result["kind"], result["state"]) != ("optimized", "ready"):
                yield f"{where}: succeeded but version {job['result_version']} is not a ready optimized version"
    for worker, count in live_leases.items():
        if count > 1:
            yield f"invariant 2: worker {worker!r} holds {count} live leases at once"
    for model in state.models:
        mine = versions_of.get(model["id"], {})
        where = f"invariant 2: model {model['name']!r}"
        optimized = sorted(n for n, v in mine.items() if v["kind"] == "optimized")
        if len(optimized) != succeeded[model["id"]]:
            wins = succeeded[model["id"]]
            yield f"{where}: {len(optimized)} optimized versions {optimized} for {wins} succeeded jobs"
        if 1 not in mine or mine[1]["kind"] != "original":
            yield f"{where}: no original version 1"
        default = model["default_version"]
        if default is not None and (default not in mine or mine[default]["state"] != "ready"):
            yield f"{where}: the default version {default} is not a ready version"


def _artifacts(state: State, root: Path, settled: bool, exempt: Exemptions) -> Iterator[str]:
    referenced: set[str] = set()
    names = {m["id"]: m["name"] for m in state.models}
    for v in state.versions:
        for name, ref in (v["files"] or {}).items():
            key = str(ref.get("key", ""))
            where = f"invariant 3: {names.get(v['model_id'], '?')!r} v{v['number']} {name}"
            referenced.add(key)
            if not key or key.startswith("/") or ".." in key.split("/") or is_temporary(key):
                yield f"{where}: the row points at an invalid key {key!r}"
                continue
            path = root / key
            if path.is_symlink() or not path.is_file():
                yield f"{where}: the row points at a missing file {key}"
                continue
            if key in exempt.tampered:
                continue
            data = path.read_bytes()
            if len(data) != ref.get("size"):
                yield f"{where}: {key} holds {len(data)} bytes, the row says {ref.get('size')}"
            elif hashlib.sha256(data).hexdigest() != ref.get("sha256"):
                yield f"{where}: {key} does not match the row's sha256"
    for key, path in artifact_files(root):
        if path.is_symlink():
            yield f"invariant 3: a link in the artifact folder: {key}"
        elif key in referenced or any(key.startswith(prefix) for prefix in exempt.unreferenced):
            continue
        elif is_temporary(key):
            if settled:
                yield f"invariant 3: a temporary file outlived its request: {key}"
        else:
            yield f"invariant 3: a file without a row: {key}"


# --------------------------------------------------------------------------- settling and liveness


def wait_settled(home: Path, database_url: str | None = None, timeout: float = SETTLE_SECONDS) -> None:
    """Until no job is queued or running (a live worker must be running); returns at timeout (the check reports)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(job["status"] in FINAL for job in read_state(home, database_url).jobs):
            return
        time.sleep(0.2)


def live_violations(url: str, home: Path, ledger: Ledger, fresh: MlpFiles) -> list[str]:
    """Invariant 4: ``/v2/health/live`` answers 200 and a fresh valid upload's job succeeds (recorded in ``ledger``)."""
    try:
        live = httpx.get(f"{url}/v2/health/live", timeout=10)
    except httpx.HTTPError as exc:
        return [f"invariant 4: the server is not live: {type(exc).__name__}"]
    if live.status_code != 200:
        return [f"invariant 4: /v2/health/live answered {live.status_code}"]
    name = f"after-fault-{next(_fresh)}"
    try:
        response = upload(url, fresh.model, fresh.data, job_config(name), timeout=60)
    except httpx.HTTPError as exc:
        return [f"invariant 4: a fresh upload failed: {type(exc).__name__}"]
    if response.status_code != 202:
        return [f"invariant 4: a fresh upload answered {response.status_code}: {response.text[:300]}"]
    job_id = ledger.acknowledged(response, name, fresh.model, fresh.data)
    try:
        job = wait_job(url, job_id, timeout=SETTLE_SECONDS)
    except TimeoutError as exc:
        return [f"invariant 4: the fresh job did not end: {exc}"]
    if job["status"] != "succeeded" or job["version"] != 2:
        return [f"invariant 4: the fresh job ended {job['status']} (version {job['version']}): {job['error']}"]
    return []


@contextlib.contextmanager
def _stopped_at_exit(proc: Proc | None) -> Iterator[None]:
    try:
        yield
    finally:
        if proc is not None:
            proc.stop(timeout=30)


def assert_invariants(
    home: Path,
    ledger: Ledger,
    fresh: MlpFiles,
    *,
    server: Proc | None = None,
    worker_running: bool = True,
    exempt: Exemptions = Exemptions(),
    database_url: str | None = None,
    settings: Mapping[str, str] | None = None,
) -> None:
    """The four invariants hold for ``home`` after a fault; AssertionError listing every violation otherwise.

    Without ``server`` (the test stopped or killed its processes) the service is restarted cleanly
    on ``home`` (with its in-process worker) and checked there, then stopped. With ``server`` the
    running one is used; ``worker_running`` False (it runs no worker) starts a standalone worker for
    the check. Either way the jobs get a bounded wait to end before invariants 1-3 are read, then
    invariant 4 runs a fresh upload, and invariants 1-3 are read again with it.
    """
    env = {**CHECK_SETTINGS, **(settings or {})}
    if database_url is not None:
        env["database_url"] = database_url
    own_server = None
    if server is None:
        own_server = server = start_server(home, env=settings_env(**{**env, "run_worker": "true"}))
        worker_running = True
    extra = None if worker_running else start_worker(home, name="invariant-worker", env=settings_env(**env))
    problems: list[str] = []
    try:
        with _stopped_at_exit(own_server), _stopped_at_exit(extra):
            wait_settled(home, database_url)
            problems += violations(home, ledger, exempt=exempt, database_url=database_url)
            problems += live_violations(server.url, home, ledger, fresh)
            wait_settled(home, database_url)
            after = violations(home, ledger, exempt=exempt, database_url=database_url)
            problems += [line for line in after if line not in problems]
    finally:
        if problems and own_server is not None:
            print(f"--- invariant check server log ---\n{own_server.output()[-3000:]}")
    assert not problems, "invariants violated after the fault:\n" + "\n".join(problems)
