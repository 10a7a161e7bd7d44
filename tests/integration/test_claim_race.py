"""Several real processes claim from one queue until it is empty: every job is claimed exactly once.

Run on one SQLite file (``BEGIN IMMEDIATE`` claims) and on PostgreSQL (``FOR UPDATE SKIP LOCKED``,
skipped when PostgreSQL cannot start here).
"""

from __future__ import annotations

import multiprocessing
from typing import Any

import pytest

from service.jobs.store import JobStore
from service.storage.catalog import Catalog, FileRef
from service.storage.db import create_db_engine, migrate
from tests.pg import database_url, postgres_server  # noqa: F401  (fixtures)

JOBS = 100
WORKERS = 4


def _claim_until_empty(url: str, worker: str, start: Any, results: Any) -> None:
    """Child process: claim and finish jobs until none is queued; report the ids it got (or its error)."""
    claimed: list[str] = []
    error = None
    try:
        engine = create_db_engine(url)
        store = JobStore(engine, lease_seconds=3600)
        start.wait(120)  # everyone ready: the first claims race
        while (claim := store.claim(worker)) is not None:
            claimed.append(claim.job.id)
            if len(claimed) == 1:
                start.wait(120)  # every process holds one job before anyone drains the queue
            if len(claimed) % 2:
                store.succeed(claim, optimized_files={}, summary={}, original_files={})
            else:
                store.fail(claim, "done")
        engine.dispose()
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    results.put((worker, claimed, error))


@pytest.mark.slow
def test_every_job_is_claimed_exactly_once_by_racing_processes(database_url: str) -> None:  # noqa: F811
    engine = create_db_engine(database_url)
    migrate(engine)
    catalog = Catalog(engine)
    files = {"data.npz": FileRef("k", 1, "0" * 64)}
    created = {
        catalog.create_upload(
            name=f"m{index}",
            storage_prefix=f"p{index}",
            original_files=files,
            source_format="onnx",
            job_config={},
            max_attempts=1,
            idempotency_key=None,
        )[1].id
        for index in range(JOBS)
    }
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(WORKERS), ctx.Queue()
    children = [
        ctx.Process(target=_claim_until_empty, args=(database_url, f"w{index}", start, results))
        for index in range(WORKERS)
    ]
    for child in children:
        child.start()
    reports = [results.get(timeout=240) for _ in children]
    for child in children:
        child.join(60)
    assert [child.exitcode for child in children] == [0] * WORKERS

    assert [error for _, _, error in reports] == [None] * WORKERS
    claimed = [job_id for _, ids, _ in reports for job_id in ids]
    assert len(claimed) == JOBS and set(claimed) == created  # each exactly once
    store = JobStore(engine, lease_seconds=3600)
    counts = store.counts()
    assert (counts["queued"], counts["running"], counts["succeeded"] + counts["failed"]) == (0, 0, JOBS)
    assert all(store.get(job_id).attempts == 1 for job_id in created)
    engine.dispose()
