"""The dynamic batcher on a real event loop, real threads and real numpy / ONNX Runtime run functions."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

from optimizer.runtime import RuntimeOptions, create_session
from service.errors import Unavailable
from service.serving.batcher import Batcher, BatchingConfig, QueueTimeout, batch_key, request_rows
from tests import builders

T = TypeVar("T")
BOUND_S = 5.0  # generous: every wait below finishes in milliseconds when the batcher works


def arun(factory: Callable[[], Awaitable[T]]) -> T:
    """Run one async test body on a fresh event loop, failing instead of hanging past a generous bound."""

    async def bounded() -> T:
        async with asyncio.timeout(30):
            return await factory()

    return asyncio.run(bounded())


class Model:
    """A tiny real run function: ``y = 2x + 1`` row-wise and ``s = sum of each row``, recording every call."""

    def __init__(self, gate: threading.Event | None = None, fail_on_nan: bool = False) -> None:
        self.calls: list[dict[str, np.ndarray]] = []
        self.gate = gate
        self.started = threading.Event()
        self.fail_on_nan = fail_on_nan
        self._lock = threading.Lock()

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            self.calls.append({name: array.copy() for name, array in inputs.items()})
        self.started.set()
        if self.gate is not None and not self.gate.wait(BOUND_S):
            raise RuntimeError("the test never opened the gate")
        x = inputs["x"]
        if self.fail_on_nan and np.isnan(x).any():
            raise ValueError("NaN in input")
        return {"y": 2 * x + 1, "s": x.reshape(x.shape[0], -1).sum(axis=1)}

    def sizes(self) -> list[int]:
        """Rows of every call, in order."""
        return [call["x"].shape[0] for call in self.calls]

    def saw(self, value: float) -> bool:
        """Whether any call carried a row holding ``value``."""
        return any(np.isclose(call["x"], value).any() for call in self.calls)


class Observer:
    """Records the batcher's metrics hooks."""

    def __init__(self) -> None:
        self.waits: list[float] = []
        self.batches: list[tuple[int, float]] = []
        self.depths: list[int] = []

    def queued(self, seconds: float) -> None:
        self.waits.append(seconds)

    def batch(self, size: int, seconds: float) -> None:
        self.batches.append((size, seconds))

    def depth(self, n: int) -> None:
        self.depths.append(n)


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(max_workers=8)
    yield pool
    pool.shutdown(wait=True)


def rows_of(start: float, rows: int, width: int = 3) -> np.ndarray:
    """``rows`` distinct float32 rows beginning at ``start`` (values identify their request)."""
    return (start + np.arange(rows * width, dtype=np.float32).reshape(rows, width) / 100).astype(np.float32)


async def wait_started(model: Model) -> None:
    assert await asyncio.to_thread(model.started.wait, BOUND_S), "the first batch never started"


def check_own_rows(x: np.ndarray, out: dict[str, np.ndarray]) -> None:
    np.testing.assert_allclose(out["y"], 2 * x + 1)
    np.testing.assert_allclose(out["s"], x.sum(axis=1), rtol=1e-6)


def test_concurrent_requests_are_batched_up_to_max_and_split_exactly(executor: ThreadPoolExecutor) -> None:
    model, observer = Model(), Observer()
    # a delay far beyond the bound: only "max_batch_size reached" can dispatch these batches in time
    batcher = Batcher(
        model,
        BatchingConfig(max_batch_size=8, max_queue_delay_microseconds=60_000_000),
        executor=executor,
        observer=observer,
    )
    inputs = [rows_of(i, 1) for i in range(16)]

    async def body() -> list[dict[str, np.ndarray]]:
        async with asyncio.timeout(BOUND_S):
            return await asyncio.gather(*(batcher.submit({"x": x}) for x in inputs))

    results = arun(body)
    assert model.sizes() == [8, 8]
    for x, out in zip(inputs, results, strict=True):
        check_own_rows(x, out)
    assert [size for size, _ in observer.batches] == [8, 8]
    assert len(observer.waits) == 16 and observer.depths[-1] == 0


def test_batch_never_exceeds_max_rows_and_an_oversized_request_runs_alone(executor: ThreadPoolExecutor) -> None:
    model = Model()
    batcher = Batcher(model, BatchingConfig(max_batch_size=8, max_queue_delay_microseconds=1000), executor=executor)
    sizes = [3, 3, 3, 12, 2, 5, 1, 3, 3]
    inputs = [rows_of(10 * i, n) for i, n in enumerate(sizes)]

    async def body() -> list[dict[str, np.ndarray]]:
        async with asyncio.timeout(BOUND_S):
            return await asyncio.gather(*(batcher.submit({"x": x}) for x in inputs))

    results = arun(body)
    assert all(size <= 8 for size in model.sizes() if size != 12)
    assert model.sizes().count(12) == 1 and sum(model.sizes()) == sum(sizes)
    assert any(call["x"].shape[0] == 12 and np.allclose(call["x"], inputs[3]) for call in model.calls)
    for x, out in zip(inputs, results, strict=True):
        check_own_rows(x, out)


def test_preferred_size_dispatches_without_waiting_the_delay(executor: ThreadPoolExecutor) -> None:
    model = Model()
    config = BatchingConfig(max_batch_size=32, preferred_batch_size=(4,), max_queue_delay_microseconds=60_000_000)
    batcher = Batcher(model, config, executor=executor)

    async def body() -> None:
        async with asyncio.timeout(BOUND_S):  # the delay is a minute: only the preferred size can dispatch
            await asyncio.gather(*(batcher.submit({"x": rows_of(i, 1)}) for i in range(4)))
        lone = asyncio.create_task(batcher.submit({"x": rows_of(9, 3)}))
        await asyncio.sleep(0.2)
        assert not lone.done() and batcher.queue_depth() == 1  # 3 rows: no preferred size, delay not over
        await batcher.close(drain=True)  # closing flushes what is queued
        check_own_rows(rows_of(9, 3), await lone)

    arun(body)
    assert model.sizes() == [4, 3]


def test_delay_dispatches_a_partial_batch(executor: ThreadPoolExecutor) -> None:
    model = Model()
    batcher = Batcher(model, BatchingConfig(max_batch_size=32, max_queue_delay_microseconds=1000), executor=executor)

    async def body() -> dict[str, np.ndarray]:
        async with asyncio.timeout(BOUND_S):
            return await batcher.submit({"x": rows_of(1, 2)})

    check_own_rows(rows_of(1, 2), arun(body))
    assert model.sizes() == [2]


def test_requests_of_different_shapes_or_dtypes_are_never_mixed(executor: ThreadPoolExecutor) -> None:
    model = Model()
    batcher = Batcher(model, BatchingConfig(max_batch_size=64, max_queue_delay_microseconds=50_000), executor=executor)
    inputs = [
        rows_of(i, 1 + i % 2, width=3 if i % 3 else 5).astype(np.float64 if i % 4 == 0 else np.float32)
        for i in range(24)
    ]

    async def body() -> list[dict[str, np.ndarray]]:
        async with asyncio.timeout(BOUND_S):
            return await asyncio.gather(*(batcher.submit({"x": x}) for x in inputs))

    results = arun(body)
    keys = {batch_key({"x": x}) for x in inputs}
    assert len(keys) == 4
    # all 24 arrive well inside the delay: one batch per key, none failed over to single runs
    assert len(model.calls) == len(keys)
    for x, out in zip(inputs, results, strict=True):
        check_own_rows(x, out)
        assert out["y"].dtype == x.dtype and out["y"].shape == x.shape


def test_a_bad_request_does_not_fail_the_others_in_its_batch(executor: ThreadPoolExecutor) -> None:
    model = Model(fail_on_nan=True)
    batcher = Batcher(
        model, BatchingConfig(max_batch_size=4, max_queue_delay_microseconds=60_000_000), executor=executor
    )
    inputs = [rows_of(i, 1) for i in range(4)]
    inputs[2] = np.full((1, 3), np.nan, dtype=np.float32)

    async def body() -> list[dict[str, np.ndarray] | BaseException]:
        async with asyncio.timeout(BOUND_S):
            return await asyncio.gather(*(batcher.submit({"x": x}) for x in inputs), return_exceptions=True)

    results = arun(body)
    assert model.sizes() == [4, 1, 1, 1, 1]  # the batch failed, then each request ran alone
    assert isinstance(results[2], ValueError) and "NaN" in str(results[2])
    for i in (0, 1, 3):
        out = results[i]
        assert isinstance(out, dict)
        check_own_rows(inputs[i], out)


def test_outputs_not_split_by_rows_fall_back_to_single_runs(executor: ThreadPoolExecutor) -> None:
    calls: list[int] = []

    def total(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        calls.append(inputs["x"].shape[0])
        return {"total": inputs["x"].sum(keepdims=True).reshape(1)}  # one row whatever the batch: no split

    batcher = Batcher(
        total, BatchingConfig(max_batch_size=3, max_queue_delay_microseconds=60_000_000), executor=executor
    )
    inputs = [rows_of(i, 1) for i in range(3)]

    async def body() -> list[dict[str, np.ndarray]]:
        async with asyncio.timeout(BOUND_S):
            return await asyncio.gather(*(batcher.submit({"x": x}) for x in inputs))

    results = arun(body)
    assert calls == [3, 1, 1, 1]
    for x, out in zip(inputs, results, strict=True):
        np.testing.assert_allclose(out["total"], x.sum(), rtol=1e-6)


def test_full_queue_refuses_at_once_with_unavailable(executor: ThreadPoolExecutor) -> None:
    gate = threading.Event()
    model = Model(gate=gate)
    batcher = Batcher(model, BatchingConfig(max_batch_size=1, max_queue_size=2), executor=executor)

    async def body() -> None:
        running = asyncio.create_task(batcher.submit({"x": rows_of(0, 1)}))
        await wait_started(model)
        queued = [asyncio.create_task(batcher.submit({"x": rows_of(i, 1)})) for i in (1, 2)]
        await asyncio.sleep(0)
        assert batcher.queue_depth() == 2
        with pytest.raises(Unavailable) as refused:
            await batcher.submit({"x": rows_of(3, 1)})
        assert refused.value.status == 503 and refused.value.retry_after >= 1
        gate.set()
        async with asyncio.timeout(BOUND_S):
            await asyncio.gather(running, *queued)

    arun(body)
    assert not model.saw(3.0) and len(model.calls) == 3


def test_a_request_timed_out_in_the_queue_is_answered_and_never_run(executor: ThreadPoolExecutor) -> None:
    gate = threading.Event()
    model, observer = Model(gate=gate), Observer()
    batcher = Batcher(model, BatchingConfig(max_batch_size=1), executor=executor, observer=observer)

    async def body() -> None:
        running = asyncio.create_task(batcher.submit({"x": rows_of(0, 1)}))
        await wait_started(model)
        async with asyncio.timeout(BOUND_S):  # answered while the model is still busy, not after
            with pytest.raises(QueueTimeout) as timed_out:
                await batcher.submit({"x": rows_of(7, 1)}, timeout_s=0.05)
        assert timed_out.value.status == 503 and not gate.is_set()
        assert batcher.queue_depth() == 0
        gate.set()
        await running
        await batcher.close(drain=True)

    arun(body)
    assert not model.saw(7.0) and len(model.calls) == 1
    assert observer.depths[-1] == 0


def test_a_cancelled_caller_is_dropped_before_execution(executor: ThreadPoolExecutor) -> None:
    gate = threading.Event()
    model = Model(gate=gate)
    batcher = Batcher(model, BatchingConfig(max_batch_size=1), executor=executor)

    async def body() -> None:
        running = asyncio.create_task(batcher.submit({"x": rows_of(0, 1)}))
        await wait_started(model)
        gone = asyncio.create_task(batcher.submit({"x": rows_of(5, 1)}))
        kept = asyncio.create_task(batcher.submit({"x": rows_of(6, 1)}))
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.gather(gone, return_exceptions=True)
        assert batcher.queue_depth() == 1
        gate.set()
        async with asyncio.timeout(BOUND_S):
            await asyncio.gather(running, kept)

    arun(body)
    assert model.saw(6.0) and not model.saw(5.0)


def test_close_with_drain_finishes_queued_and_refuses_new(executor: ThreadPoolExecutor) -> None:
    gate = threading.Event()
    model = Model(gate=gate)
    batcher = Batcher(
        model, BatchingConfig(max_batch_size=2, max_queue_delay_microseconds=60_000_000), executor=executor
    )

    async def body() -> None:
        first = [asyncio.create_task(batcher.submit({"x": rows_of(i, 1)})) for i in range(2)]
        await wait_started(model)
        queued = [asyncio.create_task(batcher.submit({"x": rows_of(i, 1)})) for i in range(2, 5)]
        await asyncio.sleep(0)
        closing = asyncio.create_task(batcher.close(drain=True))
        await asyncio.sleep(0)
        with pytest.raises(Unavailable):
            await batcher.submit({"x": rows_of(9, 1)})
        gate.set()
        async with asyncio.timeout(BOUND_S):
            await closing
        for i, task in enumerate(first + queued):
            assert task.done()
            check_own_rows(rows_of(i, 1), task.result())

    arun(body)
    assert sum(model.sizes()) == 5 and not model.saw(9.0)


def test_close_without_drain_fails_queued_and_finishes_in_flight(executor: ThreadPoolExecutor) -> None:
    gate = threading.Event()
    model = Model(gate=gate)
    batcher = Batcher(model, BatchingConfig(max_batch_size=1), executor=executor)

    async def body() -> None:
        running = asyncio.create_task(batcher.submit({"x": rows_of(0, 1)}))
        await wait_started(model)
        queued = [asyncio.create_task(batcher.submit({"x": rows_of(i, 1)})) for i in (1, 2)]
        await asyncio.sleep(0)
        closing = asyncio.create_task(batcher.close(drain=False))
        results = await asyncio.gather(*queued, return_exceptions=True)
        assert all(isinstance(r, Unavailable) for r in results) and not running.done()
        gate.set()
        async with asyncio.timeout(BOUND_S):
            await closing
        check_own_rows(rows_of(0, 1), running.result())

    arun(body)
    assert len(model.calls) == 1


def test_concurrent_batches_are_limited(executor: ThreadPoolExecutor) -> None:
    barrier = threading.Barrier(2, timeout=BOUND_S)  # breaks (and fails the run) unless 2 batches overlap
    lock = threading.Lock()
    active, peak = [0], [0]

    def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            barrier.wait()
            return {"y": inputs["x"] * 3}
        finally:
            with lock:
                active[0] -= 1

    batcher = Batcher(run, BatchingConfig(max_batch_size=1, max_concurrent_batches=2), executor=executor)

    async def body() -> list[dict[str, np.ndarray]]:
        return await asyncio.gather(*(batcher.submit({"x": rows_of(i, 1)}) for i in range(6)))

    results = arun(body)
    assert peak[0] == 2  # 8 threads were free: the batcher, not the pool, held it at 2
    for i, out in enumerate(results):
        np.testing.assert_allclose(out["y"], rows_of(i, 1) * 3)


def test_no_batching_runs_each_request_alone(executor: ThreadPoolExecutor) -> None:
    model = Model()
    batcher = Batcher(model, BatchingConfig(max_batch_size=0), executor=executor)

    async def body() -> list[dict[str, np.ndarray]]:
        async with asyncio.timeout(BOUND_S):
            return await asyncio.gather(*(batcher.submit({"x": rows_of(i, 1 + i % 2)}) for i in range(6)))

    results = arun(body)
    assert model.sizes() == [1 + i % 2 for i in range(6)]
    for i, out in enumerate(results):
        check_own_rows(rows_of(i, 1 + i % 2), out)


def test_onnxruntime_session_batched_results_match_single_runs(tmp_path: Path, executor: ThreadPoolExecutor) -> None:
    session = create_session(builders.mlp_onnx(tmp_path / "mlp.onnx"), RuntimeOptions())
    names = [o.name for o in session.get_outputs()]

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(names, session.run(None, feeds), strict=True))

    observer = Observer()
    batcher = Batcher(
        run,
        BatchingConfig(max_batch_size=16, max_queue_delay_microseconds=20_000),
        executor=executor,
        observer=observer,
    )
    rng = np.random.default_rng(0)
    inputs = [rng.normal(size=(1 + i % 3, 16)).astype(np.float32) for i in range(24)]

    async def body() -> list[dict[str, np.ndarray]]:
        async with asyncio.timeout(BOUND_S):
            return await asyncio.gather(*(batcher.submit({"x": x}) for x in inputs))

    results = arun(body)
    assert max(size for size, _ in observer.batches) > 3  # several requests shared a batch
    assert all(size <= 16 for size, _ in observer.batches)
    for x, out in zip(inputs, results, strict=True):
        np.testing.assert_allclose(out["logits"], run({"x": x})["logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "inputs",
    [
        {},
        {"x": np.float32(1.0)},
        {"x": np.zeros((2, 3), np.float32), "m": np.zeros((3,), np.float32)},
        {"x": [[1.0, 2.0]]},
    ],
)
def test_inputs_without_a_common_batch_axis_are_rejected(inputs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        request_rows(inputs)
    batcher = Batcher(Model(), BatchingConfig())

    async def body() -> None:
        with pytest.raises(ValueError):
            await batcher.submit(inputs)
        assert batcher.queue_depth() == 0

    arun(body)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_batch_size": -1},
        {"max_batch_size": 8, "preferred_batch_size": (4, 16)},
        {"preferred_batch_size": (0,)},
        {"max_queue_delay_microseconds": -5},
        {"max_queue_size": -1},
        {"timeout_s": -1.0},
        {"max_concurrent_batches": 0},
    ],
)
def test_impossible_settings_are_rejected(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        BatchingConfig(**kwargs)


def test_preferred_sizes_are_normalised() -> None:
    assert BatchingConfig(preferred_batch_size=(8, 4, 8)).preferred_batch_size == (4, 8)
