"""A server whose database is unreachable at start stays live but not ready, then recovers.

Real PostgreSQL (Debian's binaries; skipped with the reason without them), stopped before
``slimserve serve`` starts and started again on the same port while the server runs. This is the
Kubernetes case: the pod must not crash-loop while its database is away, and must not receive
traffic until the database answers.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import MlpFiles, job_config, upload
from tests.faults.invariants import Ledger, assert_invariants
from tests.pg import PostgresServer, own_postgres
from tests.serverproc import running, start_server, wait_for, wait_job

pytestmark = pytest.mark.slow


@pytest.fixture
def postgres() -> Iterator[PostgresServer]:
    with own_postgres() as server:  # pytest.skip with the reason when PostgreSQL cannot run here
        yield server


def status(url: str, path: str) -> int:
    return httpx.get(f"{url}{path}", timeout=10).status_code


def test_unreachable_database_at_start_is_live_not_ready_until_it_answers(
    postgres: PostgresServer, tmp_path: Path, mlp_files: MlpFiles
) -> None:
    database_url = postgres.create_database().replace("postgresql://", "postgresql+psycopg://")
    postgres.stop()
    home = tmp_path / "home"
    with running(
        start_server(home, database_url=database_url, registry_poll_seconds="0.5", poll_seconds="0.2")
    ) as server:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:  # several migration retries fail meanwhile
            assert status(server.url, "/v2/health/live") == 200
            assert status(server.url, "/v2/health/ready") == 503
            time.sleep(0.2)
        assert server.popen.poll() is None, server.output()
        assert status(server.url, "/v1/models") == 503  # the API says why, it does not crash
        assert "database unreachable" in server.output()

        postgres.start()  # the same port again
        wait_for(lambda: status(server.url, "/v2/health/ready") == 200, timeout=60)
        response = upload(server.url, mlp_files.model, mlp_files.data, job_config("after-outage"))
        assert response.status_code == 202, response.text
        ledger = Ledger()
        ledger.acknowledged(response, "after-outage", mlp_files.model, mlp_files.data)
        job = wait_job(server.url, response.json()["job"]["id"])
        assert job["status"] == "succeeded", job
        assert_invariants(home, ledger, mlp_files, server=server, database_url=database_url)
