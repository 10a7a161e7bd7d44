"""service.storage.catalog: the upload transaction, idempotency, name conflicts, listing and cascading delete.

Every test runs on a real SQLite file and on a real PostgreSQL database (skipped without one).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, func, select

from service.errors import BadRequest, Conflict, NotFound
from service.jobs.store import JobStore
from service.storage.catalog import Catalog, FileRef, ModelRecord
from service.storage.db import create_db_engine, jobs, migrate, models, read_connection, versions
from tests.pg import database_url, postgres_server  # noqa: F401  (fixtures)


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:  # noqa: F811
    made = create_db_engine(database_url)
    migrate(made)
    yield made
    made.dispose()


@pytest.fixture
def catalog(engine: Engine) -> Catalog:
    ticks = iter(range(1_000, 10_000))
    return Catalog(engine, clock=lambda: float(next(ticks)))


def _files(name: str) -> dict[str, FileRef]:
    return {
        "original.onnx": FileRef(f"models/{name}/original.onnx", 123, "a" * 64),
        "data.npz": FileRef(f"models/{name}/data.npz", 45, "b" * 64),
    }


def _upload(catalog: Catalog, name: str, key: str | None = None, **extra: Any) -> Any:
    return catalog.create_upload(
        name=name,
        storage_prefix=f"{name}-{key or 'p'}"[:64],
        original_files=_files(name),
        source_format="onnx",
        job_config={"name": name, "max_accuracy_drop": 0.02},
        max_attempts=3,
        idempotency_key=key,
        **extra,
    )


def _rows(engine: Engine) -> tuple[int, int, int]:
    with read_connection(engine) as conn:
        return tuple(  # type: ignore[return-value]
            int(conn.execute(select(func.count()).select_from(table)).scalar_one())
            for table in (models, versions, jobs)
        )


def test_create_upload_records_model_original_version_and_queued_job(catalog: Catalog, engine: Engine) -> None:
    model, job, created = _upload(catalog, "digits")
    assert created is True
    assert (model.name, model.storage_prefix, model.default_version) == ("digits", "digits-p", None)
    assert len(model.versions) == 1
    original = model.version(1)
    assert (original.kind, original.state, original.files) == ("original", "pending", _files("digits"))
    assert original.summary == {"source_format": "onnx"}
    assert (job.status, job.stage, job.progress, job.attempts, job.max_attempts) == ("queued", "queued", 0.0, 0, 3)
    assert (job.model_id, job.model_name, job.config) == (
        model.id,
        "digits",
        {"name": "digits", "max_accuracy_drop": 0.02},
    )
    assert len(job.id) == 32 and model.latest_job == job
    assert JobStore(engine, 30).get(job.id) == job
    assert catalog.get_model("digits") == model
    with pytest.raises(NotFound):
        model.version(2)


def test_same_idempotency_key_returns_the_same_job_and_records_nothing(catalog: Catalog, engine: Engine) -> None:
    model, job, _ = _upload(catalog, "digits", key="retry-1")
    again_model, again_job, created = _upload(catalog, "digits", key="retry-1")
    assert (again_model, again_job, created) == (model, job, False)
    _, other_job, _ = _upload(catalog, "renamed", key="retry-1")  # the key wins over a changed body
    assert other_job.id == job.id
    assert _rows(engine) == (1, 1, 1)
    _, second, created = _upload(catalog, "letters", key="retry-2")
    assert created and second.id != job.id and _rows(engine) == (2, 2, 2)


def test_a_taken_name_is_a_conflict_and_records_nothing(catalog: Catalog, engine: Engine) -> None:
    _upload(catalog, "digits")
    with pytest.raises(Conflict, match=r"^model 'digits' already exists$"):
        _upload(catalog, "digits", key="fresh")
    assert _rows(engine) == (1, 1, 1)
    _model, job, created = _upload(catalog, "digits2", key="fresh")  # the key was not used up
    assert created and job.model_name == "digits2"


def test_limits_are_checked_before_the_database(catalog: Catalog, engine: Engine) -> None:
    with pytest.raises(BadRequest):
        _upload(catalog, "d", key="k" * 201)
    with pytest.raises(BadRequest):
        _upload(catalog, "n" * 129)
    assert _rows(engine) == (0, 0, 0)


def test_concurrent_uploads_of_one_name_create_it_once(catalog: Catalog, engine: Engine) -> None:
    outcomes: list[str] = []
    start = threading.Barrier(4)

    def upload(index: int) -> None:
        start.wait()
        try:
            _upload(catalog, "raced", key=f"k{index}")
            outcomes.append("created")
        except Conflict:
            outcomes.append("conflict")

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(outcomes) == ["conflict", "conflict", "conflict", "created"]
    assert _rows(engine) == (1, 1, 1)


def test_concurrent_retries_with_one_key_share_one_job(catalog: Catalog, engine: Engine) -> None:
    seen: list[tuple[str, bool]] = []
    start = threading.Barrier(4)

    def upload() -> None:
        start.wait()
        _, job, created = _upload(catalog, "raced", key="same")
        seen.append((job.id, created))

    threads = [threading.Thread(target=upload) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len({job_id for job_id, _ in seen}) == 1 and sorted(created for _, created in seen) == [0, 0, 0, 1]
    assert _rows(engine) == (1, 1, 1)


def test_list_models_by_name_with_versions_and_latest_job(catalog: Catalog, engine: Engine) -> None:
    assert catalog.list_models() == []
    for name in ("zeta", "alpha", "mid"):
        _upload(catalog, name)
    store = JobStore(engine, 30)
    claim = store.claim("w1")  # zeta's job, the oldest
    assert claim is not None
    store.succeed(
        claim, optimized_files={"model.onnx": FileRef("k", 1, "e" * 64)}, summary={"speedup": 3}, original_files={}
    )
    listed = catalog.list_models()
    assert [m.name for m in listed] == ["alpha", "mid", "zeta"]
    assert listed == [catalog.get_model(name) for name in ("alpha", "mid", "zeta")]
    zeta: ModelRecord = listed[2]
    assert [v.number for v in zeta.versions] == [1, 2] and zeta.version(2).summary == {"speedup": 3}
    assert zeta.latest_job is not None and (zeta.latest_job.status, zeta.latest_job.result_version) == ("succeeded", 2)
    assert listed[0].latest_job is not None and listed[0].latest_job.status == "queued"


def test_unknown_models_and_versions_are_not_found(catalog: Catalog) -> None:
    _upload(catalog, "digits")
    with pytest.raises(NotFound, match=r"^model not found$"):
        catalog.get_model("nope")
    for name, number in (("digits", 2), ("nope", 1)):
        with pytest.raises(NotFound, match=r"^version not found$"):
            catalog.get_version(name, number)
    assert catalog.get_version("digits", 1).kind == "original"
    with pytest.raises(NotFound):
        catalog.delete_model("nope")


def test_delete_cascades_to_versions_and_jobs(catalog: Catalog, engine: Engine) -> None:
    _, job, _ = _upload(catalog, "digits", key="k1")
    _upload(catalog, "kept")
    store = JobStore(engine, 30)
    claim = store.claim("w1")
    assert claim is not None and claim.job.id == job.id
    assert catalog.delete_model("digits") == "digits-k1"
    assert _rows(engine) == (1, 1, 1)
    with pytest.raises(NotFound):
        catalog.get_model("digits")
    with pytest.raises(NotFound):
        store.get(job.id)
    assert store.succeed(claim, optimized_files={}, summary={}, original_files={}) is None  # its job is gone
    assert store.heartbeat(claim) == "lost"
    model, again, created = _upload(catalog, "digits", key="k1")  # name and key free again
    assert created and again.id != job.id and model.storage_prefix == "digits-k1"
    assert catalog.get_model("kept").latest_job is not None


def test_set_default_version_needs_a_ready_version(catalog: Catalog, engine: Engine) -> None:
    _upload(catalog, "digits")
    with pytest.raises(NotFound, match=r"^version not found or not ready$"):
        catalog.set_default_version("digits", 1)  # version 1 is still pending
    with pytest.raises(NotFound, match=r"^model not found$"):
        catalog.set_default_version("nope", 1)
    store = JobStore(engine, 30)
    claim = store.claim("w1")
    assert claim is not None
    store.succeed(claim, optimized_files={"model.onnx": FileRef("k", 1, "e" * 64)}, summary={}, original_files={})
    assert catalog.get_model("digits").default_version == 2  # deploy defaults to true
    rolled = catalog.set_default_version("digits", 1)
    assert rolled.default_version == 1 and rolled == catalog.get_model("digits")
    assert catalog.set_default_version("digits", 1).default_version == 1  # again: unchanged
    with pytest.raises(NotFound, match=r"^version not found or not ready$"):
        catalog.set_default_version("digits", 3)
    assert catalog.set_default_version("digits", 2).default_version == 2
