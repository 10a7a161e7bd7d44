"""The invariant checker itself: silent on a consistent home, and it fails on each kind of breakage.

The home is made by the service's own code, in-process (migrate, ``LocalStore.put_file``,
``Catalog.create_upload``, ``JobStore.claim`` / ``succeed``): the same rows and files a server
leaves after one successful job. Each test then breaks it by hand (a file without a row, a row
without a file, a torn file, a stuck job, ...) and checks that the checker names the breakage.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import pytest

from service.jobs.store import JobStore
from service.storage.artifacts import LocalStore
from service.storage.catalog import Catalog, FileRef
from service.storage.db import create_db_engine, migrate
from tests.e2e.conftest import MlpFiles
from tests.faults.invariants import Exemptions, Ledger, live_violations, violations
from tests.serverproc import free_port

MODEL = b"\x08\x08" + b"pretend onnx bytes" * 10
DATA = b"PK\x03\x04" + b"pretend npz bytes" * 10
PREFIX = "0123abcd"


@dataclass
class Home:
    """A home after one upload whose job succeeded; the ledger of that upload."""

    path: Path
    ledger: Ledger
    job_id: str

    @property
    def artifacts(self) -> Path:
        return self.path / "artifacts"

    def sql(self, statement: str, *params: object) -> None:
        conn = sqlite3.connect(self.path / "slimserve.db")
        try:
            conn.execute(statement, params)
            conn.commit()
        finally:
            conn.close()

    def found(self, **options: object) -> list[str]:
        return violations(self.path, self.ledger, **options)  # type: ignore[arg-type]


def stored(store: LocalStore, key: str, content: bytes, scratch: Path) -> FileRef:
    source = scratch / key.replace("/", "_")
    source.write_bytes(content)
    item = store.put_file(key, source)
    return FileRef(item.key, item.size, item.sha256)


@pytest.fixture
def home(tmp_path: Path) -> Home:
    path = tmp_path / "home"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    engine = create_db_engine(f"sqlite:///{path / 'slimserve.db'}")
    try:
        migrate(engine)
        store = LocalStore(path / "artifacts")
        uploads = f"models/{PREFIX}/uploads"
        originals = {
            "original.onnx": stored(store, f"{uploads}/original.onnx", MODEL, scratch),
            "data.npz": stored(store, f"{uploads}/data.npz", DATA, scratch),
        }
        _, job, _ = Catalog(engine).create_upload(
            name="m",
            storage_prefix=PREFIX,
            original_files=originals,
            source_format="onnx",
            job_config={"name": "m"},
            max_attempts=3,
            idempotency_key=None,
        )
        jobs = JobStore(engine, lease_seconds=60)
        claim = jobs.claim("worker-a")
        assert claim is not None
        out = f"models/{PREFIX}/jobs/{job.id}/1"
        optimized = {
            name: stored(store, f"{out}/{name}", name.encode() * 50, scratch) for name in ("model.onnx", "r.json")
        }
        validated = stored(store, f"{out}/original.onnx", MODEL + b"validated", scratch)
        assert jobs.succeed(claim, optimized_files=optimized, summary={}, original_files={"model.onnx": validated}) == 2
    finally:
        engine.dispose()
    ledger = Ledger()
    ledger.add("m", job.id, MODEL, DATA)
    return Home(path, ledger, job.id)


def test_a_consistent_home_has_no_violation(home: Home) -> None:
    assert home.found() == []


def test_a_file_without_a_row_is_reported(home: Home) -> None:
    orphan = home.artifacts / f"models/{PREFIX}/jobs/{home.job_id}/2/model.onnx"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"a killed attempt's output")
    (found,) = home.found()
    assert found.startswith("invariant 3: a file without a row") and orphan.name in found
    assert home.found(exempt=Exemptions(unreferenced=(f"models/{PREFIX}/jobs/{home.job_id}/2/",))) == []


def test_a_row_without_a_file_is_reported(home: Home) -> None:
    (home.artifacts / f"models/{PREFIX}/jobs/{home.job_id}/1/model.onnx").unlink()
    (found,) = home.found()
    assert "points at a missing file" in found and "v2 model.onnx" in found


def test_a_torn_or_altered_file_is_reported(home: Home) -> None:
    torn = home.artifacts / f"models/{PREFIX}/uploads/data.npz"
    torn.write_bytes(DATA[:10])
    flipped = home.artifacts / f"models/{PREFIX}/jobs/{home.job_id}/1/r.json"
    flipped.write_bytes(bytes(b ^ 1 for b in flipped.read_bytes()))
    found = home.found()
    assert len(found) == 2, found
    assert "holds 10 bytes" in found[0] and "data.npz" in found[0]
    assert "does not match the row's sha256" in found[1]
    tampered = {f"models/{PREFIX}/uploads/data.npz", f"models/{PREFIX}/jobs/{home.job_id}/1/r.json"}
    assert home.found(exempt=Exemptions(tampered=frozenset(tampered))) == []


def test_a_temporary_file_is_reported_once_settled(home: Home) -> None:
    staged = home.artifacts / ".staging" / ".upload-abc.model"
    staged.parent.mkdir(exist_ok=True)
    staged.write_bytes(b"half an upload")
    (home.artifacts / f"models/{PREFIX}/uploads/.data.npz.x1.tmp").write_bytes(b"half a copy")
    found = home.found()
    assert len(found) == 2 and all("a temporary file outlived its request" in line for line in found), found
    assert home.found(settled=False) == []  # in flight, a temp file is normal


def test_an_acknowledged_upload_without_rows_is_reported(home: Home) -> None:
    home.ledger.add("ghost", "f" * 32, b"x", b"y")
    home.ledger.add("m", home.job_id, MODEL + b"other", DATA)
    found = home.found()
    assert any("'ghost'" in line and "no model row" in line for line in found), found
    assert any("records other bytes" in line and "original.onnx" in line for line in found), found


def test_a_stuck_job_and_too_many_attempts_are_reported(home: Home) -> None:
    home.sql(
        "UPDATE jobs SET status = 'running', attempts = 4, lease_owner = 'w:4', lease_expires_at = 1.0 WHERE id = ?",
        home.job_id,
    )
    found = home.found()
    assert any("still running after the service settled" in line for line in found), found
    assert any("attempts 4 outside 0..3" in line for line in found), found
    assert any("0 succeeded jobs" in line for line in found), found  # its version is now unexplained


def test_a_lease_on_a_finished_job_is_reported(home: Home) -> None:
    home.sql("UPDATE jobs SET lease_expires_at = 99.0 WHERE id = ?", home.job_id)
    (found,) = home.found()
    assert "succeeded but still holds a live lease" in found


def test_a_second_version_for_one_success_is_reported(home: Home) -> None:
    conn = sqlite3.connect(home.path / "slimserve.db")
    try:
        (files,) = conn.execute("SELECT files FROM versions WHERE number = 2").fetchone()
        conn.execute(
            "INSERT INTO versions (model_id, number, kind, state, files, summary, created_at) "
            "SELECT model_id, 3, 'optimized', 'ready', ?, NULL, created_at FROM versions WHERE number = 2",
            (json.dumps(json.loads(files)),),
        )
        conn.commit()
    finally:
        conn.close()
    (found,) = home.found()
    assert "2 optimized versions [2, 3] for 1 succeeded jobs" in found


def test_a_dead_server_fails_invariant_4(tmp_path: Path) -> None:
    fresh = MlpFiles(model=tmp_path / "m.onnx", data=tmp_path / "d.npz")
    (found,) = live_violations(f"http://127.0.0.1:{free_port()}", tmp_path, Ledger(), fresh)
    assert found.startswith("invariant 4: the server is not live")
