"""Alembic migrations of the service database; run them with :func:`service.storage.db.migrate`."""
