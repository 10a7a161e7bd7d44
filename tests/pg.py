"""A throwaway PostgreSQL server for tests (Debian's ``postgresql`` binaries, started on a free port).

The data folder lives under /tmp (not pytest's tmp folders, which the ``postgres`` user cannot
enter) and is owned by ``postgres``: initdb and postgres refuse to run as root, so as root they
run through ``runuser -u postgres``. Authentication is ``trust`` on 127.0.0.1 only; fsync is off
(durability of the test server is not what is tested).

Fixtures: ``postgres_server`` (one server shared by the whole session, whichever modules import
it), ``postgres_url`` (a fresh database per test) and ``database_url`` (parametrized: a SQLite
file, then a fresh PostgreSQL database). Without the binaries, or when the server cannot start,
the PostgreSQL cases skip with the reason.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest


def _pg_bin() -> Path:
    """Debian's newest PostgreSQL binaries (``SLIMSERVE_TEST_PG_BIN`` overrides)."""
    if "SLIMSERVE_TEST_PG_BIN" in os.environ:
        return Path(os.environ["SLIMSERVE_TEST_PG_BIN"])
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0
    )
    return found[-1] if found else Path("/usr/lib/postgresql/15/bin")


PG_BIN = _pg_bin()


class PostgresUnavailable(RuntimeError):
    """PostgreSQL cannot be started here (the message says why)."""


class PostgresServer:
    """One PostgreSQL cluster in a temporary folder; :meth:`start` / :meth:`stop` may be repeated."""

    def __init__(self) -> None:
        for tool in ("initdb", "pg_ctl", "postgres"):
            if not (PG_BIN / tool).exists():
                raise PostgresUnavailable(f"PostgreSQL binaries not found in {PG_BIN}")
        self._as_postgres: list[str] = []
        owner: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresUnavailable("running as root and there is no 'postgres' user") from None
            if shutil.which("runuser") is None:
                raise PostgresUnavailable("running as root and runuser is missing")
            self._as_postgres = ["runuser", "-u", "postgres", "--"]
        self.root = Path(tempfile.mkdtemp(prefix="slimserve-pg-"))
        if owner is not None:
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = 0
        self._reusable: str | None = None
        try:
            self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise

    def start(self) -> None:
        """Start the server on a free loopback port (the same port again after a :meth:`stop`)."""
        self.port = self.port or _free_port()
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=100"
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o", options, "start")

    def stop(self) -> None:
        """Stop the server (fast shutdown: open connections are cut)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")

    def url(self, database: str = "postgres") -> str:
        """The SQLAlchemy URL of ``database`` (plain ``postgresql://``, as a user would write it)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; its URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres") as conn:
            conn.autocommit = True
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def emptied_database(self) -> str:
        """The URL of this server's reusable migrated database, all its rows removed."""
        from service.storage.db import create_db_engine, migrate

        if self._reusable is None:
            self._reusable = self.create_database()
        engine = create_db_engine(self._reusable)
        try:
            migrate(engine)
            with engine.begin() as conn:
                conn.exec_driver_sql("TRUNCATE jobs, versions, models RESTART IDENTITY CASCADE")
        finally:
            engine.dispose()
        return self._reusable

    def close(self) -> None:
        """Stop the server if it runs and remove its folder (again: nothing)."""
        try:
            if self.root.exists() and (self.data / "postmaster.pid").exists():
                self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def _run(self, tool: str, *args: str) -> None:
        command = [*self._as_postgres, str(PG_BIN / tool), *args]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=self.root, check=False)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            if self.log.exists():
                tail += self.log.read_text(errors="replace").strip().splitlines()[-3:]
            raise PostgresUnavailable(f"{tool} failed: {' | '.join(tail)}")


def start_postgres() -> PostgresServer:
    """A new started server; ``pytest.skip`` with the reason when PostgreSQL cannot run here."""
    server: PostgresServer | None = None
    try:
        server = PostgresServer()
        server.start()
    except (PostgresUnavailable, OSError, subprocess.TimeoutExpired) as exc:
        if server is not None:
            server.close()
        pytest.skip(f"PostgreSQL unavailable: {exc}")
    atexit.register(_close_if_owner, server, os.getpid())  # a safety net: close() is idempotent
    return server


@contextlib.contextmanager
def own_postgres() -> Iterator[PostgresServer]:
    """A server of the caller's own (to stop, restart or break), closed at the end of the block."""
    server = start_postgres()
    try:
        yield server
    finally:
        server.close()


def _close_if_owner(server: PostgresServer, owner_pid: int) -> None:
    if os.getpid() == owner_pid:  # never from a forked child that happens to run atexit handlers
        server.close()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


_shared: PostgresServer | None = None
_users = 0


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the session (skips when unavailable); stopped after its last user."""
    global _shared, _users
    if _shared is None:
        _shared = start_postgres()
    _users += 1
    try:
        yield _shared
    finally:
        _users -= 1
        if _users == 0 and _shared is not None:
            _shared.close()
            _shared = None


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """A fresh database on the shared server."""
    return postgres_server.create_database()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new SQLite file in tmp_path, then an emptied PostgreSQL database (skipped when unavailable).

    Creating a PostgreSQL database costs up to a second here, so the PostgreSQL case reuses one
    migrated database per server and empties its tables before each test.
    """
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'slimserve.db'}"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.emptied_database()
