"""A closed- and open-loop HTTP load generator for the serving benchmark (one event loop, one process).

- :func:`closed_loop`: ``concurrency`` loops, each with its own keep-alive connection, send the
  next request as soon as the previous one is answered, for ``warmup_s + duration_s``; only
  answers in the last ``duration_s`` count. Batched servers answer in bursts (a whole batch at
  once), so when completions come in bursts the rate is measured from the end of one burst to the
  end of a later one (:func:`window_rate`), not over a window that cuts a batch in half.
- :func:`open_loop`: requests are *scheduled* at a constant rate and sent when due whatever the
  server's state; latency runs from the scheduled time, so time a request waits for a free
  connection or a late dispatcher is counted (no coordinated omission). Failed or unanswered
  requests count as infinite latency in the percentiles.

Why our own generator and not ``wrk``: the KServe binary requests need a body and a header built
per model, the same code drives slimserve and LitServe, and the figures (per-request latencies,
client and server CPU) feed the report directly. The HTTP client is :mod:`bench.httpclient`
(why not aiohttp: see there). Python's garbage collector is paused during a run: its pauses
would show up as latency of the server.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import math
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from bench.httpclient import Client, Connection
from bench.kserve import HttpRequest

#: Seconds of scheduled time per entry of an open loop's ``timeline``.
TIMELINE_S = 10.0


@dataclass
class LoadResult:
    """What one load run measured (latencies in milliseconds, CPU as a fraction of one core)."""

    mode: str
    window_s: float
    requests: int
    samples: int
    requests_per_s: float
    samples_per_s: float
    latency_ms: dict[str, float]
    errors: dict[str, int]
    client_cpu: float
    server_cpu: float | None
    concurrency: int | None = None
    offered_rate: float | None = None
    dispatch_lag_ms: dict[str, float] = field(default_factory=dict)
    # open loop: latency percentiles per answer ("200", "503", "ConnectionResetError"...), from the
    # scheduled time to the answer, whatever it was (how fast a refusal came, not only that it came)
    by_status_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    # open loop: per ``TIMELINE_S`` window of scheduled time, its start (s) and the p50 / p99 / max
    # latency (ms, answered requests) and count of failed requests: where in the run a tail happened
    timeline: list[dict[str, float | None]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Plain data for JSON (infinite latencies become null)."""
        data = asdict(self)
        for key in ("latency_ms", "dispatch_lag_ms"):
            data[key] = {k: (None if math.isinf(v) else v) for k, v in data[key].items()}
        data["by_status_ms"] = {
            status: {k: (None if math.isinf(v) else v) for k, v in figures.items()}
            for status, figures in data["by_status_ms"].items()
        }
        return data


def percentiles(values_ms: Sequence[float]) -> dict[str, float]:
    """p50 / p90 / p99 / p99.9 / max / mean (nearest-rank percentiles; inf stays inf)."""
    if not values_ms:
        return {}
    ordered = np.sort(np.asarray(values_ms, dtype=np.float64))

    def rank(q: float) -> float:
        return float(ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))])

    finite = ordered[np.isfinite(ordered)]
    mean = float(finite.mean()) if len(finite) else math.inf
    return {"p50": rank(0.50), "p90": rank(0.90), "p99": rank(0.99), "p999": rank(0.999),
            "max": float(ordered[-1]), "mean": mean}  # fmt: skip


def window_rate(done: Sequence[float], samples: Sequence[int], begin: float, end: float, gap: float = 0.05) -> float:
    """Samples per second completed in ``[begin, end]``.

    Completions that come in bursts (a batch answered at once, bursts separated by more than
    ``gap`` seconds) are counted from the end of the first burst in the window to the end of the
    last complete one: only whole batches, over exactly the time they took. A steady stream (fewer
    than three bursts) is simply counted over the window.
    """
    pairs = sorted((t, n) for t, n in zip(done, samples, strict=True) if begin <= t <= end)
    if not pairs:
        return 0.0
    bursts: list[list[tuple[float, int]]] = [[pairs[0]]]
    for previous, current in itertools.pairwise(pairs):
        if current[0] - previous[0] > gap:
            bursts.append([])
        bursts[-1].append(current)
    if len(bursts) < 3:
        return sum(n for _, n in pairs) / (end - begin)
    if end - bursts[-1][-1][0] <= gap:  # the last burst may still be arriving at the window's end
        bursts.pop()
    counted = sum(n for burst in bursts[1:] for _, n in burst)
    span = bursts[-1][-1][0] - bursts[0][-1][0]
    return counted / span if span > 0 else 0.0


class _Cpu:
    """CPU seconds of this process and (optionally) of another process tree."""

    def __init__(self, server_cpu: Callable[[], float] | None) -> None:
        self.server_cpu = server_cpu
        self.marks: list[tuple[float, float, float | None]] = []

    def mark(self) -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        server = self.server_cpu() if self.server_cpu else None
        self.marks.append((time.perf_counter(), usage.ru_utime + usage.ru_stime, server))

    def fractions(self) -> tuple[float, float | None]:
        (t0, c0, s0), (t1, c1, s1) = self.marks[0], self.marks[-1]
        wall = max(t1 - t0, 1e-9)
        server = (s1 - s0) / wall if s0 is not None and s1 is not None else None
        return (c1 - c0) / wall, server

    async def probe(self, begin: float, end: float) -> None:
        await asyncio.sleep(max(0.0, begin - time.perf_counter()))
        self.mark()
        await asyncio.sleep(max(0.0, end - time.perf_counter()))
        self.mark()


def _status(exc: BaseException) -> str:
    return type(exc).__name__


def _run(coroutine: Any) -> Any:
    """Run on a fresh uvloop with the garbage collector paused (its pauses would show up as latency)."""
    import uvloop

    gc.collect()
    gc.disable()
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coroutine)
    finally:
        gc.enable()


def closed_loop(
    base_url: str,
    request: HttpRequest,
    *,
    concurrency: int,
    warmup_s: float,
    duration_s: float,
    server_cpu: Callable[[], float] | None = None,
) -> LoadResult:
    """``concurrency`` closed loops of ``request`` for ``warmup_s + duration_s``; figures over the last ``duration_s``.

    Each loop has its own keep-alive connection. A loop whose request failed waits ``Retry-After``
    (capped at 1 s) or 10 ms before its next one. Requests still in flight at the end are abandoned
    (their connections closed).
    """
    return _run(_closed(base_url, request, concurrency, warmup_s, duration_s, server_cpu))


async def _closed(
    base_url: str,
    request: HttpRequest,
    concurrency: int,
    warmup_s: float,
    duration_s: float,
    server_cpu: Callable[[], float] | None,
) -> LoadResult:
    records: list[tuple[float, float, int | str]] = []
    client = Client(base_url, concurrency)
    data = client.encode(request)
    cpu = _Cpu(server_cpu)
    start = time.perf_counter()
    begin, end = start + warmup_s, start + warmup_s + duration_s

    async def loop() -> None:
        connection: Connection | None = None
        while (sent := time.perf_counter()) < end:
            retry = 0.01
            status: int | str
            try:
                if connection is None or connection.broken:
                    connection = await client.connect()
                status, _, headers = await connection.send(data)
                if status != 200:
                    retry = min(1.0, float(headers.get("retry-after") or 0.01))
            except (OSError, ConnectionError) as exc:
                status, connection = _status(exc), None
            records.append((sent, time.perf_counter(), status))
            if status != 200:
                await asyncio.sleep(retry)

    loops = [asyncio.create_task(loop()) for _ in range(concurrency)]
    await cpu.probe(begin, end)
    for task in loops:
        task.cancel()
    await asyncio.gather(*loops, return_exceptions=True)
    client.close()
    ok = [(sent, done) for sent, done, status in records if status == 200 and begin <= done <= end]
    rate = window_rate([done for _, done in ok], [request.samples] * len(ok), begin, end)
    client_cpu, server = cpu.fractions()
    return LoadResult(
        mode="closed",
        window_s=duration_s,
        requests=len(ok),
        samples=len(ok) * request.samples,
        requests_per_s=rate / request.samples,
        samples_per_s=rate,
        latency_ms=percentiles([(done - sent) * 1e3 for sent, done in ok]),
        errors=_errors(status for _, done, status in records if begin <= done <= end),
        client_cpu=client_cpu,
        server_cpu=server,
        concurrency=concurrency,
    )


def open_loop(
    base_url: str,
    request: HttpRequest,
    *,
    rate: float,
    warmup_s: float,
    duration_s: float,
    drain_s: float = 10.0,
    max_connections: int = 512,
    server_cpu: Callable[[], float] | None = None,
) -> LoadResult:
    """Requests scheduled every ``1/rate`` s for ``warmup_s + duration_s``; latency from the scheduled time.

    Figures cover the requests scheduled in the last ``duration_s``; a failed request, or one not
    answered ``drain_s`` after the schedule ends, counts as infinite latency.
    """
    return _run(_open(base_url, request, rate, warmup_s, duration_s, drain_s, max_connections, server_cpu))


async def _open(
    base_url: str,
    request: HttpRequest,
    rate: float,
    warmup_s: float,
    duration_s: float,
    drain_s: float,
    max_connections: int,
    server_cpu: Callable[[], float] | None,
) -> LoadResult:
    total = int((warmup_s + duration_s) * rate)
    records: dict[int, tuple[float, float, int | str]] = {}
    client = Client(base_url, max_connections)
    data = client.encode(request)
    cpu = _Cpu(server_cpu)
    start = time.perf_counter() + 0.05
    begin, end = start + warmup_s, start + warmup_s + duration_s

    async def one(index: int) -> None:
        sent = time.perf_counter()
        try:
            status: int | str = (await client.send(data))[0]
        except (OSError, ConnectionError) as exc:
            status = _status(exc)
        records[index] = (sent, time.perf_counter(), status)

    probe = asyncio.create_task(cpu.probe(begin, end))
    pending: set[asyncio.Task[None]] = set()
    index = 0
    while index < total:
        now = time.perf_counter()
        while index < total and start + index / rate <= now:
            task = asyncio.create_task(one(index))
            pending.add(task)
            task.add_done_callback(pending.discard)
            index += 1
        if index < total:
            await asyncio.sleep(max(0.0, start + index / rate - time.perf_counter()))
    await probe
    if pending:
        await asyncio.wait(set(pending), timeout=drain_s)
    for task in list(pending):
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    client.close()
    latencies, lags, statuses = [], [], []
    answered: dict[str, list[float]] = {}
    windows: dict[int, list[float]] = {}
    for index in range(total):
        scheduled = start + index / rate
        if not begin <= scheduled < end:
            continue
        sent, done, status = records.get(index, (math.inf, math.inf, "unanswered"))
        statuses.append(status)
        latencies.append((done - scheduled) * 1e3 if status == 200 else math.inf)
        lags.append((sent - scheduled) * 1e3)
        answered.setdefault(str(status), []).append((done - scheduled) * 1e3)
        windows.setdefault(int((scheduled - begin) // TIMELINE_S), []).append(latencies[-1])
    ok = sum(status == 200 for status in statuses)
    client_cpu, server = cpu.fractions()
    return LoadResult(
        mode="open",
        window_s=duration_s,
        requests=ok,
        samples=ok * request.samples,
        requests_per_s=ok / duration_s,
        samples_per_s=ok * request.samples / duration_s,
        latency_ms=percentiles(latencies),
        errors=_errors(statuses),
        client_cpu=client_cpu,
        server_cpu=server,
        offered_rate=rate,
        dispatch_lag_ms=percentiles(lags),
        by_status_ms={status: percentiles(values) for status, values in sorted(answered.items())},
        timeline=[_window(number, values) for number, values in sorted(windows.items())],
    )


def _window(number: int, latencies_ms: list[float]) -> dict[str, float | None]:
    finite = [value for value in latencies_ms if not math.isinf(value)]
    figures = percentiles(finite)  # empty (None below) when every request of the window failed
    return {"start_s": number * TIMELINE_S, "p50": figures.get("p50"), "p99": figures.get("p99"),
            "max": figures.get("max"), "failed": len(latencies_ms) - len(finite)}  # fmt: skip


def _errors(statuses: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for status in statuses:
        if status != 200:
            counts[str(status)] = counts.get(str(status), 0) + 1
    return counts
