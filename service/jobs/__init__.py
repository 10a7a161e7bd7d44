"""Background optimization jobs: the durable queue in the database, the worker and its sandboxed task."""
