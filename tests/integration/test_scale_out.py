"""Scale-out: one API process and two worker processes on one PostgreSQL database and S3 storage.

PostgreSQL is Debian's server started for the test (skips, saying why, when it cannot start);
S3 is moto's server in a child process. Every job must run exactly once (one claim, one worker)
and every artifact must download intact through the API.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.builders import mlp_data, mlp_onnx
from tests.pg import PostgresServer, own_postgres
from tests.s3server import S3Server, dummy_aws_env, start_s3_server
from tests.serverproc import FAST_JOB, running, start_server, start_worker, wait_job

pytestmark = pytest.mark.slow

JOBS = 6


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    with own_postgres() as server:  # pytest.skip with the reason when PostgreSQL cannot run here
        yield server


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    server = start_s3_server()
    try:
        server.create_bucket("slimserve")
        yield server
    finally:
        server.stop()


def test_two_workers_on_postgres_and_s3_run_each_job_once(
    postgres: PostgresServer, s3: S3Server, tmp_path: Path
) -> None:
    settings = {
        "database_url": postgres.create_database(),
        "storage_url": "s3://slimserve/artifacts",
        "s3_endpoint_url": s3.endpoint_url,
        "poll_seconds": "0.2",
        "heartbeat_seconds": "1",
        "lease_seconds": "20",
    }
    env = dummy_aws_env()
    model = mlp_onnx(tmp_path / "mlp.onnx")
    data = mlp_data(tmp_path / "mlp.npz")
    home = tmp_path / "api"
    with (
        running(start_server(home, env=env, run_worker="false", **settings)) as api,  # type: ignore[arg-type]
        running(start_worker(tmp_path / "w1", env=env, name="w1", log_level="info", **settings)) as w1,
        running(start_worker(tmp_path / "w2", env=env, name="w2", log_level="info", **settings)) as w2,
    ):
        job_ids = []
        for index in range(JOBS):
            config = json.dumps({"name": f"model-{index}", **FAST_JOB})
            with open(model, "rb") as m, open(data, "rb") as d:
                answer = httpx.post(
                    f"{api.url}/v1/models",
                    files={"model": m, "data": d},
                    data={"config": config},
                    timeout=30,
                )
            assert answer.status_code == 202, answer.text
            job_ids.append(answer.json()["job"]["id"])
        jobs = [wait_job(api.url, job_id, timeout=300) for job_id in job_ids]
        logs = w1.output() + w2.output()
        started = {name: _started_jobs(proc.output()) for name, proc in (("w1", w1), ("w2", w2))}

        for job in jobs:
            assert job["status"] == "succeeded", (job, logs[-3000:])
            assert job["attempts"] == 1, job
            assert job["version"] == 2
        # exactly once: every job id started by exactly one worker, one time
        all_started = started["w1"] + started["w2"]
        assert sorted(all_started) == sorted(job_ids), logs[-3000:]
        assert started["w1"] and started["w2"], "both workers should have taken jobs"

        with httpx.Client(base_url=api.url, timeout=30) as client:
            for index in range(JOBS):
                versions = client.get(f"/v1/models/model-{index}").json()["versions"]
                assert [v["number"] for v in versions] == [1, 2]
                for version in versions:
                    assert version["state"] == "ready"
                    for filename, meta in version["files"].items():
                        body = client.get(f"/v1/models/model-{index}/versions/{version['number']}/{filename}")
                        assert body.status_code == 200
                        assert hashlib.sha256(body.content).hexdigest() == meta["sha256"]
                        assert body.headers["etag"] == f'"{meta["sha256"]}"'
                        assert len(body.content) == meta["size"]


def _started_jobs(log: str) -> list[str]:
    return re.findall(r"job ([0-9a-f]{32}) \(\S+\) attempt \d+ started", log)
