"""The service database: engine, schema (SQLAlchemy Core tables), migrations and transactions.

SQLite (the default) runs in WAL mode with a busy timeout, ``foreign_keys=ON`` and
``synchronous=FULL`` (an acknowledged upload survives a power cut). Write transactions open with
``BEGIN IMMEDIATE`` so two claimers can never both read the same job as queued: this is
SQLAlchemy's documented pysqlite recipe (the driver's own BEGIN is switched off with
``isolation_level = None`` and a ``begin`` event emits ours). PostgreSQL runs through psycopg 3
with ``pool_pre_ping``; claims there use ``FOR UPDATE SKIP LOCKED`` (see :mod:`service.jobs.store`).

Written here rather than taken from a library: :func:`run_write` / :func:`run_read`, a small
bounded retry loop (SQLAlchemy only replaces stale pooled connections, it never re-runs a
transaction). A transaction that fails with a transient error -- SQLite "database is locked", a
dropped or refused PostgreSQL connection, a serialization failure -- is rolled back and run again
with exponential backoff, a few times, then :class:`service.errors.Unavailable` (503) is raised.
Failures before the COMMIT are always safe to retry: the transaction rolled back. A failure
*during* the COMMIT is ambiguous (the server may have committed before the connection dropped),
so it is retried only when the caller declares the work idempotent, i.e. running it again after a
landed commit changes nothing; otherwise it raises Unavailable at once. Each caller says which.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Connection,
    Double,
    Engine,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    text,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, make_url

from service.errors import StorageFull, Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Where alembic finds env.py and versions/ (inside the package, so a wheel carries them).
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

#: Tries of one transaction before Unavailable, and the first backoff (doubled each time, plus jitter).
ATTEMPTS = 4
BACKOFF_S = 0.05

#: Key of the PostgreSQL advisory lock that serialises concurrent migrations ("slimserv" in ASCII).
_MIGRATION_LOCK_KEY = 0x736C696D73657276
#: Execution option read by the SQLite ``begin`` hook: "immediate" takes the write lock at BEGIN.
_BEGIN_OPTION = "slimserve_sqlite_begin"

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_name)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

models = Table(
    "models",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(128), nullable=False, unique=True),
    Column("storage_prefix", String(64), nullable=False),
    Column("default_version", Integer, nullable=True),
    Column("created_at", Double, nullable=False),
)

versions = Table(
    "versions",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("model_id", Integer, ForeignKey("models.id", ondelete="CASCADE"), nullable=False),
    Column("number", Integer, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("state", String(16), nullable=False),
    Column("files", JSON, nullable=False),
    Column("summary", JSON(none_as_null=True), nullable=True),
    Column("created_at", Double, nullable=False),
    UniqueConstraint("model_id", "number", name="uq_versions_model_id_number"),
)

jobs = Table(
    "jobs",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("model_id", Integer, ForeignKey("models.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("status", String(16), nullable=False, index=True),
    Column("stage", String(64), nullable=False),
    Column("progress", Double, nullable=False),
    Column("error", Text, nullable=True),
    Column("config", JSON, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("max_attempts", Integer, nullable=False),
    Column("lease_owner", String(80), nullable=True),
    Column("lease_expires_at", Double, nullable=True),
    Column("cancel_requested", Boolean, nullable=False),
    Column("idempotency_key", String(200), nullable=True, unique=True),
    Column("result_version", Integer, nullable=True),
    Column("created_at", Double, nullable=False),
    Column("updated_at", Double, nullable=False),
    Column("started_at", Double, nullable=True),
    Column("finished_at", Double, nullable=True),
)
Index("ix_jobs_status_created_at", jobs.c.status, jobs.c.created_at)


def create_db_engine(url: str, *, busy_timeout_s: float = 5.0) -> Engine:
    """An engine for a ``sqlite:///`` or ``postgresql://`` URL (the latter mapped to psycopg 3).

    SQLite: the file's parent folder is created; every connection gets WAL, ``busy_timeout``
    (``busy_timeout_s``), ``foreign_keys=ON`` and ``synchronous=FULL``. Nothing connects yet.
    """
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite" and parsed.get_driver_name() == "pysqlite":
        return _sqlite_engine(parsed, busy_timeout_s)
    if backend in ("postgresql", "postgres"):
        if parsed.drivername in ("postgresql", "postgres"):
            parsed = parsed.set(drivername="postgresql+psycopg")
        return create_engine(parsed, pool_pre_ping=True, connect_args={"connect_timeout": 5})
    raise ValueError(f"unsupported database URL scheme {parsed.drivername!r}: use sqlite:/// or postgresql://")


def _sqlite_engine(url: URL, busy_timeout_s: float) -> Engine:
    database = url.database
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url)
    busy_ms = max(0, int(busy_timeout_s * 1000))

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # the driver emits no BEGIN of its own
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {busy_ms}")  # first, so the pragmas below wait too
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = FULL")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        immediate = conn.get_execution_options().get(_BEGIN_OPTION) == "immediate"
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision (alembic ``upgrade head``); a no-op when it is current.

    Safe to call from several processes at once: the whole upgrade runs in one transaction that
    holds the database's write lock (SQLite ``BEGIN IMMEDIATE``, a PostgreSQL advisory lock), so
    the second caller waits and then finds nothing to do.
    """
    from alembic import command
    from alembic.config import Config

    def upgrade(conn: Connection) -> None:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS_DIR))
        config.attributes["connection"] = conn
        command.upgrade(config, "head")

    run_write(engine, upgrade, idempotent=True)


def run_write(engine: Engine, work: Callable[[Connection], T], *, idempotent: bool, attempts: int = ATTEMPTS) -> T:
    """``work(conn)`` inside one short write transaction, committed; retried on transient failures.

    ``idempotent``: running ``work`` again after its commit landed changes nothing, so a failure
    during COMMIT may be retried too (see the module docstring). Raises Unavailable after
    ``attempts`` tries, StorageFull when the database's disk is full; other errors propagate.
    """
    return _run(engine, work, write=True, idempotent=idempotent, attempts=attempts)


def run_read(engine: Engine, work: Callable[[Connection], T], *, attempts: int = ATTEMPTS) -> T:
    """``work(conn)`` inside one read transaction (a consistent snapshot), retried like :func:`run_write`."""
    return _run(engine, work, write=False, idempotent=True, attempts=attempts)


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """A short write transaction (SQLite: ``BEGIN IMMEDIATE``), committed on exit, rolled back on error.

    Not retried (a ``with`` body cannot be re-run); transient failures become Unavailable.
    Prefer :func:`run_write` where the work can be a function.
    """
    try:
        with engine.connect() as conn:
            conn.execution_options(**{_BEGIN_OPTION: "immediate"})
            with conn.begin():
                yield conn
    except Exception as exc:
        _raise_translated(exc)
        raise


@contextmanager
def read_connection(engine: Engine) -> Iterator[Connection]:
    """A connection inside a read transaction (rolled back on exit); transient failures become Unavailable."""
    try:
        with engine.connect() as conn:
            conn.begin()  # closing the connection rolls it back
            yield conn
    except Exception as exc:
        _raise_translated(exc)
        raise


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is a database failure worth retrying: a lock, a dropped or refused connection."""
    if isinstance(exc, sa_exc.DisconnectionError):
        return True
    if not isinstance(exc, sa_exc.DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    if not isinstance(exc, sa_exc.OperationalError) or _is_disk_full(exc):
        return False
    message = str(exc.orig).lower()
    if type(exc.orig).__module__.startswith("sqlite3"):
        # sqlite3 reports both faults and bugs ("no such table") as OperationalError
        return any(word in message for word in ("locked", "busy", "disk i/o", "unable to open"))
    return True  # PostgreSQL: connection refused or dropped, admin shutdown, serialization failure, deadlock


def _run(engine: Engine, work: Callable[[Connection], T], *, write: bool, idempotent: bool, attempts: int) -> T:
    delay = BACKOFF_S
    for attempt in range(1, max(1, attempts) + 1):
        committing = False
        try:
            with engine.connect() as conn:
                if write:
                    conn.execution_options(**{_BEGIN_OPTION: "immediate"})
                trans = conn.begin()
                try:
                    result = work(conn)
                except BaseException:
                    _rollback_quietly(trans)
                    raise
                committing = True
                trans.commit()
                return result
        except Exception as exc:
            if not is_transient(exc):
                _raise_translated(exc)
                raise
            if committing and not idempotent:
                log.warning("database commit failed and may have landed; not retried: %s", _first_line(exc))
                raise Unavailable("database unavailable") from exc
            if attempt >= attempts:
                log.warning("database unavailable after %d tries: %s", attempt, _first_line(exc))
                raise Unavailable("database unavailable") from exc
            log.info("database busy or disconnected (try %d of %d), retrying: %s", attempt, attempts, _first_line(exc))
            time.sleep(delay * (1.0 + 0.5 * random.random()))
            delay *= 2
    raise AssertionError("unreachable")  # pragma: no cover


def _raise_translated(exc: BaseException) -> None:
    """Raise the service error for a database error that has one (Unavailable, StorageFull); else return."""
    if _is_disk_full(exc):
        raise StorageFull("no space left for the database") from exc
    if is_transient(exc):
        raise Unavailable("database unavailable") from exc


def _is_disk_full(exc: BaseException) -> bool:
    if not isinstance(exc, sa_exc.DBAPIError):
        return False
    if getattr(exc.orig, "sqlstate", None) == "53100":  # PostgreSQL disk_full
        return True
    return "database or disk is full" in str(exc.orig).lower()


def _rollback_quietly(trans: Any) -> None:
    try:
        trans.rollback()
    except Exception as exc:  # the original error matters more; a dead connection is discarded anyway
        log.debug("rollback failed: %s", _first_line(exc))


def _first_line(exc: BaseException) -> str:
    detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return detail[0][:200] if detail else type(exc).__name__
