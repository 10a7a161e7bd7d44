"""Dynamic batching of inference requests for one model version, with Triton's knob names.

Concurrent requests whose tensors agree on everything but the first (batch) axis are stacked into
one batch, run once off the event loop, and the outputs are split back by row counts. Our own code
rather than a library: Triton's dynamic batcher lives inside its C++ server, and LitServe's batching
is tied to its own worker processes and HTTP stack; we need a small asyncio scheduler around a
blocking ONNX Runtime call. The rules (Triton's, in our words):

* A batch is dispatched as soon as its key's queued rows reach ``max_batch_size``, a prefix of the
  queue adds up to one of ``preferred_batch_size`` (the largest such prefix is taken), or its oldest
  request has waited ``max_queue_delay_microseconds``. A batch never exceeds ``max_batch_size`` rows,
  except a single request larger than that, which runs alone. ``max_batch_size`` 0 or 1: no batching.
* At most ``max_concurrent_batches`` batches run at once; the rest wait their turn. The key whose
  oldest request is oldest goes first.
* ``max_queue_size`` requests may wait (0: unbounded); past it ``submit`` raises ``Unavailable`` (503
  with Retry-After) at once.
* A request not started within its timeout is answered with ``QueueTimeout`` and removed, never run
  later. We chose 503 with Retry-After over 504: a request that waited too long in our own queue is an
  overload signal the client should back off from and retry, exactly like a full queue, and the HTTP
  layer already maps ``Unavailable`` to 503 + Retry-After. Timeout 0 means no deadline (as in Triton).
* If ``run`` fails for a batch of several requests (or its outputs cannot be split by rows), each
  request is rerun alone and gets its own result or error, so one bad request never fails the others.
  Errors raised by ``run`` reach the caller unchanged: the run function translates them.
* A caller that goes away while its request is queued (task cancelled) is dropped before execution.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from service.errors import Unavailable

_log = logging.getLogger(__name__)

RunBatch = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
"""A blocking inference call (e.g. an ONNX Runtime session's ``run``); the batcher runs it in a thread."""

#: What one request of a batch ends with: its outputs or the exception that failed it.
_Outcome = dict[str, np.ndarray] | BaseException


class QueueTimeout(Unavailable):
    """The request was not started within its timeout; it was removed and will never run (503, Retry-After)."""


@dataclass(frozen=True)
class BatchingConfig:
    """Dynamic batching settings of one model version (Triton's names; see the module docstring)."""

    max_batch_size: int = 32
    preferred_batch_size: tuple[int, ...] = ()
    max_queue_delay_microseconds: int = 2000
    max_queue_size: int = 1024
    timeout_s: float = 30.0
    max_concurrent_batches: int = 1

    def __post_init__(self) -> None:
        """Reject impossible settings with one line; keep the preferred sizes sorted and unique."""
        if self.max_batch_size < 0:
            raise ValueError("max_batch_size must be >= 0")
        preferred = tuple(sorted(set(self.preferred_batch_size)))
        if any(size < 1 or size > max(self.max_batch_size, 1) for size in preferred):
            raise ValueError("preferred_batch_size values must be between 1 and max_batch_size")
        object.__setattr__(self, "preferred_batch_size", preferred)
        if self.max_queue_delay_microseconds < 0:
            raise ValueError("max_queue_delay_microseconds must be >= 0")
        if self.max_queue_size < 0:
            raise ValueError("max_queue_size must be >= 0 (0: unbounded)")
        if self.timeout_s < 0:
            raise ValueError("timeout_s must be >= 0 (0: no timeout)")
        if self.max_concurrent_batches < 1:
            raise ValueError("max_concurrent_batches must be >= 1")


class BatchObserver(Protocol):
    """Metrics hooks, called on the event loop (the lead wires them to Prometheus)."""

    def queued(self, seconds: float) -> None:
        """A request left the queue for a batch after waiting ``seconds``."""

    def batch(self, size: int, seconds: float) -> None:
        """``run`` was called once on ``size`` rows and took ``seconds``."""

    def depth(self, n: int) -> None:
        """The number of queued requests changed to ``n``."""


@dataclass(eq=False)  # identity equality: deque.remove must never compare arrays
class _Pending:
    inputs: dict[str, np.ndarray]
    rows: int
    key: Hashable
    future: asyncio.Future[dict[str, np.ndarray]]
    enqueued: float
    queued: bool = True
    timer: asyncio.TimerHandle | None = None


@dataclass(eq=False)
class _KeyQueue:
    items: deque[_Pending] = field(default_factory=deque)
    rows: int = 0


def request_rows(inputs: dict[str, np.ndarray]) -> int:
    """Rows of a request: the first axis of every input, which must agree; ValueError otherwise."""
    if not inputs:
        raise ValueError("the request has no inputs")
    rows: int | None = None
    for name, array in inputs.items():
        if not isinstance(array, np.ndarray) or array.ndim == 0:
            raise ValueError(f"input '{name}' must be an array with a batch axis first")
        if rows is None:
            rows = array.shape[0]
        elif array.shape[0] != rows:
            raise ValueError(f"input '{name}' has {array.shape[0]} rows, another input has {rows}")
    assert rows is not None
    return rows


def batch_key(inputs: dict[str, np.ndarray]) -> tuple[tuple[str, np.dtype[Any], tuple[int, ...]], ...]:
    """What requests must share to be batched together: input names, dtypes and non-batch shapes."""
    return tuple(sorted((name, array.dtype, array.shape[1:]) for name, array in inputs.items()))


class Batcher:
    """Queues requests of one model version and runs them in dynamic batches (see the module docstring)."""

    def __init__(
        self,
        run: RunBatch,
        config: BatchingConfig,
        *,
        executor: concurrent.futures.Executor | None = None,
        observer: BatchObserver | None = None,
    ) -> None:
        self._run = run
        self._config = config
        self._executor = executor
        self._observer = observer
        self._max_rows = max(config.max_batch_size, 1)
        self._delay = config.max_queue_delay_microseconds / 1e6
        self._queues: dict[Hashable, _KeyQueue] = {}
        self._depth = 0
        self._running = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.TimerHandle | None = None
        self._wakeup_at = 0.0

    @property
    def config(self) -> BatchingConfig:
        """The settings this batcher runs with."""
        return self._config

    def queue_depth(self) -> int:
        """Requests waiting for a batch (not counting those running)."""
        return self._depth

    async def submit(self, inputs: dict[str, np.ndarray], *, timeout_s: float | None = None) -> dict[str, np.ndarray]:
        """Queue one request (batch axis first on every input) and return its own rows of the outputs.

        Raises ValueError for inputs without a common first axis, ``Unavailable`` when the queue is full
        or the batcher is closed, ``QueueTimeout`` when not started within ``timeout_s`` (default: the
        config's; 0: none), and whatever ``run`` raised for this request.
        """
        rows = request_rows(inputs)
        if self._closing:
            raise Unavailable("the model version is shutting down")
        limit = self._config.max_queue_size
        if limit and self._depth >= limit:
            raise Unavailable("too many requests are waiting for this model; retry later")
        loop = self._bind_loop()
        now = loop.time()
        pending = _Pending(inputs, rows, batch_key(inputs), loop.create_future(), now)
        timeout = self._config.timeout_s if timeout_s is None else timeout_s
        if timeout > 0:
            pending.timer = loop.call_at(now + timeout, self._expire, pending)
        queue = self._queues.get(pending.key)
        if queue is None:
            queue = self._queues[pending.key] = _KeyQueue()
        queue.items.append(pending)
        queue.rows += rows
        self._depth += 1
        self._notify_depth()
        self._dispatch()
        try:
            return await pending.future
        except asyncio.CancelledError:
            if pending.queued:  # the caller went away before its request started: never run it
                self._remove(pending)
            raise

    async def close(self, *, drain: bool = True) -> None:
        """Stop accepting requests (``Unavailable``); drain: run everything queued, else fail it with ``Unavailable``.

        Batches already running always finish. Returns when nothing is queued or running.
        """
        self._closing = True
        if not drain:
            for queue in list(self._queues.values()):
                for pending in list(queue.items):
                    self._remove(pending)
                    if not pending.future.done():
                        pending.future.set_exception(Unavailable("the model version is shutting down"))
        self._dispatch()  # closing: whatever is queued goes now, as slots allow
        while self._tasks:
            await asyncio.wait(set(self._tasks))
        if self._wakeup is not None:
            self._wakeup.cancel()
            self._wakeup = None

    # -- the queue ---------------------------------------------------------------------------------

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError("a Batcher serves one event loop")
        return loop

    def _remove(self, pending: _Pending) -> None:
        """Take a still-queued request out of its queue (timed out, cancelled or failed at close)."""
        pending.queued = False
        if pending.timer is not None:
            pending.timer.cancel()
        queue = self._queues[pending.key]
        queue.items.remove(pending)
        queue.rows -= pending.rows
        if not queue.items:
            del self._queues[pending.key]
        self._depth -= 1
        self._notify_depth()

    def _expire(self, pending: _Pending) -> None:
        if not pending.queued:
            return
        self._remove(pending)
        if not pending.future.done():
            pending.future.set_exception(QueueTimeout("the request timed out waiting for the model"))

    def _dispatch(self) -> None:
        """Start every batch that is due while concurrency allows; else wake up when the next one is."""
        loop = self._loop
        if loop is None:
            return
        now = loop.time()
        while self._queues and self._running < self._config.max_concurrent_batches:
            batch = self._take_batch(now)
            if batch is None:
                break
            if not batch:  # every request taken had been cancelled by its caller
                continue
            self._running += 1
            task = loop.create_task(self._run_batch(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if self._queues and self._running < self._config.max_concurrent_batches:
            due = min(queue.items[0].enqueued for queue in self._queues.values()) + self._delay
            if self._wakeup is None or self._wakeup_at != due:
                if self._wakeup is not None:
                    self._wakeup.cancel()
                self._wakeup = loop.call_at(due, self._on_wakeup)
                self._wakeup_at = due

    def _on_wakeup(self) -> None:
        self._wakeup = None
        self._dispatch()

    def _take_batch(self, now: float) -> list[_Pending] | None:
        """Dequeue the next due batch (oldest key first) less callers gone meanwhile; None when none is due."""
        best: tuple[_KeyQueue, int] | None = None
        for queue in self._queues.values():
            count = self._due_count(queue, now)
            if count and (best is None or queue.items[0].enqueued < best[0].items[0].enqueued):
                best = (queue, count)
        if best is None:
            return None
        queue, count = best
        batch = [queue.items.popleft() for _ in range(count)]
        observer = self._observer
        for pending in batch:
            pending.queued = False
            if pending.timer is not None:
                pending.timer.cancel()
            queue.rows -= pending.rows
            if observer is not None:
                self._safely(observer.queued, now - pending.enqueued)
        if not queue.items:
            del self._queues[batch[0].key]
        self._depth -= count
        self._notify_depth()
        # a caller cancelled since the last loop turn has a done future but has not yet left the queue
        return [pending for pending in batch if not pending.future.done()]

    def _due_count(self, queue: _KeyQueue, now: float) -> int:
        """How many requests from the head of ``queue`` form a batch now (0: keep waiting)."""
        items = queue.items
        fitting = 0  # the longest prefix within max_batch_size rows (at least one request)
        preferred_count = 0  # the longest prefix whose rows are a preferred size
        rows = 0
        preferred = self._config.preferred_batch_size
        for pending in items:
            rows += pending.rows
            if rows > self._max_rows and fitting:
                break
            fitting += 1
            if rows in preferred:
                preferred_count = fitting
            if rows >= self._max_rows:
                break
        if preferred_count:
            return preferred_count
        full = queue.rows >= self._max_rows
        if full or self._closing or now >= items[0].enqueued + self._delay:
            return fitting
        return 0

    # -- running a batch ---------------------------------------------------------------------------

    async def _run_batch(self, batch: list[_Pending]) -> None:
        assert self._loop is not None
        try:
            outcomes, timings = await self._loop.run_in_executor(
                self._executor, _execute, self._run, [p.inputs for p in batch], [p.rows for p in batch]
            )
            for pending, outcome in zip(batch, outcomes, strict=True):
                if pending.future.done():  # the caller went away while it ran
                    continue
                if isinstance(outcome, BaseException):
                    pending.future.set_exception(outcome)
                else:
                    pending.future.set_result(outcome)
            if self._observer is not None:
                for size, seconds in timings:
                    self._safely(self._observer.batch, size, seconds)
        except Exception as exc:  # the executor itself failed (e.g. shut down): fail the batch, keep serving
            _log.warning("batch of %d requests could not run: %s", len(batch), exc)
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(Unavailable("the model could not run the request"))
        finally:
            for pending in batch:  # cancelled underneath us: nobody may wait forever
                if not pending.future.done():
                    pending.future.set_exception(Unavailable("the model could not run the request"))
            self._running -= 1
            self._dispatch()

    def _notify_depth(self) -> None:
        if self._observer is not None:
            self._safely(self._observer.depth, self._depth)

    @staticmethod
    def _safely(hook: Callable[..., None], *args: Any) -> None:
        try:
            hook(*args)
        except Exception:  # a broken metrics hook must not fail inference
            _log.exception("batch observer failed")


def _execute(
    run: RunBatch, requests: list[dict[str, np.ndarray]], rows: list[int]
) -> tuple[list[_Outcome], list[tuple[int, float]]]:
    """In a worker thread: run the batch once, split it by rows; on failure, run each request alone."""
    timings: list[tuple[int, float]] = []
    if len(requests) > 1:
        try:
            names = sorted(requests[0])
            merged = {name: np.concatenate([r[name] for r in requests], axis=0) for name in names}
            total = sum(rows)
            start = time.perf_counter()
            outputs = run(merged)
            timings.append((total, time.perf_counter() - start))
            return _split(outputs, rows, total), timings
        except Exception as exc:
            _log.warning("batch of %d requests failed (%s); running each alone", len(requests), exc)
    outcomes: list[_Outcome] = []
    for request, count in zip(requests, rows, strict=True):
        start = time.perf_counter()
        try:
            outcomes.append(run(request))
        except Exception as exc:
            outcomes.append(exc)
        timings.append((count, time.perf_counter() - start))
    return outcomes, timings


def _split(outputs: dict[str, np.ndarray], rows: list[int], total: int) -> list[_Outcome]:
    """Each request's own rows of every output; ValueError when an output lacks the batch axis."""
    for name, array in outputs.items():
        if not isinstance(array, np.ndarray) or array.ndim == 0 or array.shape[0] != total:
            raise ValueError(f"output '{name}' does not have {total} rows along its first axis")
    parts: list[_Outcome] = []
    start = 0
    for count in rows:
        parts.append({name: array[start : start + count] for name, array in outputs.items()})
        start += count
    return parts
