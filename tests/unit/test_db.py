"""service.storage.db: engine settings, migrations, write locks and the bounded retry rules."""

from __future__ import annotations

import multiprocessing
import sqlite3
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, Engine, event, func, insert, inspect, select, text
from sqlalchemy import exc as sa_exc

from service.errors import StorageFull, Unavailable
from service.storage import db
from service.storage.db import (
    create_db_engine,
    metadata,
    migrate,
    models,
    read_connection,
    run_write,
    write_transaction,
)
from tests.pg import database_url, postgres_server, postgres_url  # noqa: F401  (fixtures)


@pytest.fixture
def engine(database_url: str) -> object:  # noqa: F811
    """A migrated engine on a new SQLite file or an emptied PostgreSQL database."""
    made = create_db_engine(database_url)
    migrate(made)
    yield made
    made.dispose()


def _model_count(engine: Engine) -> int:
    with read_connection(engine) as conn:
        return int(conn.execute(select(func.count()).select_from(models)).scalar_one())


def _add_model(conn: Connection, name: str) -> None:
    conn.execute(insert(models).values(name=name, storage_prefix="p", created_at=1.0))


def test_sqlite_pragmas_and_parent_folder(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "slimserve.db"
    engine = create_db_engine(f"sqlite:///{path}", busy_timeout_s=2.5)
    with read_connection(engine) as conn:
        pragmas = {
            name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()
            for name in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
        }
    engine.dispose()
    assert path.exists()
    assert pragmas == {"journal_mode": "wal", "synchronous": 2, "foreign_keys": 1, "busy_timeout": 2500}


@pytest.mark.parametrize("scheme", ["postgresql", "postgres", "postgresql+psycopg"])
def test_postgres_urls_use_psycopg3_with_pre_ping(scheme: str) -> None:
    engine = create_db_engine(f"{scheme}://user:secret@db.internal:5432/slimserve")
    assert engine.url.drivername == "postgresql+psycopg"
    assert engine.pool._pre_ping
    engine.dispose()


def test_unsupported_url_refused_without_leaking_it() -> None:
    with pytest.raises(ValueError, match="unsupported database URL scheme 'mysql'") as caught:
        create_db_engine("mysql://user:secret@db.internal/slimserve")
    assert "secret" not in str(caught.value) and "db.internal" not in str(caught.value)


def test_migrated_schema_matches_the_tables_and_migrating_again_is_a_no_op(engine: Engine) -> None:
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
    with write_transaction(engine) as conn:
        _add_model(conn, "kept")
    migrate(engine)
    with engine.connect() as conn:
        assert MigrationContext.configure(conn).get_current_revision() == "0001"
        assert set(inspect(conn).get_table_names()) == {"alembic_version", "models", "versions", "jobs"}
    assert _model_count(engine) == 1


def _migrate_in_child(url: str, start: object) -> None:
    start.wait()  # type: ignore[attr-defined]
    engine = create_db_engine(url)
    migrate(engine)
    engine.dispose()


def _migrate_from_processes(url: str, count: int = 4) -> list[int | None]:
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(count)
    children = [ctx.Process(target=_migrate_in_child, args=(url, start)) for _ in range(count)]
    for child in children:
        child.start()
    for child in children:
        child.join(120)
    return [child.exitcode for child in children]


@pytest.mark.slow
def test_concurrent_migrations_from_several_processes_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'race.db'}"
    assert _migrate_from_processes(url) == [0, 0, 0, 0]
    engine = create_db_engine(url)
    with engine.connect() as conn:
        assert MigrationContext.configure(conn).get_current_revision() == "0001"
    engine.dispose()


@pytest.mark.slow
def test_concurrent_migrations_from_several_processes_postgres(postgres_url: str) -> None:  # noqa: F811
    assert _migrate_from_processes(postgres_url) == [0, 0, 0, 0]
    engine = create_db_engine(postgres_url)
    with engine.connect() as conn:
        assert MigrationContext.configure(conn).get_current_revision() == "0001"
    engine.dispose()


def test_write_transaction_holds_the_write_lock_from_begin_and_reads_do_not(tmp_path: Path) -> None:
    path = tmp_path / "lock.db"
    engine = create_db_engine(f"sqlite:///{path}")
    migrate(engine)
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        # no statement yet: BEGIN IMMEDIATE alone must hold the lock
        with write_transaction(engine), pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("BEGIN IMMEDIATE")
        with read_connection(engine) as conn:
            conn.execute(select(models.c.id)).all()
            other.execute("BEGIN IMMEDIATE")  # a reader leaves writers free
            other.execute("ROLLBACK")
    finally:
        other.close()
        engine.dispose()


def test_write_transaction_commits_or_rolls_back(engine: Engine) -> None:
    with write_transaction(engine) as conn:
        _add_model(conn, "committed")
    with pytest.raises(RuntimeError), write_transaction(engine) as conn:
        _add_model(conn, "rolled-back")
        raise RuntimeError("boom")
    assert _model_count(engine) == 1


def test_locked_database_gives_unavailable_after_bounded_retries(tmp_path: Path) -> None:
    path = tmp_path / "busy.db"
    engine = create_db_engine(f"sqlite:///{path}", busy_timeout_s=0.05)
    migrate(engine)
    begins: list[str] = []

    @event.listens_for(engine, "before_cursor_execute")
    def count_begins(conn: Connection, cursor: object, statement: str, *args: object) -> None:
        if statement == "BEGIN IMMEDIATE":
            begins.append(statement)

    ran: list[int] = []

    def work(conn: Connection) -> None:
        ran.append(1)
        _add_model(conn, "m")

    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process's long write transaction
    try:
        with pytest.raises(Unavailable, match=r"^database unavailable$"):
            run_write(engine, work, idempotent=False)
        assert len(begins) == db.ATTEMPTS and ran == []
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    run_write(engine, work, idempotent=False)  # the lock is gone: works again
    assert _model_count(engine) == 1
    engine.dispose()


def _dropped(engine: Engine) -> sa_exc.OperationalError:
    """The error a dropped connection raises on this engine's driver."""
    if engine.dialect.name == "sqlite":
        return sa_exc.OperationalError("COMMIT", None, sqlite3.OperationalError("disk I/O error"))
    import psycopg

    return sa_exc.OperationalError("COMMIT", None, psycopg.OperationalError("server closed the connection"))


def test_failure_before_commit_is_retried_and_writes_once(engine: Engine) -> None:
    calls: list[int] = []

    def work(conn: Connection) -> str:
        calls.append(1)
        _add_model(conn, "once")
        if len(calls) == 1:
            raise _dropped(engine)
        return "done"

    assert run_write(engine, work, idempotent=False) == "done"
    assert len(calls) == 2 and _model_count(engine) == 1


def _commit_lands_then_connection_drops(engine: Engine) -> None:
    """Fault injection: the first COMMIT reaches the database, then the client sees the connection drop."""
    fired: list[int] = []

    def on_commit(conn: Connection) -> None:
        if not fired:
            fired.append(1)
            conn.connection.dbapi_connection.commit()  # type: ignore[union-attr]
            raise _dropped(engine)

    event.listen(engine, "commit", on_commit)


def test_ambiguous_commit_is_not_retried_unless_idempotent(engine: Engine) -> None:
    calls: list[int] = []

    def insert_model(conn: Connection) -> None:
        calls.append(1)
        _add_model(conn, "landed")

    _commit_lands_then_connection_drops(engine)
    with pytest.raises(Unavailable):
        run_write(engine, insert_model, idempotent=False)
    assert len(calls) == 1 and _model_count(engine) == 1  # not run twice: the commit had landed


def test_ambiguous_commit_of_idempotent_work_is_retried(engine: Engine) -> None:
    calls: list[int] = []

    def ensure_model(conn: Connection) -> None:
        calls.append(1)
        if conn.execute(select(models.c.id).where(models.c.name == "landed")).first() is None:
            _add_model(conn, "landed")

    _commit_lands_then_connection_drops(engine)
    run_write(engine, ensure_model, idempotent=True)
    assert len(calls) == 2 and _model_count(engine) == 1


def test_bugs_and_constraint_violations_propagate_untouched(engine: Engine) -> None:
    calls: list[int] = []

    def missing_table(conn: Connection) -> None:
        calls.append(1)
        conn.execute(text("SELECT * FROM no_such_table"))

    with pytest.raises(sa_exc.DBAPIError) as caught:
        run_write(engine, missing_table, idempotent=True)
    assert not isinstance(caught.value, sa_exc.IntegrityError) and calls == [1]  # no retry
    run_write(engine, lambda conn: _add_model(conn, "dup"), idempotent=False)
    with pytest.raises(sa_exc.IntegrityError):
        run_write(engine, lambda conn: _add_model(conn, "dup"), idempotent=False)


def test_full_database_disk_gives_storage_full(tmp_path: Path) -> None:
    engine = create_db_engine(f"sqlite:///{tmp_path / 'full.db'}")
    migrate(engine)

    def fill(conn: Connection) -> None:
        pages = conn.exec_driver_sql("PRAGMA page_count").scalar_one()
        conn.exec_driver_sql(f"PRAGMA max_page_count = {pages + 2}")  # this connection's disk is "full"
        conn.execute(insert(models).values(name="big", storage_prefix="x" * 64, created_at=0.0))
        conn.exec_driver_sql("CREATE TABLE filler (blob BLOB)")
        conn.exec_driver_sql("INSERT INTO filler VALUES (zeroblob(1000000))")

    with pytest.raises(StorageFull, match="no space left for the database"):
        run_write(engine, fill, idempotent=False)
    engine.dispose()
