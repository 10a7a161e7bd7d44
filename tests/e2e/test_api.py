"""The /v1 API end to end against real `slimserve serve` processes (and their in-process worker).

Two servers per module: ``open_server`` (no keys, worker on) runs real optimization jobs;
``keyed_server`` (admin + infer keys, worker off, docs off) checks access, cancel of queued jobs
and idempotent uploads without spending time on optimizations.
"""

from __future__ import annotations

import hashlib
import http.client
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from tests.e2e.conftest import (
    MlpFiles,
    assert_error,
    bearer,
    db_rows,
    home_files,
    job_config,
    metric,
    model_names,
    serving,
    upload,
)
from tests.serverproc import ROOT, Proc, free_port, service_env, wait_for, wait_job

ADMIN, INFER = "adm", "inf"
MISSING_JOB = "0" * 32


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    """No keys, the in-process worker on and polling fast, the access log on."""
    home = tmp_path_factory.mktemp("api-open") / "home"
    settings = {"poll_seconds": "0.2", "heartbeat_seconds": "0.5", "access_log": "true", "log_level": "info"}
    with serving(home, **settings) as proc:
        proc.extra["home"] = str(home)
        yield proc


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    """Admin and infer keys, no worker (jobs stay queued), no docs, idle connections kept 2 s, info logs."""
    home = tmp_path_factory.mktemp("api-keyed") / "home"
    settings = {"admin_keys": ADMIN, "infer_keys": INFER, "run_worker": "false", "docs_enabled": "false"}
    settings["log_level"] = "info"  # the access log stays off by default even so
    with serving(home, **settings, keep_alive_seconds="2") as proc:
        proc.extra["home"] = str(home)
        yield proc


@dataclass
class Finished:
    """The happy-path upload and what came of it."""

    response: httpx.Response
    job: dict[str, Any]
    metrics_before: str


@pytest.fixture(scope="module")
def happy(open_server: Proc, mlp_files: MlpFiles) -> Finished:
    """Upload model ``m``, wait for its job to end."""
    before = httpx.get(f"{open_server.url}/metrics", timeout=10).text
    response = upload(open_server.url, mlp_files.model, mlp_files.data, job_config("m"))
    assert response.status_code == 202, response.text
    job = wait_job(open_server.url, response.json()["job"]["id"])
    return Finished(response=response, job=job, metrics_before=before)


def _get(proc: Proc, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.get(f"{proc.url}{path}", timeout=30, **kwargs)


# --------------------------------------------------------------------------- happy path


@pytest.mark.slow
def test_upload_answers_202_with_location_model_and_job(happy: Finished) -> None:
    body = happy.response.json()
    assert body["model"]["name"] == "m"
    job_id = body["job"]["id"]
    assert happy.response.headers["location"] == f"/v1/jobs/{job_id}"
    assert body["job"]["status"] in ("queued", "running")
    assert body["job"]["model"] == "m"


@pytest.mark.slow
def test_job_succeeds_with_the_optimized_version(happy: Finished) -> None:
    job = happy.job
    assert job["status"] == "succeeded", job
    assert job["version"] == 2
    assert job["progress"] == pytest.approx(1.0)
    assert job["error"] is None
    assert job["attempts"] == 1
    assert job["finished_at"] is not None and job["started_at"] is not None


@pytest.mark.slow
def test_model_shows_original_and_optimized_versions(open_server: Proc, happy: Finished) -> None:
    model = _get(open_server, "/v1/models/m").json()
    versions = {v["number"]: v for v in model["versions"]}
    assert sorted(versions) == [1, 2]
    original, optimized = versions[1], versions[2]
    assert (original["kind"], original["state"]) == ("original", "ready")
    assert "model.onnx" in original["files"]
    assert (optimized["kind"], optimized["state"]) == ("optimized", "ready")
    assert {"model.onnx", "report.json", "report.html"} <= set(optimized["files"])
    summary = optimized["summary"]
    assert summary is not None and "speedup" in summary
    assert any("accuracy" in key for key in summary), summary
    assert model["latest_job"]["id"] == happy.job["id"]


@pytest.mark.slow
def test_download_model_matches_its_etag_and_runs(open_server: Proc, happy: Finished, mlp_files: MlpFiles) -> None:
    response = _get(open_server, "/v1/models/m/versions/2/model.onnx")
    assert response.status_code == 200
    digest = hashlib.sha256(response.content).hexdigest()
    assert response.headers["etag"] == f'"{digest}"'
    assert int(response.headers["content-length"]) == len(response.content)
    assert response.headers.get("accept-ranges") == "bytes"
    listed = _get(open_server, "/v1/models/m").json()["versions"][1]["files"]["model.onnx"]
    assert listed == {"size": len(response.content), "sha256": digest}
    session = ort.InferenceSession(response.content, providers=["CPUExecutionProvider"])
    x = np.load(mlp_files.data)["x"]
    (logits,) = session.run(None, {"x": x})
    assert logits.shape == (len(x), 4)
    assert np.isfinite(logits).all()


@pytest.mark.slow
def test_download_reports(open_server: Proc, happy: Finished) -> None:
    report = _get(open_server, "/v1/models/m/versions/2/report.json")
    assert report.status_code == 200
    body = report.json()
    names = {c["name"] for c in body["candidates"]} | {"baseline"}
    assert body["chosen"] in names
    html = _get(open_server, "/v1/models/m/versions/2/report.html")
    assert html.status_code == 200
    assert html.headers["content-type"].startswith("text/html")
    assert "<html" in html.text.lower()
    assert _get(open_server, "/v1/models/m/versions/2/data.npz").status_code == 404
    assert _get(open_server, "/v1/models/m/versions/9/model.onnx").status_code == 404


@pytest.mark.slow
def test_range_request_answers_206_with_those_bytes(open_server: Proc, happy: Finished) -> None:
    whole = _get(open_server, "/v1/models/m/versions/2/model.onnx").content
    part = _get(open_server, "/v1/models/m/versions/2/model.onnx", headers={"Range": "bytes=0-99"})
    assert part.status_code == 206
    assert part.content == whole[:100]
    assert part.headers["content-range"] == f"bytes 0-99/{len(whole)}"
    assert part.headers["content-length"] == "100"
    beyond = _get(open_server, "/v1/models/m/versions/2/model.onnx", headers={"Range": f"bytes={len(whole) + 10}-"})
    assert beyond.status_code == 416


@pytest.mark.slow
def test_if_none_match_answers_304(open_server: Proc, happy: Finished) -> None:
    first = _get(open_server, "/v1/models/m/versions/2/report.json")
    again = _get(open_server, "/v1/models/m/versions/2/report.json", headers={"If-None-Match": first.headers["etag"]})
    assert again.status_code == 304
    assert again.content == b""
    other = _get(open_server, "/v1/models/m/versions/2/report.json", headers={"If-None-Match": '"0000"'})
    assert other.status_code == 200


@pytest.mark.slow
def test_list_models_holds_it(open_server: Proc, happy: Finished) -> None:
    listed = _get(open_server, "/v1/models").json()["models"]
    assert "m" in {model["name"] for model in listed}


@pytest.mark.slow
def test_metrics_count_the_job(open_server: Proc, happy: Finished) -> None:
    text = _get(open_server, "/metrics").text
    before = metric(happy.metrics_before, "slimserve_optimization_jobs_total", status="succeeded") or 0.0
    after = metric(text, "slimserve_optimization_jobs_total", status="succeeded")
    assert after is not None and after >= before + 1
    assert metric(text, "slimserve_optimization_queue_depth") is not None
    assert metric(text, "slimserve_optimization_jobs_in_progress") is not None
    count = metric(text, "slimserve_optimization_job_duration_seconds_count")
    assert count is not None and count >= 1
    assert metric(text, "slimserve_optimization_job_duration_seconds_bucket", le="+Inf") == count


def test_docs_and_openapi_answer(open_server: Proc) -> None:
    assert _get(open_server, "/docs").status_code == 200
    spec = _get(open_server, "/openapi.json")
    assert spec.status_code == 200
    assert "/v1/models" in spec.json()["paths"]


@pytest.mark.slow
def test_cancel_a_running_job_ends_cancelled(open_server: Proc, mlp_files: MlpFiles) -> None:
    slow = job_config("slow", latency_seconds=3.0)
    response = upload(open_server.url, mlp_files.model, mlp_files.data, slow)
    assert response.status_code == 202, response.text
    job_id = response.json()["job"]["id"]

    def running() -> bool:
        status = _get(open_server, f"/v1/jobs/{job_id}").json()["status"]
        assert status in ("queued", "running"), f"job ended {status} before it could be cancelled"
        return bool(status == "running")

    wait_for(running, timeout=60)
    cancelled = httpx.post(f"{open_server.url}/v1/jobs/{job_id}/cancel", timeout=30)
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] in ("running", "cancelled")
    job = wait_job(open_server.url, job_id, timeout=60)
    assert job["status"] == "cancelled", job
    versions = _get(open_server, "/v1/models/slow").json()["versions"]
    assert [v["number"] for v in versions] == [1]


@pytest.mark.slow
def test_delete_removes_the_model_and_its_files(open_server: Proc, happy: Finished) -> None:
    home = Path(open_server.extra["home"])
    before = {p for p in (home / "artifacts").rglob("*") if p.is_file()}
    model_files = {p for p in before if "models" in p.parts}
    assert model_files, "no model artifacts were written under <home>/artifacts"
    deleted = httpx.delete(f"{open_server.url}/v1/models/m", timeout=30)
    assert deleted.status_code == 204
    assert _get(open_server, "/v1/models/m").status_code == 404
    assert _get(open_server, "/v1/models/m/versions/2/model.onnx").status_code == 404
    assert _get(open_server, f"/v1/jobs/{happy.job['id']}").status_code == 404
    assert "m" not in model_names(home)
    after = {p for p in (home / "artifacts").rglob("*") if p.is_file()}
    gone = before - after
    prefixes = {p.relative_to(home / "artifacts").parts[:2] for p in gone}
    assert len(prefixes) == 1, f"deleting one model removed files of {prefixes}"
    (prefix,) = prefixes
    assert not any(p.relative_to(home / "artifacts").parts[:2] == prefix for p in after), "files left after delete"
    assert httpx.delete(f"{open_server.url}/v1/models/m", timeout=30).status_code == 404


# --------------------------------------------------------------------------- access


WRITES = [
    ("POST", "/v1/models"),
    ("DELETE", "/v1/models/anything"),
    ("POST", f"/v1/jobs/{MISSING_JOB}/cancel"),
]
READS = [("GET", "/v1/models"), ("GET", "/v1/models/anything"), ("GET", f"/v1/jobs/{MISSING_JOB}")]


@pytest.mark.parametrize(("method", "path"), WRITES + READS)
@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="no-key"),
        pytest.param({"Authorization": "Bearer wrong"}, id="wrong-key"),
        pytest.param({"Authorization": "Bearer Adm"}, id="wrong-case"),
        pytest.param({"Authorization": "Bearer adminadm"}, id="longer"),
        pytest.param({"Authorization": "Basic adm"}, id="other-scheme"),
    ],
)
def test_no_key_or_a_wrong_key_is_401(keyed_server: Proc, method: str, path: str, headers: dict[str, str]) -> None:
    response = httpx.request(method, f"{keyed_server.url}{path}", headers=headers, timeout=30)
    assert_error(response, 401)


def _queued(proc: Proc, mlp_files: MlpFiles, name: str) -> dict[str, Any]:
    response = upload(proc.url, mlp_files.model, mlp_files.data, job_config(name), key=ADMIN)
    assert response.status_code == 202, response.text
    return dict(response.json()["job"])


def test_infer_key_cannot_write_and_changes_nothing(keyed_server: Proc, mlp_files: MlpFiles) -> None:
    home = Path(keyed_server.extra["home"])
    job = _queued(keyed_server, mlp_files, "guarded")
    names, files = model_names(home), home_files(home)

    refused = upload(keyed_server.url, mlp_files.model, mlp_files.data, job_config("intruder"), key=INFER)
    assert_error(refused, 403, home)
    assert model_names(home) == names
    assert home_files(home) == files
    assert "intruder" not in names

    assert_error(httpx.delete(f"{keyed_server.url}/v1/models/guarded", headers=bearer(INFER), timeout=30), 403)
    assert "guarded" in model_names(home)

    cancel = httpx.post(f"{keyed_server.url}/v1/jobs/{job['id']}/cancel", headers=bearer(INFER), timeout=30)
    assert_error(cancel, 403)
    still = httpx.get(f"{keyed_server.url}/v1/jobs/{job['id']}", headers=bearer(ADMIN), timeout=30).json()
    assert still["status"] == "queued"


def test_infer_key_can_read(keyed_server: Proc, mlp_files: MlpFiles) -> None:
    job = _queued(keyed_server, mlp_files, "readable")
    headers = bearer(INFER)
    assert "readable" in {m["name"] for m in _get(keyed_server, "/v1/models", headers=headers).json()["models"]}
    assert _get(keyed_server, "/v1/models/readable", headers=headers).json()["name"] == "readable"
    assert _get(keyed_server, f"/v1/jobs/{job['id']}", headers=headers).json()["id"] == job["id"]
    assert _get(keyed_server, "/v1/models/readable/versions/1", headers=headers).status_code == 200


def test_admin_can_upload_cancel_a_queued_job_and_delete(keyed_server: Proc, mlp_files: MlpFiles) -> None:
    home = Path(keyed_server.extra["home"])
    job = _queued(keyed_server, mlp_files, "owned")
    assert job["status"] == "queued"
    cancelled = httpx.post(f"{keyed_server.url}/v1/jobs/{job['id']}/cancel", headers=bearer(ADMIN), timeout=30)
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"
    assert _get(keyed_server, f"/v1/jobs/{job['id']}", headers=bearer(ADMIN)).json()["status"] == "cancelled"
    again = httpx.post(f"{keyed_server.url}/v1/jobs/{job['id']}/cancel", headers=bearer(ADMIN), timeout=30)
    assert again.status_code == 200 and again.json()["status"] == "cancelled"
    assert httpx.delete(f"{keyed_server.url}/v1/models/owned", headers=bearer(ADMIN), timeout=30).status_code == 204
    assert "owned" not in model_names(home)
    missing = httpx.post(f"{keyed_server.url}/v1/jobs/{MISSING_JOB}/cancel", headers=bearer(ADMIN), timeout=30)
    assert_error(missing, 404)


def test_same_idempotency_key_returns_the_same_job(keyed_server: Proc, mlp_files: MlpFiles) -> None:
    home = Path(keyed_server.extra["home"])
    prefixes_before = _model_prefixes(home)
    first = upload(
        keyed_server.url, mlp_files.model, mlp_files.data, job_config("once"), key=ADMIN, idempotency_key="k-1"
    )
    second = upload(
        keyed_server.url, mlp_files.model, mlp_files.data, job_config("once"), key=ADMIN, idempotency_key="k-1"
    )
    assert first.status_code == 202, first.text
    assert second.status_code == 202, second.text
    assert second.json()["job"]["id"] == first.json()["job"]["id"]
    assert second.headers["location"] == first.headers["location"]
    assert [n for n in model_names(home) if n == "once"] == ["once"]
    assert len(db_jobs_of(home, "once")) == 1
    assert len(_model_prefixes(home) - prefixes_before) == 1, "the retried upload left a second set of files"
    other = upload(
        keyed_server.url, mlp_files.model, mlp_files.data, job_config("once"), key=ADMIN, idempotency_key="k-2"
    )
    assert_error(other, 409, home)


def db_jobs_of(home: Path, name: str) -> list[str]:
    """Job ids of model ``name``."""
    rows = db_rows(home, "SELECT j.id FROM jobs j JOIN models m ON m.id = j.model_id WHERE m.name = ?", (name,))
    return [row[0] for row in rows]


def _model_prefixes(home: Path) -> set[str]:
    folder = home / "artifacts" / "models"
    return {p.name for p in folder.iterdir()} if folder.exists() else set()


def test_docs_can_be_turned_off(keyed_server: Proc) -> None:
    assert _get(keyed_server, "/docs").status_code == 404
    assert _get(keyed_server, "/openapi.json").status_code == 404
    assert _get(keyed_server, "/v1/health").json() == {"status": "ok"}


def test_an_unknown_route_answers_the_error_shape(keyed_server: Proc) -> None:
    response = _get(keyed_server, "/v1/nothing-here")
    assert_error(response, 404)


def test_refuses_a_public_bind_without_a_key(tmp_path: Path) -> None:
    env = service_env(tmp_path / "home")
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--host", "0.0.0.0", "--port", str(free_port())],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "refus" in lines[0].lower() and "key" in lines[0].lower()
    assert "Traceback" not in result.stderr


def test_idle_keep_alive_connections_close_after_the_setting(keyed_server: Proc) -> None:
    """``SLIMSERVE_KEEP_ALIVE_SECONDS``: a connection is reused while it idles less than the setting
    and closed by the server once it idles longer (a proxy must not outlive it: see the README)."""
    host, port = keyed_server.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        for pause in (0.0, 0.5):  # a second request on the same connection after a short idle
            time.sleep(pause)
            connection.request("GET", "/v1/health")
            response = connection.getresponse()
            assert response.status == 200 and response.read(), "the idle connection was not kept"
            assert not response.will_close
        assert connection.sock is not None
        sock = connection.sock
        idle_since = time.monotonic()
        assert sock.recv(1) == b"", "the server should close the idle connection"
        idle = time.monotonic() - idle_since
    finally:
        connection.close()
    assert 1.5 <= idle <= 4.0, f"closed after {idle:.1f} s idle, the setting is 2 s"


@pytest.mark.parametrize(("server", "logged"), [("open_server", True), ("keyed_server", False)])
def test_access_log_follows_the_setting(server: str, logged: bool, request: pytest.FixtureRequest) -> None:
    """``SLIMSERVE_ACCESS_LOG``: one line per request when on; off by default (the keyed server)."""
    proc: Proc = request.getfixturevalue(server)
    marker = uuid.uuid4().hex
    assert httpx.get(f"{proc.url}/v1/health", params={"probe": marker}, timeout=10).status_code == 200
    deadline = time.monotonic() + 2  # the line is written just after the answer: give it a moment
    while marker not in proc.output() and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = [line for line in proc.output().splitlines() if marker in line]
    if logged:
        assert len(lines) == 1 and "GET /v1/health" in lines[0] and "200" in lines[0], lines
    else:
        assert lines == []
