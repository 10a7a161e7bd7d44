"""RELIABILITY.md, section "Model files", against a real `slimserve serve` and its in-process worker.

What tests/security/test_bad_input.py already proves is not repeated here (a plain pickle named
``.onnx``, a zip that is no PyTorch program, random bytes: 415; truncated and bit-flipped ONNX: a
failed job, "invalid ONNX model"). This module adds the cases only the real pipeline can show:

* at upload (415, nothing stored): a pickle named ``.pt``, a ``torch.save`` checkpoint, zip bombs
  (member count, compression ratio, a compression method without a size bound); a valid ONNX file
  named ``.pt`` is taken as ONNX (the bytes decide, never the name);
* in the job (the sandboxed child): a TorchScript-shaped archive around a pickle canary, ONNX
  external data that escapes the upload (``../``, absolute, a URL) or lies (unknown key, negative or
  huge offset), an initializer declaring 4 EiB, an unknown custom-op domain, and a model that loads
  but fails its first inference. Each job fails alone with a clean one-line reason, leaves version 1
  ``failed`` with only the uploaded files under its prefix, and the server keeps going: the last test
  runs a real optimization to success after all of them.

The hostile jobs are uploaded together when the module starts (``hostile_jobs``), so the worker
works through them while the upload-time tests run; the valid uploads those tests make queue behind
them and are cancelled at once (no optimization time is spent on them).
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import (
    MlpFiles,
    assert_clean_reason,
    job_config,
    serving,
    upload,
    version_rows,
)
from tests.security.support import (
    PickleCanary,
    UrlTrap,
    assert_only_uploads,
    home_of,
    refused_cleanly,
    torch_save_shaped,
    torchscript_shaped,
    unique,
    valid_upload_accepted,
    with_custom_domain,
    with_external_w1,
    with_gather_out_of_range,
    with_huge_initializer,
)
from tests.serverproc import Proc, wait_job


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    """No keys, the in-process worker on and polling fast."""
    home = tmp_path_factory.mktemp("model-files") / "home"
    with serving(home, poll_seconds="0.2", heartbeat_seconds="0.5", drain_seconds="0") as proc:
        proc.extra["home"] = str(home)
        yield proc


@pytest.fixture(scope="module")
def trap() -> Iterator[UrlTrap]:
    """A listener that counts connections: a model that names its URL must never make the server call it."""
    with UrlTrap() as listener:
        yield listener


@pytest.fixture(scope="module")
def canary_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the pickle canaries would appear if anything unpickled them."""
    return tmp_path_factory.mktemp("canaries")


# --------------------------------------------------------------------------- refused at upload


def _zip(members: list[tuple[str, bytes]], method: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=method) as archive:
        for name, payload in members:
            archive.writestr(name, payload)
    return buffer.getvalue()


def _torchscript_members(data_pkl: bytes) -> list[tuple[str, bytes]]:
    return [("m/data.pkl", data_pkl), ("m/constants.pkl", b"\x80\x02)."), ("m/code/__torch__.py", b"")]


def test_a_pickle_named_pt_is_415_and_never_unpickled(server: Proc, mlp_files: MlpFiles, canary_dir: Path) -> None:
    """A plain pickle uploaded as ``model.pt`` (the name PyTorch users give it) is refused by its bytes, and the
    canary it would create on unpickling never appears.

    CVE-2025-32434 (PyTorch <= 2.5.1: ``torch.load(..., weights_only=True)`` could still be driven to run code by a
    crafted file): an uploaded pickle is never handed to any unpickler, restricted or not.
    """
    canary = canary_dir / "plain-pickle"
    payload = pickle.dumps(PickleCanary(canary), protocol=4)

    def send() -> httpx.Response:
        return upload(server.url, payload, mlp_files.data, job_config(unique("pt")), model_filename="model.pt")

    message = refused_cleanly(server, mlp_files, send, 415, cancel=True)
    assert "pickle" in message.lower(), message
    assert not canary.exists(), "the uploaded pickle was deserialised"


def test_a_torch_save_checkpoint_is_415_and_never_unpickled(
    server: Proc, mlp_files: MlpFiles, canary_dir: Path
) -> None:
    """The zip layout ``torch.save`` writes (``data.pkl`` and no code) is a pickled checkpoint, not a program: 415
    naming ``torch.save``, decided from the archive's directory without reading ``data.pkl``.

    CVE-2025-32434: the class of file ``torch.load`` was unsafe on even with ``weights_only=True``.
    """
    canary = canary_dir / "torch-save"

    def send() -> httpx.Response:
        payload = torch_save_shaped(canary)
        return upload(server.url, payload, mlp_files.data, job_config(unique("ckpt")), model_filename="model.pt")

    assert "torch.save" in refused_cleanly(server, mlp_files, send, 415, cancel=True)
    assert not canary.exists()


def _many_members() -> bytes:
    return _zip([*_torchscript_members(b"\x80\x02."), *((f"m/extra/{i}", b"") for i in range(10_001))])


def _high_ratio() -> bytes:
    return _zip(_torchscript_members(b"\0" * (8 << 20)), zipfile.ZIP_DEFLATED)


def _lzma_member() -> bytes:
    return _zip(_torchscript_members(b"\x80\x02."), zipfile.ZIP_LZMA)


#: Zip bombs shaped as TorchScript archives (built when the test runs) and what the refusal names.
ZIP_BOMBS = [
    pytest.param(_many_members, "members", id="10001-members"),
    pytest.param(_high_ratio, "compression ratio", id="ratio-1000"),
    pytest.param(_lzma_member, "compression method", id="lzma-member"),
]


@pytest.mark.parametrize(("build", "reason"), ZIP_BOMBS)
def test_a_zip_bomb_model_is_415_from_its_directory(
    server: Proc, mlp_files: MlpFiles, build: Callable[[], bytes], reason: str
) -> None:
    """A TorchScript-shaped archive that is a zip bomb is refused from its central directory (member count, a
    member's inflate ratio, a compression method whose inflated size zipfile does not bound) before anything is
    inflated: 415 at upload, nothing stored.

    CVE-2024-0450 (CPython zipfile: "quoted-overlap" zip bombs) and CVE-2019-9674 (CPython zipfile: denial of
    service by a zip bomb): sizes and counts are taken from the directory and bounded first.
    """
    payload = build()

    def send() -> httpx.Response:
        return upload(server.url, payload, mlp_files.data, job_config(unique("bomb")), model_filename="model.pt")

    assert reason in refused_cleanly(server, mlp_files, send, 415, cancel=True)


def test_a_valid_onnx_named_pt_is_taken_as_onnx(server: Proc, mlp_files: MlpFiles) -> None:
    """The format comes from the bytes, not the name: the MLP uploaded as ``weights.pt`` is accepted and stored as
    ``original.onnx``."""
    name = unique("named-pt")
    response = upload(server.url, mlp_files.model, mlp_files.data, job_config(name), model_filename="weights.pt")
    assert response.status_code == 202, response.text
    httpx.post(f"{server.url}/v1/jobs/{response.json()['job']['id']}/cancel", timeout=30)
    (first,) = version_rows(home_of(server), name)[:1]
    assert "original.onnx" in first["files"], first["files"]


# --------------------------------------------------------------------------- refused by the job


#: What each job-time case's reason must say (lowercase).
REASONS = {
    "torchscript-pickle": "torchscript",
    "external-dotdot": "leaves the model's folder",
    "external-absolute": "absolute path",
    "external-url": "invalid location",
    "external-unknown-key": "unknown external-data key",
    "external-negative-offset": "offset",
    "external-huge-offset": "past its file's end",
    "huge-initializer": "'w1' has more than",
    "custom-op-domain": "unknown operator domain 'com.evil.ops'",
    "fails-first-inference": "fails its warm-up inference",
}


def hostile_models(mlp_files: MlpFiles, trap: UrlTrap, canary_dir: Path) -> dict[str, bytes]:
    """Every job-time case's model bytes, by name (the keys of ``REASONS``)."""
    return {
        "torchscript-pickle": torchscript_shaped(canary_dir / "torchscript"),
        "external-dotdot": with_external_w1(mlp_files, location="../../../slimserve.db"),
        "external-absolute": with_external_w1(mlp_files, location="/etc/passwd"),
        "external-url": with_external_w1(mlp_files, location=f"{trap.url}/w1.bin"),
        "external-unknown-key": with_external_w1(mlp_files, location="data.npz", url=f"{trap.url}/w1.bin"),
        "external-negative-offset": with_external_w1(mlp_files, location="data.npz", offset="-8", length="2048"),
        "external-huge-offset": with_external_w1(mlp_files, location="data.npz", offset=str(2**62), length="2048"),
        "huge-initializer": with_huge_initializer(mlp_files),
        "custom-op-domain": with_custom_domain(mlp_files),
        "fails-first-inference": with_gather_out_of_range(mlp_files),
    }


@dataclass(frozen=True)
class Submitted:
    """A hostile upload the server accepted: its model name and job id."""

    name: str
    job_id: str


@pytest.fixture(scope="module", autouse=True)
def hostile_jobs(server: Proc, mlp_files: MlpFiles, trap: UrlTrap, canary_dir: Path) -> dict[str, Submitted]:
    """Every job-time case uploaded at once when the module starts (each answered 202: the API never opens a model
    itself); the worker works through them while the upload-time tests run, whose valid uploads then queue behind
    them and are cancelled before they start."""
    submitted = {}
    for case, payload in hostile_models(mlp_files, trap, canary_dir).items():
        name = unique(case)
        response = upload(server.url, payload, mlp_files.data, job_config(name))
        assert response.status_code == 202, (case, response.text)
        submitted[case] = Submitted(name, response.json()["job"]["id"])
    return submitted


def _failed_alone(server: Proc, submitted: Submitted) -> str:
    """The job failed with a clean reason; version 1 is ``failed``; only the uploaded files are stored; the reason."""
    job = wait_job(server.url, submitted.job_id, timeout=180)
    assert job["status"] == "failed", job
    reason = assert_clean_reason(job["error"])
    home = home_of(server)
    assert [(v["number"], v["state"]) for v in version_rows(home, submitted.name)] == [(1, "failed")]
    assert_only_uploads(home, submitted.name)
    return reason


@pytest.mark.slow
def test_a_torchscript_archive_with_a_pickle_payload_fails_without_running_it(
    server: Proc, hostile_jobs: dict[str, Submitted], canary_dir: Path
) -> None:
    """An archive laid out as TorchScript writes it but whose ``data.pkl`` is a hostile pickle reaches the sandbox
    (only there is a PyTorch file opened, with torch's restricted loader) and fails its job; the canary the pickle
    would create never appears, in the child or anywhere.

    CVE-2025-32434 (PyTorch <= 2.5.1: remote code execution through ``torch.load`` even with
    ``weights_only=True``): the file is opened only in the sandbox, never by an unrestricted unpickler.
    """
    reason = _failed_alone(server, hostile_jobs["torchscript-pickle"])
    assert "torchscript" in reason.lower(), reason
    assert not (canary_dir / "torchscript").exists(), "the hostile pickle ran"


EXTERNAL = ["external-dotdot", "external-absolute", "external-url", "external-unknown-key"]
OFFSETS = ["external-negative-offset", "external-huge-offset"]


@pytest.mark.slow
@pytest.mark.parametrize("case", EXTERNAL)
def test_external_data_outside_the_upload_fails_the_job(
    server: Proc, hostile_jobs: dict[str, Submitted], trap: UrlTrap, case: str
) -> None:
    """An ONNX initializer whose external data points outside the upload (``../../../slimserve.db``, ``/etc/passwd``,
    a URL) or carries an unknown key (here a URL) fails the job as an invalid ONNX model before ONNX Runtime reads
    anything; the reason names no path, and no connection ever reaches the URL.

    CVE-2022-25882 (onnx < 1.13: the external_data location could read any file, e.g. ``../../../etc/passwd``) and
    CVE-2024-27318 (onnx 1.15: the first fix bypassed by a location such as ``a/../../b``); CVE-2023-43654
    (TorchServe: a model URL made the server fetch from anywhere, SSRF): a model never makes the server fetch.
    """
    reason = _failed_alone(server, hostile_jobs[case])
    assert "invalid onnx model" in reason.lower() and REASONS[case] in reason.lower(), reason
    assert "passwd" not in reason and "slimserve.db" not in reason, reason
    assert trap.connections == 0, "the server connected to a URL named by an uploaded model"


@pytest.mark.slow
@pytest.mark.parametrize("case", OFFSETS)
def test_external_data_with_a_negative_or_huge_offset_fails_the_job(
    server: Proc, hostile_jobs: dict[str, Submitted], case: str
) -> None:
    """External data inside the upload (the sample data file next to the model) but at offset -8 or 2**62 is refused
    by the static checks: an invalid ONNX model, not a seek or read past the file."""
    reason = _failed_alone(server, hostile_jobs[case])
    assert "invalid onnx model" in reason.lower() and REASONS[case] in reason.lower(), reason


@pytest.mark.slow
def test_an_initializer_declaring_exabytes_fails_before_allocating(
    server: Proc, hostile_jobs: dict[str, Submitted]
) -> None:
    """``w1`` declares 2**40 x 2**30 floats and carries no bytes: refused by the declared-size check (the element
    limit is named), not by running out of memory trying to build it."""
    reason = _failed_alone(server, hostile_jobs["huge-initializer"])
    assert "'w1' has more than" in reason and "elements" in reason, reason
    assert "memory" not in reason.lower(), reason


@pytest.mark.slow
def test_an_unknown_custom_op_domain_fails_the_job(server: Proc, hostile_jobs: dict[str, Submitted]) -> None:
    """A node of domain ``com.evil.ops`` would need a custom-op library: refused by the domain allow-list (no op
    library is ever loaded), the domain named in the reason."""
    reason = _failed_alone(server, hostile_jobs["custom-op-domain"])
    assert "unknown operator domain 'com.evil.ops'" in reason, reason


@pytest.mark.slow
def test_a_model_that_fails_its_first_inference_fails_its_warm_up(
    server: Proc, hostile_jobs: dict[str, Submitted]
) -> None:
    """The model passes onnx.checker and ONNX Runtime builds a session for it, but its first inference gathers
    column 1000 of a 16-column input: the warm-up inside the sandbox fails the job with ONNX Runtime's reason."""
    reason = _failed_alone(server, hostile_jobs["fails-first-inference"])
    assert "fails its warm-up inference" in reason, reason


@pytest.mark.slow
def test_after_every_hostile_model_the_next_job_succeeds(
    server: Proc, mlp_files: MlpFiles, hostile_jobs: dict[str, Submitted], trap: UrlTrap
) -> None:
    """Every hostile job above failed alone: the same server process is up, lists every model, and optimizes a
    valid upload to success; nothing ever connected to the trap."""
    for submitted in hostile_jobs.values():
        assert wait_job(server.url, submitted.job_id, timeout=180)["status"] == "failed"
    assert server.popen.poll() is None
    listed = {m["name"] for m in httpx.get(f"{server.url}/v1/models", timeout=30).json()["models"]}
    assert {s.name for s in hostile_jobs.values()} <= listed
    name = unique("after-hostile")
    response = upload(server.url, mlp_files.model, mlp_files.data, job_config(name))
    assert response.status_code == 202, response.text
    job = wait_job(server.url, response.json()["job"]["id"], timeout=180)
    assert job["status"] == "succeeded", job
    served = httpx.get(f"{server.url}/v1/models/{name}", timeout=30).json()
    assert served["default_version"] == 2, served
    assert trap.connections == 0
    valid_upload_accepted(server, mlp_files, cancel=True)
