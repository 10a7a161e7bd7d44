"""Serving faults from RELIABILITY.md against real `slimserve serve` processes: a full queue, request
timeouts, a version that fails to load, hot swap under a running batch, and SIGTERM with requests in flight.

The models are uploaded once (``seed``: the tiny MLP ``m`` and ``slow``, jobs succeeded, server
stopped); each server here starts on its own copy of that home, with no worker. ``slow`` is the MLP's
shape with a spin loop: ``x[batch, 16] -> x @ w``, plus a Loop that runs ``max(x) - 1000`` empty
iterations (about 2 µs each) and adds nothing. Normal inputs are instant; a request holding
``1000 + SPINS`` keeps the version's single batch slot busy for a few seconds, so the tests can
hold a batch in flight and queue requests behind it without relying on timing.

Every test ends with the four invariants (tests/faults/invariants.py) on its server's home, with the
seed's acknowledged uploads in the ledger.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import signal
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.e2e.conftest import MlpFiles, assert_error, metric, serving, settings_env, upload_and_wait, version_rows
from tests.faults.invariants import Exemptions, Ledger, assert_invariants
from tests.serverproc import Proc, start_server, wait_for

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


@pytest.fixture(scope="module")
def seed(tmp_path_factory: pytest.TempPathFactory, mlp_files: MlpFiles) -> Seed:
    """Upload ``m`` and ``slow`` once, let their jobs succeed, stop the server; sessions on the stored files."""
    folder = tmp_path_factory.mktemp("serving-faults")
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


# --------------------------------------------------------------------------- a full queue


@pytest.fixture(scope="module")
def burst_server(seed: Seed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    """Two requests may wait per version; one batch of one request runs at a time."""
    folder = tmp_path_factory.mktemp("burst")
    with fault_server(seed, folder, max_queue_size="2", max_batch_size="1", concurrent_batches="1") as proc:
        yield proc


def check_invariants(server: Proc, mlp_files: MlpFiles) -> None:
    """The four invariants on a running fault server (it has no worker: the check starts one for its fresh job)."""
    home = server.extra["home"]
    assert_invariants(Path(home), LEDGERS[home], mlp_files, server=server, worker_running=False)


@pytest.mark.slow
def test_queue_full_answers_503_at_once_and_the_rest_200(seed: Seed, burst_server: Proc, mlp_files: MlpFiles) -> None:
    inputs = [rows(1, seed=100 + i) for i in range(50)]
    with client_for(burst_server.url) as http, ThreadPoolExecutor(51) as pool:
        before = scrape(http)
        running = start_slow(pool, http)
        burst = [pool.submit(post, http, "slow", x) for x in inputs]
        answers_ = [future.result() for future in burst]
        slow = running.result()
        after = scrape(http)
        assert_right(seed, "slow", slow, spinning())
        codes = Counter(answer.status for answer in answers_)
        assert codes == {200: 2, 503: 48}, f"with a batch running and 2 places in the queue: {codes}"
        for x, answer in zip(inputs, answers_, strict=True):
            if answer.status == 200:
                assert_right(seed, "slow", answer, x)
                continue
            assert "too many requests" in assert_503_retry(answer)
            assert answer.at < slow.at, "a request refused for a full queue was answered only after the running batch"
        for code, count in (("503", 48), ("200", 3)):
            labels = {"model": "slow", "version": "2", "code": code}
            grew = (metric(after, "slimserve_inference_requests_total", **labels) or 0.0) - (
                metric(before, "slimserve_inference_requests_total", **labels) or 0.0
            )
            assert grew == count, f"requests_total{{code={code}}} grew by {grew}, not {count}"
        assert metric(after, "slimserve_inference_queue_depth", model="slow", version="2") == 0
        x = rows(2, seed=7)
        assert_right(seed, "slow", post(http, "slow", x), x)
    check_invariants(burst_server, mlp_files)


@pytest.mark.slow
def test_hot_swap_lets_the_running_batch_finish_on_the_old_version(
    seed: Seed, burst_server: Proc, mlp_files: MlpFiles
) -> None:
    with client_for(burst_server.url) as http:
        try:
            with ThreadPoolExecutor(2) as pool:
                running = start_slow(pool, http)  # on the default, version 2
                deployed = http.post("/v1/models/slow/versions/1/deploy")
                assert deployed.status_code == 200, deployed.text
                x = rows(1, seed=9)
                now = post(http, "slow", x)
                assert version_of(now) == "1"
                assert_right(seed, "slow", now, x)
                slow = running.result()
            assert version_of(slow) == "2", "the batch running at the swap did not finish on its version"
            assert_right(seed, "slow", slow, spinning())
            assert now.at < slow.at, "the new default waited for the old version's batch"
        finally:
            http.post("/v1/models/slow/versions/2/deploy")
    check_invariants(burst_server, mlp_files)


# --------------------------------------------------------------------------- request timeouts


@pytest.fixture(scope="module")
def timeout_server(seed: Seed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    """Requests not started within 50 ms are answered 503; only full batches of 4 start (the queue delay is 10 s)."""
    folder = tmp_path_factory.mktemp("timeouts")
    settings = {"inference_timeout_seconds": "0.05", "max_queue_delay_microseconds": "10000000", "max_batch_size": "4"}
    with fault_server(seed, folder, **settings) as proc:
        yield proc


@pytest.mark.slow
def test_burst_past_its_timeout_is_503_and_never_executed(
    seed: Seed, timeout_server: Proc, mlp_files: MlpFiles
) -> None:
    """On ``m``'s version 1 (the float original: a row's result does not depend on its batch-mates)."""
    n = 10
    inputs = [rows(1, seed=200 + i) for i in range(n)]
    start = threading.Barrier(n)
    with client_for(timeout_server.url) as http:
        for _ in range(n):  # open the connections before the burst
            assert http.get("/v2/health/live").status_code == 200
        _, sum0 = batches(http, "m", 1)

        def one(i: int) -> Answer:
            start.wait()
            return post(http, "m", inputs[i], version=1)

        with ThreadPoolExecutor(n) as pool:
            answers_ = list(pool.map(one, range(n)))
        _, sum1 = batches(http, "m", 1)
        codes = Counter(answer.status for answer in answers_)
        assert set(codes) <= {200, 503}, codes
        assert codes[503] >= 2, f"{n} one-row requests fill at most 2 batches of 4; the rest must time out: {codes}"
        for x, answer in zip(inputs, answers_, strict=True):
            if answer.status == 200:
                assert_right(seed, "m", answer, x)
            else:
                assert "timed out" in assert_503_retry(answer)
        assert sum1 - sum0 == codes[200], "rows executed differ from requests answered 200"
        full = rows(4, seed=8)  # a full batch starts at once: the server is fine
        assert_right(seed, "m", post(http, "m", full, version=1), full)
    check_invariants(timeout_server, mlp_files)


@pytest.mark.slow
def test_requests_timed_out_behind_a_running_batch_never_run_later(
    seed: Seed, timeout_server: Proc, mlp_files: MlpFiles
) -> None:
    with client_for(timeout_server.url) as http:
        count0, sum0 = batches(http, "slow")
        with ThreadPoolExecutor(9) as pool:
            running = start_slow(pool, http, n=4)  # 4 rows: a full batch, it starts at once
            waiting = [pool.submit(post, http, "slow", rows(1, seed=300 + i)) for i in range(8)]
            answers_ = [future.result() for future in waiting]
            slow = running.result()
        assert_right(seed, "slow", slow, spinning(4))
        for answer in answers_:
            assert "timed out" in assert_503_retry(answer)
            assert answer.at < slow.at, "a timed-out request was answered only after the batch ahead of it"
        x = rows(4, seed=10)
        assert_right(seed, "slow", post(http, "slow", x), x)
        count1, sum1 = batches(http, "slow")
        assert (count1 - count0, sum1 - sum0) == (2, 8), "the timed-out requests were executed after all"
    check_invariants(timeout_server, mlp_files)


# --------------------------------------------------------------------------- a version that fails to load


def model_file(home: Path, model: str, version: int) -> tuple[Path, dict[str, Any]]:
    """The stored model.onnx of a version (checked against its row's size and sha256), and the row's file ref."""
    (row,) = [r for r in version_rows(home, model) if r["number"] == version]
    ref = row["files"]["model.onnx"]
    path = home / "artifacts" / ref["key"]
    assert path.stat().st_size == ref["size"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == ref["sha256"]
    return path, ref


def flip_bytes(path: Path) -> None:
    """Corrupt the file in place, same size (its sha256 no longer matches the row)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    path.write_bytes(bytes(data))


def truncate_keeping_the_row_consistent(home: Path, model: str, version: int) -> None:
    """Truncate the file and update its row's size and sha256: the checksum passes, ONNX Runtime refuses it."""
    path, ref = model_file(home, model, version)
    garbage = path.read_bytes()[: ref["size"] // 2]
    path.write_bytes(garbage)
    conn = sqlite3.connect(home / "slimserve.db")
    try:
        (model_id,) = conn.execute("SELECT id FROM models WHERE name = ?", (model,)).fetchone()
        where = "WHERE model_id = ? AND number = ?"
        (files,) = conn.execute(f"SELECT files FROM versions {where}", (model_id, version)).fetchone()
        refs = json.loads(files)
        refs["model.onnx"].update(size=len(garbage), sha256=hashlib.sha256(garbage).hexdigest())
        conn.execute(f"UPDATE versions SET files = ? {where}", (json.dumps(refs), model_id, version))
        conn.commit()
    finally:
        conn.close()


def while_hammering(
    http: httpx.Client, seed: Seed, model: str, path: str
) -> tuple[httpx.Response, Counter[int | None]]:
    """``POST path`` while another thread keeps sending requests to ``model``'s default; the answer and their codes."""
    stop = threading.Event()
    seen: Counter[int | None] = Counter()

    def hammer() -> None:
        x = rows(1, seed=11)
        while not stop.is_set():
            answer = post(http, model, x)
            seen[answer.status] += 1
            if answer.status == 200:
                assert_right(seed, model, answer, x)

    with ThreadPoolExecutor(1) as pool:
        hammering = pool.submit(hammer)
        try:
            response = http.post(path)
        finally:
            stop.set()
        hammering.result()
    return response, seen


@pytest.mark.slow
def test_a_version_that_fails_to_load_leaves_the_old_one_serving(
    seed: Seed, tmp_path: Path, mlp_files: MlpFiles
) -> None:
    """``m``: version 1's file corrupted on disk, then deployed over version 2. ``slow``: its default (version 2)
    is not a valid model (checksum intact), so version 1 stands in, and deploying 2 again fails the same way."""
    home = seed.copy(tmp_path / "home")
    corrupted, ref = model_file(home, "m", 1)
    flip_bytes(corrupted)
    truncate_keeping_the_row_consistent(home, "slow", 2)
    with serving(home, **BASE) as server, client_for(server.url) as http:
        wait_for(
            lambda: (
                answers(server.url, "/v2/models/m/versions/2/ready") and answers(server.url, "/v2/models/slow/ready")
            ),
            60,
        )
        ready = http.get("/v2/health/ready")
        assert (ready.status_code, ready.json()) == (200, {"ready": True}), "a broken version took the replica out"
        for model, broken, working in (("m", 1, 2), ("slow", 2, 1)):
            not_ready = http.get(f"/v2/models/{model}/versions/{broken}/ready")
            assert (not_ready.status_code, not_ready.json()["ready"]) == (503, False)
            assert "failed to load" in assert_503_retry(post(http, model, rows(1, seed=1), version=broken), home)
            assert http.get(f"/v2/models/{model}").json()["versions"] == [str(working)]

            deployed, seen = while_hammering(http, seed, model, f"/v1/models/{model}/versions/{broken}/deploy")
            assert "failed to load" in assert_error(deployed, 409, home)
            assert set(seen) == {200}, f"requests failed while the broken version was deployed: {seen}"
            x = rows(3, seed=12)
            answer = post(http, model, x)
            assert version_of(answer) == str(working)
            assert_right(seed, model, answer, x)
        for name in ("m", "slow"):
            assert http.get(f"/v1/models/{name}").json()["default_version"] == 2, "a failed deploy moved the default"
        assert "Traceback" not in server.output()
        # the flipped file is the fault itself: its bytes no longer match its row, on purpose
        exempt = Exemptions(tampered=frozenset({ref["key"]}))
        assert_invariants(home, seed.ledger.copy(), mlp_files, server=server, worker_running=False, exempt=exempt)


# --------------------------------------------------------------------------- SIGTERM


@pytest.mark.slow
def test_sigterm_goes_unready_finishes_in_flight_refuses_the_rest_and_exits_0(
    seed: Seed, tmp_path: Path, mlp_files: MlpFiles
) -> None:
    home = seed.copy(tmp_path / "home")
    server = start_server(home, env=settings_env(**{**BASE, "drain_seconds": "2"}))
    url = server.url
    try:
        wait_for(lambda: answers(url, "/v2/models/slow/ready") and answers(url, "/v2/models/m/ready"), 60)
        with client_for(url) as http, ThreadPoolExecutor(2) as pool:
            in_flight = start_slow(pool, http)
            queued = pool.submit(post, http, "slow", rows(1, seed=13))
            wait_for(lambda: sample(http, "slimserve_inference_queue_depth", "slow") == 1, timeout=30)
            server.popen.send_signal(signal.SIGTERM)

            readiness: list[int | str] = []
            deadline = time.monotonic() + 20
            while (not readiness or readiness[-1] == 200) and time.monotonic() < deadline:
                try:
                    readiness.append(httpx.get(f"{url}/v2/health/ready", timeout=10).status_code)
                except httpx.TransportError as exc:
                    readiness.append(type(exc).__name__)
            assert readiness[-1] == 503, f"readiness after SIGTERM: {readiness[-5:]} (the server must report not ready)"
            assert httpx.get(f"{url}/v2/health/live", timeout=10).status_code == 200, "draining, it is still live"

            with client_for(url) as fresh:  # a new connection: refused once the server stopped listening
                later = post(fresh, "m", rows(1, seed=14))
            if later.response is not None:
                assert "shutting down" in assert_503_retry(later, home)
            else:
                assert isinstance(later.error, httpx.ConnectError), later.error
            assert_503_retry(queued.result(), home)
            slow = in_flight.result()
        assert_right(seed, "slow", slow, spinning())
        code = server.popen.wait(timeout=30)
        assert code == 0, f"exit code {code} after SIGTERM"
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/v2/health/live", timeout=5)
    finally:
        server.kill()
        print(f"--- server log ---\n{server.output()[-4000:]}")
    assert_invariants(home, seed.ledger.copy(), mlp_files)
