"""Bad uploads against a real `slimserve serve`: the right status, a clean one-line error, nothing left behind.

Every refused upload is checked the same way: status and ``{"error": ...}`` without a path in
it, no new model row, no file added anywhere under ``SLIMSERVE_HOME`` (staging included), and a
valid upload right after it is accepted (202). Refusals run against ``intake`` (no worker, small
limits); bad inputs that only a job can detect run against ``jobs_server`` (worker on).
"""

from __future__ import annotations

import gzip
import io
import itertools
import pickle
import re
import struct
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.e2e.conftest import (
    MlpFiles,
    assert_clean_reason,
    assert_error,
    home_files,
    job_config,
    model_names,
    multipart_body,
    serving,
    stray_files,
    upload,
)
from tests.serverproc import Proc, wait_job

LIMIT = 100_000  # max_upload_bytes and max_data_bytes of the intake server
_names = itertools.count()


@pytest.fixture(scope="module")
def intake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    """Worker off (accepted jobs just queue), 100 kB limits for the model and the data."""
    home = tmp_path_factory.mktemp("bad-intake") / "home"
    with serving(home, run_worker="false", max_upload_bytes=str(LIMIT), max_data_bytes=str(LIMIT)) as proc:
        proc.extra["home"] = str(home)
        yield proc


@pytest.fixture(scope="module")
def jobs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    """The in-process worker on, polling fast."""
    home = tmp_path_factory.mktemp("bad-jobs") / "home"
    with serving(home, poll_seconds="0.2", heartbeat_seconds="0.5") as proc:
        proc.extra["home"] = str(home)
        yield proc


def refused_cleanly(proc: Proc, mlp_files: MlpFiles, send: Callable[[], httpx.Response], status: int) -> str:
    """``send()`` is refused with ``status``, leaves no row and no file, and a valid upload then works."""
    home = Path(proc.extra["home"])
    names, files = model_names(home), home_files(home)
    message = assert_error(send(), status, home)
    assert model_names(home) == names, "a refused upload left a model row"
    assert home_files(home) == files, f"a refused upload left files: {sorted(home_files(home) - files)}"
    assert stray_files(home) == []
    ok = upload(proc.url, mlp_files.model, mlp_files.data, job_config(f"ok-{next(_names)}"))
    assert ok.status_code == 202, ok.text
    return message


# --------------------------------------------------------------------------- bodies


def npz_bytes(**arrays: np.ndarray) -> bytes:
    """A .npz archive in memory (object arrays pickled, as numpy allows on save)."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def npz_with_header(header: bytes, payload: bytes = b"") -> bytes:
    """A .npz whose ``x.npy`` member carries ``header`` (the .npy dict text) verbatim."""
    padded = header + b" " * ((-(10 + len(header) + 1)) % 64) + b"\n"
    member = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(padded)) + padded + payload
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("x.npy", member)
    return buffer.getvalue()


def zip_bytes(**members: bytes) -> bytes:
    """A plain zip archive."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, payload in members.items():
            archive.writestr(name, payload)
    return buffer.getvalue()


class Canary:
    """Unpickling this would create a file; nothing may ever unpickle it."""

    def __reduce__(self) -> tuple[object, tuple[str, ...]]:
        return (exec, ("open('/tmp/slimserve-e2e-canary', 'w').write('pwned')",))


# --------------------------------------------------------------------------- size limits


def test_body_over_the_limit_by_content_length_is_413(intake: Proc, mlp_files: MlpFiles) -> None:
    big = b"\x08\x08" + bytes(4 * LIMIT)  # Content-Length alone is over every part's limit combined

    def send() -> httpx.Response:
        return upload(intake.url, big, mlp_files.data, job_config("big"))

    refused_cleanly(intake, mlp_files, send, 413)


def test_model_part_over_its_limit_is_413(intake: Proc, mlp_files: MlpFiles) -> None:
    big = b"\x08\x08" + bytes(LIMIT + 10)  # the body would fit the envelope: the running count catches it
    refused_cleanly(intake, mlp_files, lambda: upload(intake.url, big, mlp_files.data, job_config("big")), 413)


def test_data_part_over_its_limit_is_413(intake: Proc, mlp_files: MlpFiles) -> None:
    data = npz_bytes(x=np.zeros((LIMIT // 64 + 10, 16), np.float32))
    refused_cleanly(intake, mlp_files, lambda: upload(intake.url, mlp_files.model, data, job_config("big")), 413)


def test_chunked_body_over_the_limit_is_413(intake: Proc, mlp_files: MlpFiles) -> None:
    boundary = "e2e-chunked-boundary"
    body = multipart_body(
        [
            ("config", None, b'{"name": "chunky"}'),
            ("data", "data.npz", mlp_files.data.read_bytes()),
            ("model", "model.onnx", b"\x08\x08" + bytes(3 * LIMIT)),
        ],
        boundary,
    )

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 16 * 1024):
            yield body[start : start + 16 * 1024]

    def send() -> httpx.Response:
        return httpx.post(
            f"{intake.url}/v1/models",
            content=chunks(),
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
            timeout=60,
        )

    refused_cleanly(intake, mlp_files, send, 413)


# --------------------------------------------------------------------------- model formats


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(pickle.dumps(Canary(), protocol=4), id="pickle-renamed-onnx"),
        pytest.param(zip_bytes(**{"weights/readme.txt": b"hello", "other.bin": b"\x00" * 100}), id="zip-not-torch"),
        pytest.param(b"\xde\xad\xbe\xef" + np.random.default_rng(7).bytes(4092), id="random-bytes"),
    ],
)
def test_not_a_model_is_415(intake: Proc, mlp_files: MlpFiles, payload: bytes) -> None:
    canary = Path("/tmp/slimserve-e2e-canary")
    canary.unlink(missing_ok=True)
    refused_cleanly(intake, mlp_files, lambda: upload(intake.url, payload, mlp_files.data, job_config("fmt")), 415)
    assert not canary.exists(), "the uploaded pickle was deserialised"


# --------------------------------------------------------------------------- sample data


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(npz_bytes(x=np.array([{"a": 1}, None], dtype=object)), id="object-array"),
        pytest.param(
            npz_with_header(b"{'descr': '<f4', 'fortran_order': False, 'shape': (10**12, 16), }"),
            id="expression-in-shape",
        ),
        pytest.param(
            npz_with_header(b"{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000000000, 16)}"),
            id="huge-shape",
        ),
        pytest.param(npz_with_header(b"{'descr': <f4 'shape': ((("), id="malformed-header"),
        pytest.param(npz_with_header(b"__import__('os').system('touch /tmp/slimserve-e2e-canary')"), id="code-header"),
        pytest.param(b"this is not a zip archive at all\n" * 20, id="not-a-zip"),
        pytest.param(npz_bytes(labels=np.zeros(8, np.int64)), id="no-input-array"),
    ],
)
def test_bad_sample_data_is_400(intake: Proc, mlp_files: MlpFiles, data: bytes) -> None:
    canary = Path("/tmp/slimserve-e2e-canary")
    canary.unlink(missing_ok=True)
    refused_cleanly(intake, mlp_files, lambda: upload(intake.url, mlp_files.model, data, job_config("data")), 400)
    assert not canary.exists()


# --------------------------------------------------------------------------- config and names


@pytest.mark.parametrize(
    "config",
    [
        pytest.param('{"name": "c", "max_accuracy_drop": 0.01, "colour": "blue"}', id="unknown-key"),
        pytest.param('{"name": "c", ', id="not-json"),
        pytest.param('["name", "c"]', id="not-an-object"),
        pytest.param('{"max_accuracy_drop": 0.01}', id="no-name"),
        pytest.param('{"name": "c", "max_accuracy_drop": -1}', id="negative-drop"),
        pytest.param('{"name": "c", "techniques": ["no-such-technique"]}', id="unknown-technique"),
    ],
)
def test_bad_config_is_400(intake: Proc, mlp_files: MlpFiles, config: str) -> None:
    refused_cleanly(intake, mlp_files, lambda: upload(intake.url, mlp_files.model, mlp_files.data, config), 400)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("../x", id="dotdot"),
        pytest.param("a/b", id="slash"),
        pytest.param("a\x00b", id="nul"),
        pytest.param("n" * 300, id="300-chars"),
        pytest.param("m\u043edel", id="cyrillic-o"),
        pytest.param("\uff4d\uff4f\uff44\uff45\uff4c", id="fullwidth"),
        pytest.param("", id="empty"),
        pytest.param("..", id="dots"),
    ],
)
def test_bad_model_name_is_400(intake: Proc, mlp_files: MlpFiles, name: str) -> None:
    def send() -> httpx.Response:
        return upload(intake.url, mlp_files.model, mlp_files.data, {"name": name})

    refused_cleanly(intake, mlp_files, send, 400)


def test_missing_data_part_is_400(intake: Proc, mlp_files: MlpFiles) -> None:
    refused_cleanly(intake, mlp_files, lambda: upload(intake.url, mlp_files.model, None, job_config("nodata")), 400)


def test_missing_model_part_is_400(intake: Proc, mlp_files: MlpFiles) -> None:
    refused_cleanly(intake, mlp_files, lambda: upload(intake.url, None, mlp_files.data, job_config("nomodel")), 400)


def test_not_multipart_is_400(intake: Proc, mlp_files: MlpFiles) -> None:
    def send() -> httpx.Response:
        return httpx.post(f"{intake.url}/v1/models", json={"name": "json"}, timeout=30)

    refused_cleanly(intake, mlp_files, send, 400)


def test_compressed_body_is_415(intake: Proc, mlp_files: MlpFiles) -> None:
    def send() -> httpx.Response:
        headers = {"Content-Encoding": "gzip", "Content-Type": "multipart/form-data; boundary=x"}
        return httpx.post(f"{intake.url}/v1/models", content=gzip.compress(b"--x--\r\n"), headers=headers, timeout=30)

    refused_cleanly(intake, mlp_files, send, 415)


def test_duplicate_name_is_409(intake: Proc, mlp_files: MlpFiles) -> None:
    first = upload(intake.url, mlp_files.model, mlp_files.data, job_config("taken"))
    assert first.status_code == 202, first.text
    message = refused_cleanly(
        intake, mlp_files, lambda: upload(intake.url, mlp_files.model, mlp_files.data, job_config("taken")), 409
    )
    assert "taken" in message


# --------------------------------------------------------------------------- found by the job


def _fails_naming_the_input(proc: Proc, mlp_files: MlpFiles, name: str, data: bytes) -> None:
    response = upload(proc.url, mlp_files.model, data, job_config(name))
    if response.status_code == 400:  # refused at upload is allowed too, with the same message
        message = assert_error(response, 400, Path(proc.extra["home"]))
    else:
        assert response.status_code == 202, response.text
        job = wait_job(proc.url, response.json()["job"]["id"], timeout=120)
        assert job["status"] == "failed", job
        message = assert_clean_reason(job["error"])
    assert re.search(r"\bx\b", message), f"error does not name the input 'x': {message}"


@pytest.mark.slow
def test_sample_data_with_a_wrong_input_name_fails_naming_it(jobs_server: Proc, mlp_files: MlpFiles) -> None:
    rng = np.random.default_rng(3)
    data = npz_bytes(y=rng.normal(size=(32, 16)).astype(np.float32), labels=rng.integers(0, 4, 32))
    _fails_naming_the_input(jobs_server, mlp_files, "wrong-input", data)


@pytest.mark.slow
def test_sample_data_with_a_wrong_feature_count_fails_naming_it(jobs_server: Proc, mlp_files: MlpFiles) -> None:
    rng = np.random.default_rng(4)
    data = npz_bytes(x=rng.normal(size=(32, 8)).astype(np.float32), labels=rng.integers(0, 4, 32))
    _fails_naming_the_input(jobs_server, mlp_files, "wrong-width", data)


def _broken_models(model: Path) -> dict[str, bytes]:
    raw = model.read_bytes()
    flipped = bytearray(raw)
    for index in range(8, 40):  # the start stays ONNX-looking; the graph's framing is garbage
        flipped[index] ^= 0xFF
    return {"truncated": raw[: len(raw) // 2], "bit-flipped": bytes(flipped)}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["truncated", "bit-flipped"])
def test_corrupt_onnx_fails_its_job_as_invalid(jobs_server: Proc, mlp_files: MlpFiles, kind: str) -> None:
    payload = _broken_models(mlp_files.model)[kind]
    response = upload(jobs_server.url, payload, mlp_files.data, job_config(f"corrupt-{kind}"))
    assert response.status_code == 202, response.text
    job = wait_job(jobs_server.url, response.json()["job"]["id"], timeout=120)
    assert job["status"] == "failed", job
    assert "invalid onnx model" in assert_clean_reason(job["error"]).lower(), job["error"]
    model = httpx.get(f"{jobs_server.url}/v1/models/corrupt-{kind}", timeout=30).json()
    assert [(v["number"], v["state"]) for v in model["versions"]] == [(1, "failed")]


@pytest.mark.slow
def test_the_server_stays_up_and_the_next_job_succeeds(jobs_server: Proc, mlp_files: MlpFiles) -> None:
    assert jobs_server.popen.poll() is None
    assert httpx.get(f"{jobs_server.url}/v1/health", timeout=10).status_code == 200
    response = upload(jobs_server.url, mlp_files.model, mlp_files.data, job_config("after-bad"))
    assert response.status_code == 202, response.text
    job = wait_job(jobs_server.url, response.json()["job"]["id"], timeout=180)
    assert job["status"] == "succeeded", job
    assert job["version"] == 2
