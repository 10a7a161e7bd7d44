"""Serving faults from RELIABILITY.md against real `slimserve serve` processes: a full queue, hot swap
under a running batch, and request timeouts (the seed and helpers: tests/faults/serving_kit.py).

Every test ends with the four invariants (tests/faults/invariants.py) on its server's home, with the
seed's acknowledged uploads in the ledger.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.e2e.conftest import MlpFiles, metric
from tests.faults.serving_kit import (
    Answer,
    Seed,
    assert_503_retry,
    assert_right,
    batches,
    check_invariants,
    client_for,
    fault_server,
    post,
    rows,
    scrape,
    spinning,
    start_slow,
    version_of,
)
from tests.serverproc import Proc

# --------------------------------------------------------------------------- a full queue


@pytest.fixture(scope="module")
def burst_server(seed: Seed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    """Two requests may wait per version; one batch of one request runs at a time."""
    folder = tmp_path_factory.mktemp("burst")
    with fault_server(seed, folder, max_queue_size="2", max_batch_size="1", concurrent_batches="1") as proc:
        yield proc


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
