"""Helpers shared by the adversarial tests: a leak-checked refusal, a URL trap, raw sockets, hostile models.

Nothing here starts a server: each test module starts its own (``tests.e2e.conftest.serving``).
"""

from __future__ import annotations

import contextlib
import itertools
import pickle
import socket
import threading
import zipfile
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path

import httpx
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.e2e.conftest import (
    MlpFiles,
    assert_error,
    db_rows,
    home_files,
    job_config,
    model_names,
    stray_files,
    upload,
)
from tests.serverproc import Proc

_names = itertools.count()


def unique(prefix: str) -> str:
    """A model name no other test of the session uses."""
    return f"{prefix}-{next(_names)}"


def home_of(proc: Proc) -> Path:
    """The server's ``SLIMSERVE_HOME`` (the fixtures put it in ``proc.extra``)."""
    return Path(proc.extra["home"])


def valid_upload_accepted(proc: Proc, mlp_files: MlpFiles, *, cancel: bool = False) -> None:
    """A valid upload right now is answered 202; with ``cancel``, its job is cancelled at once (a server with a
    worker then spends no time optimizing it: the refusal tests only need to see the upload accepted)."""
    ok = upload(proc.url, mlp_files.model, mlp_files.data, job_config(unique("ok")))
    assert ok.status_code == 202, ok.text
    if cancel:
        job_id = ok.json()["job"]["id"]
        cancelled = httpx.post(f"{proc.url}/v1/jobs/{job_id}/cancel", timeout=30)
        assert cancelled.status_code == 200, cancelled.text


def refused_cleanly(
    proc: Proc, mlp_files: MlpFiles, send: Callable[[], httpx.Response], status: int, *, cancel: bool = False
) -> str:
    """``send()`` is refused with ``status`` and a clean one-line error, leaves no model row and no file (staging
    included), and a valid upload right after it is accepted; the error message."""
    home = home_of(proc)
    names, files = model_names(home), home_files(home)
    message = assert_error(send(), status, home)
    assert model_names(home) == names, "a refused request left a model row"
    assert home_files(home) == files, f"a refused request left files: {sorted(home_files(home) - files)}"
    assert stray_files(home) == []
    valid_upload_accepted(proc, mlp_files, cancel=cancel)
    return message


def assert_only_uploads(home: Path, model: str) -> None:
    """The model's artifact folder holds only its uploaded files (no output of a failed job), and nothing staged."""
    ((prefix,),) = db_rows(home, "SELECT storage_prefix FROM models WHERE name = ?", (model,))
    folder = home / "artifacts" / "models" / prefix
    stored = sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())
    assert stored and all(name.startswith("uploads/") for name in stored), f"a failed job left outputs: {stored}"
    assert stray_files(home) == []


# --------------------------------------------------------------------------- a URL nobody may fetch


class UrlTrap:
    """A TCP listener on 127.0.0.1 that counts every connection made to it (and answers nothing)."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self._sock.settimeout(0.2)
        self.port = int(self._sock.getsockname()[1])
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="url-trap", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            conn.close()

    def __enter__(self) -> UrlTrap:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()


# --------------------------------------------------------------------------- raw HTTP


def host_port(proc: Proc) -> tuple[str, int]:
    """The server's address, for raw sockets."""
    host, port = proc.url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


@contextlib.contextmanager
def raw_connection(proc: Proc, first_bytes: bytes = b"", timeout: float = 30.0) -> Iterator[socket.socket]:
    """A plain TCP connection to the server that has sent ``first_bytes`` (then nothing more)."""
    sock = socket.create_connection(host_port(proc), timeout=timeout)
    try:
        if first_bytes:
            sock.sendall(first_bytes)
        yield sock
    finally:
        sock.close()


def read_until_closed(sock: socket.socket, limit: int = 1 << 16) -> bytes:
    """Everything the server sends until it closes the connection (``socket.timeout`` if it never does)."""
    out = bytearray()
    while len(out) < limit:
        chunk = sock.recv(4096)
        if not chunk:
            break
        out += chunk
    return bytes(out)


# --------------------------------------------------------------------------- hostile model files


def mlp_proto(mlp_files: MlpFiles) -> onnx.ModelProto:
    """A fresh, mutable copy of the valid MLP (``x[batch, 16] -> logits[batch, 4]``, initializers w1 b1 w2 b2)."""
    return onnx.load_from_string(mlp_files.model.read_bytes())


def with_external_w1(mlp_files: MlpFiles, **entries: str) -> bytes:
    """The MLP with initializer ``w1`` moved to "external data" described by ``entries`` (its bytes dropped)."""
    model = mlp_proto(mlp_files)
    (w1,) = [t for t in model.graph.initializer if t.name == "w1"]
    w1.ClearField("raw_data")
    w1.ClearField("float_data")
    w1.data_location = TensorProto.EXTERNAL
    for key, value in entries.items():
        w1.external_data.add(key=key, value=value)
    return model.SerializeToString()


def with_huge_initializer(mlp_files: MlpFiles) -> bytes:
    """The MLP whose ``w1`` declares 2**40 x 2**30 floats (4 EiB) and carries no bytes at all."""
    model = mlp_proto(mlp_files)
    (w1,) = [t for t in model.graph.initializer if t.name == "w1"]
    w1.ClearField("raw_data")
    w1.ClearField("float_data")
    del w1.dims[:]
    w1.dims.extend([2**40, 2**30])
    return model.SerializeToString()


def with_custom_domain(mlp_files: MlpFiles, domain: str = "com.evil.ops") -> bytes:
    """The MLP whose ReLU is an op of an unknown custom domain (ONNX Runtime would need an op library)."""
    model = mlp_proto(mlp_files)
    (relu,) = [n for n in model.graph.node if n.op_type == "Relu"]
    relu.domain = domain
    relu.op_type = "Backdoor"
    model.opset_import.append(helper.make_opsetid(domain, 1))
    return model.SerializeToString()


def with_gather_out_of_range(mlp_files: MlpFiles) -> bytes:
    """The MLP with ``x`` first gathered by constant column indices, one of them 1000 (x has 16 columns).

    Valid for onnx.checker and ONNX Runtime's session creation (index values are not checked until run
    time); the first inference fails.
    """
    model = mlp_proto(mlp_files)
    indices = np.arange(16, dtype=np.int64)
    indices[7] = 1000
    model.graph.initializer.append(numpy_helper.from_array(indices, "cols"))
    gather = helper.make_node("Gather", ["x", "cols"], ["x_cols"], axis=1, name="pick")
    nodes = list(model.graph.node)
    nodes[0].input[0] = "x_cols"
    del model.graph.node[:]
    model.graph.node.extend([gather, *nodes])
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


class PickleCanary:
    """Unpickling this creates the file at ``path``: nothing may ever unpickle an uploaded model."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.path), "w"))


def torchscript_shaped(canary: Path) -> bytes:
    """A zip laid out as TorchScript writes it (``code/``, ``constants.pkl``) around a hostile ``data.pkl``."""
    buffer = BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("m/data.pkl", pickle.dumps(PickleCanary(canary), protocol=2))
        archive.writestr("m/constants.pkl", pickle.dumps((), protocol=2))
        archive.writestr("m/code/__torch__.py", "")
        archive.writestr("m/version", "8\n")
    return buffer.getvalue()


def torch_save_shaped(canary: Path) -> bytes:
    """A zip laid out as ``torch.save`` writes a checkpoint (``data.pkl``, no code): a pickle, not a program."""
    buffer = BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps(PickleCanary(canary), protocol=2))
        archive.writestr("archive/version", "3\n")
    return buffer.getvalue()
