"""Serving faults from RELIABILITY.md against real `slimserve serve` processes: a version that fails to
load, and SIGTERM with requests in flight (the seed and helpers: tests/faults/serving_kit.py).

Every test ends with the four invariants (tests/faults/invariants.py) on its server's home, with the
seed's acknowledged uploads in the ledger.
"""

from __future__ import annotations

import hashlib
import json
import signal
import sqlite3
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import MlpFiles, assert_error, serving, settings_env
from tests.faults.invariants import Exemptions, assert_invariants
from tests.faults.serving_kit import (
    BASE,
    Seed,
    answers,
    assert_503_retry,
    assert_right,
    client_for,
    model_file,
    post,
    rows,
    sample,
    spinning,
    start_slow,
    version_of,
)
from tests.serverproc import start_server, wait_for

# --------------------------------------------------------------------------- a version that fails to load


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
