"""Shared by the serving fault tests: a seed home with two served models, a server on a copy of it, requests.

The models are uploaded once (``build_seed``: the tiny MLP ``m`` and ``slow``, jobs succeeded, server
stopped); each fault server starts on its own copy of that home, with no worker. ``slow`` is the MLP's
shape with a spin loop: ``x[batch, 16] -> x @ w``, plus a Loop that runs ``max(x) - 1000`` empty
iterations (about 2 µs each) and adds nothing. Normal inputs are instant; a request holding
``1000 + SPINS`` keeps the version's single batch slot busy for a few seconds, so the tests can
hold a batch in flight and queue requests behind it without relying on timing.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from tests.e2e.conftest import MlpFiles, assert_error, metric, serving, upload_and_wait, version_rows
from tests.faults.invariants import Ledger, assert_invariants
from tests.serverproc import Proc, wait_for

FEATURES = 16
CLASSES = 4
#: Empty loop iterations of the slow request: a few seconds of one busy batch slot.
SPINS = 1_500_000
#: Every server here: no worker, fast registry polling, no drain wait on stop.
BASE = {"run_worker": "false", "registry_poll_seconds": "0.2", "drain_seconds": "0"}


def slow_onnx(path: Path, threshold: float = 1000.0) -> Path:
    """``logits = x @ w`` (+ 0 * the count of a Loop that spins ``max(0, max(x) - threshold)`` times)."""
    rng = np.random.default_rng(3)
    weights = rng.normal(0, 0.5, (FEATURES, CLASSES)).astype(np.float32)
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["acc_in", "one"], ["acc_out"]),
        ],
        "spin",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, []),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, []),
        ],
        [numpy_helper.from_array(np.array(1.0, np.float32), "one")],
    )
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("ReduceMax", ["x"], ["peak"], keepdims=0),
        helper.make_node("Sub", ["peak", "threshold"], ["over"]),
        helper.make_node("Relu", ["over"], ["spins_f"]),
        helper.make_node("Cast", ["spins_f"], ["spins"], to=TensorProto.INT64),
        helper.make_node("Loop", ["spins", "", "zero"], ["count"], body=body),
        helper.make_node("Mul", ["count", "zero"], ["nothing"]),
        helper.make_node("Add", ["h", "nothing"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", FEATURES])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
        [
            numpy_helper.from_array(weights, "w"),
            numpy_helper.from_array(np.array(threshold, np.float32), "threshold"),
            numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


@dataclass
class Seed:
    """A stopped server's home holding ``m`` and ``slow`` (versions 1 and 2 each), and a session per version."""

    home: Path
    sessions: dict[tuple[str, int], ort.InferenceSession]
    ledger: Ledger

    def expected(self, model: str, version: int, x: np.ndarray) -> np.ndarray:
        """What ONNX Runtime computes here with that version's stored model file."""
        return np.asarray(self.sessions[(model, version)].run(["logits"], {"x": x})[0])

    def copy(self, to: Path) -> Path:
        """A fresh home with the same database and artifacts (no model cache)."""
        shutil.copytree(self.home, to, ignore=shutil.ignore_patterns("model-cache"))
        return to


def build_seed(folder: Path, mlp_files: MlpFiles) -> Seed:
    """Upload ``m`` and ``slow`` once, let their jobs succeed, stop the server; sessions on the stored files."""
    slow = slow_onnx(folder / "slow.onnx")
    home = folder / "seed"
    with serving(home, drain_seconds="0", poll_seconds="0.2") as proc:
        jobs = upload_and_wait(proc.url, [("m", mlp_files.model), ("slow", slow)], mlp_files.data)
    ledger = Ledger()
    for job, model in zip(jobs, (mlp_files.model, slow), strict=True):
        ledger.add(job["model"], job["id"], model, mlp_files.data)
    sessions = {
        (name, version): ort.InferenceSession(
            str(model_file(home, name, version)[0]), providers=["CPUExecutionProvider"]
        )
        for name in ("m", "slow")
        for version in (1, 2)
    }
    return Seed(home, sessions, ledger)


#: The acknowledged uploads of each fault server's home (the seed's, then the checks' own), by home.
LEDGERS: dict[str, Ledger] = {}


@contextlib.contextmanager
def fault_server(seed: Seed, folder: Path, **settings: str) -> Iterator[Proc]:
    """A server on a copy of the seed with ``settings``, once both models' default versions answer."""
    home = seed.copy(folder / "home")
    LEDGERS[str(home)] = seed.ledger.copy()
    with serving(home, **{**BASE, **settings}) as proc:
        proc.extra["home"] = str(home)
        wait_for(lambda: all(answers(proc.url, f"/v2/models/{m}/ready") for m in ("m", "slow")), timeout=60)
        yield proc


# --------------------------------------------------------------------------- helpers


def client_for(url: str) -> httpx.Client:
    """One client for a test and its threads (a client per request would spend a burst building TLS contexts)."""
    limits = httpx.Limits(max_connections=128, max_keepalive_connections=128)
    return httpx.Client(base_url=url, timeout=60, limits=limits)


def answers(url: str, path: str) -> bool:
    return httpx.get(f"{url}{path}", timeout=10).status_code == 200


def rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, FEATURES)).astype(np.float32)


def spinning(n: int = 1, spins: int = SPINS) -> np.ndarray:
    """``n`` rows whose first element makes ``slow`` spin ``spins`` times."""
    x = rows(n, seed=5)
    x[0, 0] = 1000.0 + spins
    return x


def path_of(model: str, version: int | None = None) -> str:
    return f"/v2/models/{model}/infer" if version is None else f"/v2/models/{model}/versions/{version}/infer"


@dataclass
class Answer:
    """A response (or the transport error instead) and when it arrived, on the monotonic clock."""

    response: httpx.Response | None
    error: Exception | None
    at: float

    @property
    def status(self) -> int | None:
        return self.response.status_code if self.response is not None else None


def post(http: httpx.Client, model: str, x: np.ndarray, version: int | None = None) -> Answer:
    """One JSON inference request; its answer (or the transport error) and when it came."""
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.tolist()}]}
    try:
        response = http.post(path_of(model, version), json=body)
    except httpx.TransportError as exc:
        return Answer(None, exc, time.monotonic())
    return Answer(response, None, time.monotonic())


def logits_of(answer: Answer) -> np.ndarray:
    assert answer.response is not None, answer.error
    assert answer.response.status_code == 200, answer.response.text
    (output,) = answer.response.json()["outputs"]
    return np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])


def assert_right(seed: Seed, model: str, answer: Answer, x: np.ndarray) -> None:
    """The answer holds what the version that answered computes for ``x``."""
    got = logits_of(answer)
    np.testing.assert_allclose(got, seed.expected(model, int(version_of(answer)), x), rtol=1e-5, atol=1e-5)


def version_of(answer: Answer) -> str:
    assert answer.response is not None and answer.response.status_code == 200, answer
    return str(answer.response.json()["model_version"])


def assert_503_retry(answer: Answer, home: Path | None = None) -> str:
    """A 503 with a clean error and a Retry-After; the message."""
    assert answer.response is not None, answer.error
    message = assert_error(answer.response, 503, home)
    assert answer.response.headers.get("retry-after", "").isdigit(), answer.response.headers
    return message


def scrape(http: httpx.Client) -> str:
    response = http.get("/metrics")
    assert response.status_code == 200, response.text
    return response.text


def sample(http: httpx.Client, name: str, model: str, version: int = 2, **labels: str) -> float:
    """A sample of one version (0 when the series does not exist yet)."""
    return metric(scrape(http), name, model=model, version=str(version), **labels) or 0.0


def batches(http: httpx.Client, model: str, version: int = 2) -> tuple[float, float]:
    """(executed batches, rows in them) of that version so far."""
    text = scrape(http)
    labels = {"model": model, "version": str(version)}
    count = metric(text, "slimserve_inference_batch_size_count", **labels)
    total = metric(text, "slimserve_inference_batch_size_sum", **labels)
    assert count is not None and total is not None, "no batch-size series for a loaded version"
    return count, total


def start_slow(pool: ThreadPoolExecutor, http: httpx.Client, n: int = 1) -> Future[Answer]:
    """Send a spinning request to ``slow``'s default (version 2); return once its batch runs (it left the queue)."""
    name = "slimserve_inference_queue_duration_seconds_count"
    before = sample(http, name, "slow")
    future = pool.submit(post, http, "slow", spinning(n))
    wait_for(lambda: future.done() or sample(http, name, "slow") >= before + 1, timeout=30)
    assert not future.done(), f"the spinning request ended before anything could queue behind it: {future.result()}"
    return future


def check_invariants(server: Proc, mlp_files: MlpFiles) -> None:
    """The four invariants on a running fault server (it has no worker: the check starts one for its fresh job)."""
    home = server.extra["home"]
    assert_invariants(Path(home), LEDGERS[home], mlp_files, server=server, worker_running=False)


def model_file(home: Path, model: str, version: int) -> tuple[Path, dict[str, Any]]:
    """The stored model.onnx of a version (checked against its row's size and sha256), and the row's file ref."""
    (row,) = [r for r in version_rows(home, model) if r["number"] == version]
    ref = row["files"]["model.onnx"]
    path = home / "artifacts" / ref["key"]
    assert path.stat().st_size == ref["size"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == ref["sha256"]
    return path, ref
