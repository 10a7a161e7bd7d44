"""The Python client and `slimserve submit|jobs|models` against a real `slimserve serve` subprocess.

Most tests run against one server with its worker off (jobs stay queued) and API keys on; the
download and `submit --wait` tests run against a second server whose in-process worker really
optimizes a tiny MLP (marked slow). Retry behaviour is checked against a stdlib HTTP server.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import onnx
import pytest

from service import cli
from service.client import ApiError, ChecksumMismatch, ConnectionFailed, SlimserveClient, Timeout
from tests.builders import mlp_data, mlp_onnx
from tests.serverproc import FAST_JOB, free_port, running, start_server

ROOT = Path(__file__).resolve().parents[2]
ADMIN, INFER = "admin-key-for-tests", "infer-key-for-tests"


@dataclass
class Server:
    """A running `slimserve serve` subprocess and its SLIMSERVE_HOME."""

    url: str
    home: Path


@contextmanager
def running_server(home: Path, **settings: str) -> Iterator[Server]:
    """`python -m service.cli serve` on a free port with ``SLIMSERVE_<KEY>`` settings; stopped afterwards."""
    env = {f"SLIMSERVE_{key.upper()}": value for key, value in settings.items()}
    with running(start_server(home, env=env)) as proc:
        yield Server(url=proc.url, home=home)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny MLP and its sample data."""
    folder = tmp_path_factory.mktemp("inputs")
    return mlp_onnx(folder / "mlp.onnx"), mlp_data(folder / "mlp.npz")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server with its worker off and admin/infer keys configured."""
    home = tmp_path_factory.mktemp("home")
    with running_server(home, run_worker="false", admin_keys=ADMIN, infer_keys=INFER) as server:
        yield server


@pytest.fixture
def client(server: Server) -> Iterator[SlimserveClient]:
    """An admin client of ``server`` with quick retries."""
    with SlimserveClient(server.url, ADMIN, backoff=0.05) as admin:
        yield admin


def test_upload_returns_model_and_queued_job(client: SlimserveClient, files: tuple[Path, Path]) -> None:
    answer = client.upload(*files, {"name": "uploaded", "max_accuracy_drop": 0.02})
    job = answer["job"]
    assert answer["model"]["name"] == "uploaded"
    assert job["status"] == "queued" and len(job["id"]) == 32
    assert client.job(job["id"])["id"] == job["id"]
    model = client.model("uploaded")
    assert [v["kind"] for v in model["versions"]] == ["original"]
    assert model["latest_job"]["id"] == job["id"]
    assert "uploaded" in {m["name"] for m in client.models()}


def test_same_idempotency_key_returns_the_same_job(client: SlimserveClient, files: tuple[Path, Path]) -> None:
    first = client.upload(*files, {"name": "idem"}, idempotency_key="key-1")
    again = client.upload(*files, {"name": "idem"}, idempotency_key="key-1")
    assert again["job"]["id"] == first["job"]["id"]
    assert [m["name"] for m in client.models()].count("idem") == 1


class LoseFirstResponse(httpx.BaseTransport):
    """Fault injection: delivers every request, but the first POST's answer is 'lost' (ReadError)."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.posts: list[httpx.Request] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if request.method == "POST":
            self.posts.append(request)
            if len(self.posts) == 1:
                response.read()
                response.close()
                raise httpx.ReadError("connection reset while reading the answer", request=request)
        return response

    def close(self) -> None:
        self.inner.close()


def test_upload_retried_after_a_lost_answer_makes_one_job(server: Server, files: tuple[Path, Path]) -> None:
    transport = LoseFirstResponse()
    with SlimserveClient(server.url, ADMIN, transport=transport, backoff=0.05) as retrying:
        answer = retrying.upload(*files, {"name": "lost-answer"})
        model = retrying.model("lost-answer")
    assert len(transport.posts) == 2
    keys = {post.headers["Idempotency-Key"] for post in transport.posts}
    assert len(keys) == 1 and keys != {""}  # generated once per upload call, sent on both attempts
    assert model["latest_job"]["id"] == answer["job"]["id"]
    assert len(model["versions"]) == 1


def test_each_upload_call_gets_its_own_idempotency_key(client: SlimserveClient, files: tuple[Path, Path]) -> None:
    client.upload(*files, {"name": "fresh-key"})
    with pytest.raises(ApiError) as taken:  # not silently the first job again: a new key, so a conflict
        client.upload(*files, {"name": "fresh-key"})
    assert taken.value.status == 409
    assert taken.value.message and "\n" not in taken.value.message


def test_api_errors_carry_status_and_message(client: SlimserveClient, files: tuple[Path, Path]) -> None:
    with pytest.raises(ApiError) as missing_job:
        client.job("0" * 32)
    assert missing_job.value.status == 404 and missing_job.value.message
    with pytest.raises(ApiError) as missing_model:
        client.model("no-such-model")
    assert missing_model.value.status == 404
    with pytest.raises(ApiError) as bad_config:
        client.upload(*files, {"name": "typo", "max_acuracy_drop": 0.1})
    assert bad_config.value.status == 400 and "max_acuracy_drop" in bad_config.value.message


def test_keys_are_sent_and_scopes_enforced(server: Server, files: tuple[Path, Path]) -> None:
    with SlimserveClient(server.url) as anonymous, pytest.raises(ApiError) as no_key:
        anonymous.models()
    assert no_key.value.status == 401
    with SlimserveClient(server.url, INFER) as reader:
        assert isinstance(reader.models(), list)
        with pytest.raises(ApiError) as wrong_scope:
            reader.upload(*files, {"name": "reader-upload"})
    assert wrong_scope.value.status == 403


def test_cancel_delete_and_wait_timeout(client: SlimserveClient, files: tuple[Path, Path]) -> None:
    job = client.upload(*files, {"name": "short-lived"})["job"]
    seen: list[dict] = []
    with pytest.raises(Timeout):  # the worker is off: the job stays queued
        client.wait(job["id"], timeout=0.3, poll=0.1, on_progress=seen.append)
    assert seen and all(j["status"] == "queued" for j in seen)
    assert client.cancel(job["id"])["status"] == "cancelled"
    assert client.wait(job["id"], timeout=5)["status"] == "cancelled"
    client.delete("short-lived")
    with pytest.raises(ApiError) as gone:
        client.model("short-lived")
    assert gone.value.status == 404


def test_connection_failed_when_nothing_listens() -> None:
    with SlimserveClient(f"http://127.0.0.1:{free_port()}", retries=2, backoff=0.01) as lonely:
        with pytest.raises(ConnectionFailed):
            lonely.health()
        with pytest.raises(ConnectionFailed):
            lonely.delete("anything")


class Flaky:
    """A stdlib HTTP server answering 503 (with Retry-After) ``failures`` times, then 200."""

    def __init__(self, failures: int, retry_after: str) -> None:
        self.failures = failures
        self.retry_after = retry_after
        self.arrivals: list[tuple[str, float]] = []
        flaky = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                flaky.arrivals.append((self.command, time.monotonic()))
                if len(flaky.arrivals) <= flaky.failures:
                    body, status = b'{"error": "overloaded"}', 503
                else:
                    body, status = json.dumps({"id": "j", "status": "queued"}).encode(), 200
                self.send_response(status)
                if status == 503:
                    self.send_header("Retry-After", flaky.retry_after)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_DELETE = _answer

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> Flaky:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_503_is_retried_after_retry_after() -> None:
    with Flaky(failures=1, retry_after="1") as flaky, SlimserveClient(flaky.url, backoff=0.01) as patient:
        assert patient.job("j")["status"] == "queued"
    assert len(flaky.arrivals) == 2
    assert flaky.arrivals[1][1] - flaky.arrivals[0][1] >= 1.0  # waited as told, not the 0.01 s backoff


def test_503_is_not_retried_for_a_delete_and_gives_up_after_the_retries() -> None:
    with (
        Flaky(failures=1, retry_after="0") as flaky,
        SlimserveClient(flaky.url, backoff=0.01) as once,
        pytest.raises(ApiError) as refused,
    ):
        once.delete("m")
    assert refused.value.status == 503 and refused.value.message == "overloaded"
    assert len(flaky.arrivals) == 1
    with (
        Flaky(failures=10, retry_after="0") as flaky,
        SlimserveClient(flaky.url, retries=2) as bounded,
        pytest.raises(ApiError) as still,
    ):
        bounded.job("j")
    assert still.value.status == 503 and len(flaky.arrivals) == 3


def test_cli_jobs_models_and_exit_codes(
    server: Server, client: SlimserveClient, files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    job = client.upload(*files, {"name": "cli-listed"})["job"]
    common = ["--server", server.url, "--key", ADMIN]
    assert cli.main(["jobs", job["id"], *common]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == job["id"]
    assert cli.main(["models", *common]) == 0
    assert "cli-listed" in capsys.readouterr().out
    assert cli.main(["models", "cli-listed", *common]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "cli-listed"
    model, data = files
    submit = ["submit", str(model), "--data", str(data), *common]
    assert cli.main([*submit, "--name", "cli-listed"]) == 2  # 409: taken
    assert "409" in capsys.readouterr().err
    assert cli.main([*submit, "--name", "x", "--config", "[1]"]) == 2
    assert cli.main(["submit", "missing.onnx", "--data", str(data), "--name", "x", *common]) == 2
    assert cli.main(["jobs", "f" * 32, *common]) == 2
    assert cli.main(["models", "--server", f"http://127.0.0.1:{free_port()}"]) == 1


# -- with the worker on -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def worker_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server whose in-process worker runs jobs (no keys)."""
    with running_server(tmp_path_factory.mktemp("home-worker"), run_worker="true") as server:
        yield server


@pytest.fixture(scope="module")
def optimized(worker_server: Server, files: tuple[Path, Path]) -> tuple[str, int, dict]:
    """A model optimized by the real worker: (name, optimized version, that version's files)."""
    with SlimserveClient(worker_server.url) as client:
        job = client.upload(*files, {"name": "optimized", **FAST_JOB})["job"]
        done = client.wait(job["id"], timeout=240, poll=0.2)
        assert done["status"] == "succeeded", done
        version = next(v for v in client.model("optimized")["versions"] if v["number"] == done["version"])
    return "optimized", done["version"], version["files"]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_download_verifies_the_etag(worker_server: Server, optimized: tuple[str, int, dict], tmp_path: Path) -> None:
    name, version, files = optimized
    with SlimserveClient(worker_server.url) as client:
        for filename in ("model.onnx", "report.json", "report.html"):
            path = client.download(name, version, filename, tmp_path)
            assert path == tmp_path / filename
            assert _sha256(path) == files[filename]["sha256"]
            assert path.stat().st_size == files[filename]["size"]
    onnx.checker.check_model(onnx.load(str(tmp_path / "model.onnx")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "report.html", "report.json"]


class Recording(httpx.BaseTransport):
    """Passes requests through and keeps them (to see the Range header)."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.requests: list[httpx.Request] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


@pytest.mark.slow
def test_download_resumes_a_partial_file(
    worker_server: Server, optimized: tuple[str, int, dict], tmp_path: Path
) -> None:
    name, version, files = optimized
    with SlimserveClient(worker_server.url) as client:
        whole = client.download(name, version, "report.html", tmp_path / "whole.html").read_bytes()
    sha = files["report.html"]["sha256"]
    half = len(whole) // 2
    (tmp_path / f".report.html.{sha}.part").write_bytes(whole[:half])
    transport = Recording()
    with SlimserveClient(worker_server.url, transport=transport) as client:
        path = client.download(name, version, "report.html", tmp_path / "report.html")
    assert path.read_bytes() == whole
    assert transport.requests[-1].headers["Range"] == f"bytes={half}-"
    assert not list(tmp_path.glob(".*.part"))


class CutFirstDownload(httpx.BaseTransport):
    """Fault injection: the first GET's body breaks off (ReadError) after ``keep`` bytes."""

    def __init__(self, keep: int) -> None:
        self.inner = httpx.HTTPTransport()
        self.keep = keep
        self.requests: list[httpx.Request] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        response = self.inner.handle_request(request)
        if len(self.requests) > 1:
            return response
        body = response.read()[: self.keep]
        response.close()

        class Broken(httpx.SyncByteStream):
            def __iter__(self) -> Iterator[bytes]:
                yield body
                raise httpx.ReadError("connection reset mid-body", request=request)

        return httpx.Response(response.status_code, headers=response.headers, stream=Broken(), request=request)

    def close(self) -> None:
        self.inner.close()


@pytest.mark.slow
def test_interrupted_download_resumes_with_range(
    worker_server: Server, optimized: tuple[str, int, dict], tmp_path: Path
) -> None:
    name, version, files = optimized
    size = files["model.onnx"]["size"]
    transport = CutFirstDownload(keep=size // 3)
    with SlimserveClient(worker_server.url, transport=transport, backoff=0.01) as client:
        path = client.download(name, version, "model.onnx", tmp_path / "model.onnx")
    assert _sha256(path) == files["model.onnx"]["sha256"]
    assert "Range" not in transport.requests[0].headers
    assert transport.requests[1].headers["Range"] == f"bytes={size // 3}-"
    assert transport.requests[1].headers["If-Range"] == f'"{files["model.onnx"]["sha256"]}"'
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


@pytest.mark.slow
def test_corrupted_download_is_refused(worker_server: Server, optimized: tuple[str, int, dict], tmp_path: Path) -> None:
    name, version, files = optimized
    expected = files["report.json"]
    stored = [
        p
        for p in (worker_server.home / "artifacts").rglob("*")
        if p.is_file() and p.stat().st_size == expected["size"] and _sha256(p) == expected["sha256"]
    ]
    assert stored, "the stored report.json was not found in the artifact folder"
    original = stored[0].read_bytes()
    flipped = bytes([original[0] ^ 0x01]) + original[1:]  # same size, one bit off: what a bad disk does
    stored[0].write_bytes(flipped)
    try:
        with SlimserveClient(worker_server.url) as client, pytest.raises(ChecksumMismatch):
            client.download(name, version, "report.json", tmp_path / "report.json")
    finally:
        stored[0].write_bytes(original)
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temp file is left


@pytest.mark.slow
def test_submit_wait_downloads_the_results(worker_server: Server, files: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = files
    out = tmp_path / "results"
    command = [
        sys.executable, "-m", "service.cli", "submit", str(model), "--data", str(data), "--name", "cli-e2e",
        "--config", json.dumps(FAST_JOB), "--max-accuracy-drop", "0.05", "--wait", "--poll", "0.2",
        "--timeout", "240", "--out", str(out), "--server", worker_server.url,
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIMSERVE_")}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "report.html", "report.json"]
    report = json.loads((out / "report.json").read_text())
    assert report["chosen"]
    onnx.checker.check_model(onnx.load(str(out / "model.onnx")))
    assert "wrote" in done.stdout and "submitted cli-e2e" in done.stdout
