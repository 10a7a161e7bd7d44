"""Alembic environment: runs on the connection that :func:`service.storage.db.migrate` hands over.

There is no alembic.ini and no URL here: ``migrate(engine)`` opens the transaction (holding the
database's write lock), puts its connection in ``config.attributes["connection"]`` and calls
``alembic upgrade head``; the migrations join that transaction.
"""

from __future__ import annotations

from alembic import context

from service.storage.db import metadata


def run_migrations() -> None:
    """Run the pending migrations on the caller's connection (offline ``--sql`` mode is not offered)."""
    connection = context.config.attributes.get("connection")
    if connection is None or context.is_offline_mode():
        raise RuntimeError("run slimserve migrations through service.storage.db.migrate(engine)")
    context.configure(connection=connection, target_metadata=metadata)
    with context.begin_transaction():
        context.run_migrations()


run_migrations()
