"""RELIABILITY.md, section "Sample data (.npz)", against a real `slimserve serve` and its in-process worker.

tests/security/test_bad_input.py already proves object arrays, huge or malformed ``.npy`` headers,
an archive with no input array, a wrong input name and a wrong feature count; tests/security/
test_fuzz_npz.py fuzzes the reader. Added here: empty arrays (refused at upload, 400) and the cases
only the job can see, because the upload check reads headers, never data: NaN and infinite values
and a dtype of another kind than the model's input. Each such job fails alone with a one-line
reason that names the input (and, for a dtype, what the model expects and what the data holds),
leaves only version 1, unserved, and the uploaded files; a valid upload is accepted after every case.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from tests.e2e.conftest import (
    MlpFiles,
    assert_clean_reason,
    assert_error,
    job_config,
    serving,
    stray_files,
    upload,
    version_rows,
)
from tests.security.support import assert_only_uploads, home_of, refused_cleanly, unique, valid_upload_accepted
from tests.serverproc import Proc, wait_job

ROWS = 32


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    """No keys, the in-process worker on and polling fast."""
    home = tmp_path_factory.mktemp("sample-data") / "home"
    with serving(home, poll_seconds="0.2", heartbeat_seconds="0.5", drain_seconds="0") as proc:
        proc.extra["home"] = str(home)
        yield proc


def npz(**arrays: np.ndarray) -> bytes:
    """A ``.npz`` archive in memory."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def _rows(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(ROWS, 16)).astype(np.float32)


def _labels(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4, ROWS)


@pytest.mark.parametrize(
    ("data", "array", "words"),
    [
        pytest.param(npz(x=np.zeros((0, 16), np.float32)), "x", "no samples", id="zero-rows"),
        pytest.param(npz(x=np.zeros((ROWS, 0), np.float32), labels=_labels(1)), "x", "empty", id="zero-features"),
        pytest.param(npz(x=_rows(2), labels=np.zeros(0, np.int64)), "labels", "no samples", id="empty-labels"),
    ],
)
def test_an_empty_array_is_400_naming_it(
    server: Proc, mlp_files: MlpFiles, data: bytes, array: str, words: str
) -> None:
    """An array with no samples, or samples with nothing in them, is refused at upload (from its header) with a
    400 that names the array; nothing is stored and a valid upload is accepted right after."""

    def send() -> httpx.Response:
        return upload(server.url, mlp_files.model, data, job_config(unique("empty")))

    message = refused_cleanly(server, mlp_files, send, 400, cancel=True)
    assert words in message and re.search(rf"\b{array}\b", message), message


def _fails_alone(server: Proc, mlp_files: MlpFiles, data: bytes) -> str:
    """Upload the MLP with ``data``: refused at upload (400) or a failed job that leaves only version 1, not
    served (the job's data was bad: its original is never validated), and only the uploaded files. The message."""
    name = unique("data")
    response = upload(server.url, mlp_files.model, data, job_config(name))
    home = home_of(server)
    if response.status_code == 400:
        message = assert_error(response, 400, home)
    else:
        assert response.status_code == 202, response.text
        job = wait_job(server.url, response.json()["job"]["id"], timeout=180)
        assert job["status"] == "failed", job
        message = assert_clean_reason(job["error"])
        assert [(v["number"], v["state"] == "ready") for v in version_rows(home, name)] == [(1, False)]
        assert_only_uploads(home, name)
    assert stray_files(home) == []
    return message


@pytest.mark.slow
def test_nan_or_infinite_inputs_fail_naming_the_input(server: Proc, mlp_files: MlpFiles) -> None:
    """Non-finite values among the inputs (a NaN and a -inf) cannot be used to measure accuracy: the job fails
    with a reason naming input ``x`` and what is wrong with it, and the server takes the next upload. (Each of
    NaN, +inf and -inf alone: tests/unit/test_data.py::test_validate_refuses_non_finite.)"""
    x = _rows(3)
    x[5, 7] = float("nan")
    x[9, 2] = float("-inf")
    message = _fails_alone(server, mlp_files, npz(x=x, labels=_labels(3)))
    assert "'x'" in message and "nan or infinite" in message.lower(), message
    valid_upload_accepted(server, mlp_files, cancel=True)


@pytest.mark.slow
def test_a_dtype_of_another_kind_fails_naming_input_expected_and_got(server: Proc, mlp_files: MlpFiles) -> None:
    """Integers for the model's float input are not cast silently: the reason names the input ``x``, the dtype the
    model expects (float32) and the one the data holds (int64)."""
    x = np.random.default_rng(4).integers(-3, 3, (ROWS, 16)).astype(np.int64)
    message = _fails_alone(server, mlp_files, npz(x=x, labels=_labels(4)))
    assert "'x'" in message and "float32" in message and "int64" in message, message
    valid_upload_accepted(server, mlp_files, cancel=True)
