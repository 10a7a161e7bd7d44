"""Persistence: the database (engine, schema, migrations, catalog of models and versions) and the artifact store."""
