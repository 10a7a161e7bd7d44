"""Helpers and fixtures for the end-to-end tests: real `slimserve serve` / `slimserve worker` processes.

Everything here talks to the service the way a client does (HTTP) or looks at what it left on
disk (the SQLite file, read-only, and the artifact folder under ``SLIMSERVE_HOME``).
"""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.builders import mlp_data, mlp_onnx
from tests.serverproc import FAST_JOB, Proc, start_server

#: Files under SLIMSERVE_HOME that are the database itself, not artifacts.
_DB_FILES = ("slimserve.db", "slimserve.db-wal", "slimserve.db-shm", "slimserve.db-journal")
#: What an error body must never show a client.
#: A path of two or more components (``/work/...``, ``/onnxruntime_src/...``): never in a job's reason.
_PATH = re.compile(r"(/[\w.+-]+){2,}")
_LEAKS = ("Traceback", "/tmp/", "/work/", "/root/", ".staging", '.py"', "site-packages")


@dataclass(frozen=True)
class MlpFiles:
    """A tiny valid model and its sample data (input ``x[batch, 16]``, labels)."""

    model: Path
    data: Path


@pytest.fixture(scope="session")
def mlp_files(tmp_path_factory: pytest.TempPathFactory) -> MlpFiles:
    """Built once per session; tests only read them."""
    folder = tmp_path_factory.mktemp("mlp")
    return MlpFiles(model=mlp_onnx(folder / "mlp.onnx"), data=mlp_data(folder / "mlp.npz"))


def job_config(name: str, **overrides: Any) -> dict[str, Any]:
    """The ``config`` part of a fast job."""
    return {"name": name, **FAST_JOB, **overrides}


def bearer(key: str | None) -> dict[str, str]:
    """The Authorization header for ``key`` (none for None)."""
    return {"Authorization": f"Bearer {key}"} if key else {}


def upload(
    url: str,
    model: Path | bytes | None,
    data: Path | bytes | None,
    config: Mapping[str, Any] | str | None,
    *,
    key: str | None = None,
    idempotency_key: str | None = None,
    model_filename: str = "model.onnx",
    timeout: float = 120.0,
) -> httpx.Response:
    """``POST /v1/models`` as multipart (a part given as None is left out)."""
    files: dict[str, tuple[str, bytes, str]] = {}
    if model is not None:
        files["model"] = (
            model_filename,
            model.read_bytes() if isinstance(model, Path) else model,
            "application/octet-stream",
        )
    if data is not None:
        files["data"] = ("data.npz", data.read_bytes() if isinstance(data, Path) else data, "application/octet-stream")
    form: dict[str, str] = {}
    if config is not None:
        form["config"] = config if isinstance(config, str) else json.dumps(config)
    headers = bearer(key)
    if idempotency_key:
        headers["Idempotency-Key"] = idempotency_key
    return httpx.post(f"{url}/v1/models", files=files, data=form, headers=headers, timeout=timeout)


def upload_and_wait(url: str, models: list[tuple[str, Path]], data: Path) -> list[dict[str, Any]]:
    """Upload each ``(name, model)`` with ``data``, then wait until every job succeeded; the jobs."""
    from tests.serverproc import wait_job

    ids = []
    for name, model in models:
        response = upload(url, model, data, job_config(name))
        assert response.status_code == 202, response.text
        ids.append(response.json()["job"]["id"])
    finished = [wait_job(url, job_id) for job_id in ids]
    for job in finished:
        assert job["status"] == "succeeded", job
    return finished


def multipart_body(parts: list[tuple[str, str | None, bytes]], boundary: str) -> bytes:
    """A ``multipart/form-data`` body built by hand: (field name, file name or None, bytes) per part."""
    out = bytearray()
    for name, filename, payload in parts:
        out += f"--{boundary}\r\n".encode()
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"Content-Disposition: {disposition}\r\n".encode()
        if filename:
            out += b"Content-Type: application/octet-stream\r\n"
        out += b"\r\n" + payload + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out)


def db_rows(home: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Rows of a query on the service's SQLite file, opened read-only."""
    conn = sqlite3.connect(f"file:{home / 'slimserve.db'}?mode=ro", uri=True, timeout=30)
    try:
        return list(conn.execute(sql, params).fetchall())
    finally:
        conn.close()


def model_names(home: Path) -> set[str]:
    """Every model name in the database."""
    return {row[0] for row in db_rows(home, "SELECT name FROM models")}


def job_row(home: Path, job_id: str) -> dict[str, Any]:
    """The job's row, straight from the database (works while no server runs)."""
    conn = sqlite3.connect(f"file:{home / 'slimserve.db'}?mode=ro", uri=True, timeout=30)
    conn.row_factory = sqlite3.Row
    try:
        row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
    finally:
        conn.close()
    assert row is not None, f"no job row {job_id}"
    return dict(row)


def version_rows(home: Path, model: str) -> list[dict[str, Any]]:
    """The model's version rows (number, kind, state, files), by number."""
    rows = db_rows(
        home,
        "SELECT v.number, v.kind, v.state, v.files FROM versions v JOIN models m ON m.id = v.model_id "
        "WHERE m.name = ? ORDER BY v.number",
        (model,),
    )
    return [{"number": n, "kind": k, "state": s, "files": json.loads(f)} for n, k, s, f in rows]


def home_files(home: Path) -> set[str]:
    """Every file under SLIMSERVE_HOME except the database's own, as relative paths (hidden ones included)."""
    if not home.exists():
        return set()
    return {str(path.relative_to(home)) for path in home.rglob("*") if path.is_file() and path.name not in _DB_FILES}


def stray_files(home: Path) -> list[str]:
    """Staged or temp files left behind: anything in a ``.staging`` folder or named like a temp file."""
    return sorted(
        name for name in home_files(home) if ".staging" in Path(name).parts or Path(name).name.startswith(".")
    )


def assert_error(response: httpx.Response, status: int, home: Path | None = None) -> str:
    """``response`` is ``status`` with a one-line ``{"error": ...}`` that leaks no path; the message."""
    assert response.status_code == status, f"expected {status}, got {response.status_code}: {response.text[:500]}"
    body = response.json()
    assert set(body) == {"error"}, body
    message = body["error"]
    assert isinstance(message, str) and message.strip(), body
    assert "\n" not in message, message
    leaks = [leak for leak in _LEAKS if leak in message]
    if home is not None and str(home) in message:
        leaks.append(str(home))
    assert not leaks, f"error message leaks {leaks}: {message}"
    return message


def assert_clean_reason(reason: str | None) -> str:
    """A job's ``error`` is one non-empty line with no file path or traceback in it; the reason."""
    assert isinstance(reason, str) and reason.strip(), reason
    assert "\n" not in reason, reason
    assert "Traceback" not in reason, reason
    assert not _PATH.search(reason), f"the reason shows a file path: {reason}"
    return reason


def metric(text: str, sample: str, **labels: str) -> float | None:
    """The value of one Prometheus sample in an exposition ``text`` (None when absent)."""
    for family in text_string_to_metric_families(text):
        for item in family.samples:
            if item.name == sample and all(item.labels.get(k) == v for k, v in labels.items()):
                return float(item.value)
    return None


def settings_env(**settings: str) -> dict[str, str]:
    """``SLIMSERVE_<NAME>`` variables for settings given by field name."""
    return {f"SLIMSERVE_{key.upper()}": value for key, value in settings.items()}


@contextlib.contextmanager
def serving(home: Path, **settings: str) -> Iterator[Proc]:
    """A ``slimserve serve`` process for the block; its log is printed at the end (shown when a test fails)."""
    proc = start_server(home, env=settings_env(**settings))
    try:
        yield proc
    finally:
        proc.stop(timeout=40)
        print(f"--- server log ({proc.log.name}) ---\n{proc.output()[-4000:]}")
