"""Fixtures for the fault-injection suite: the e2e ones (imported, not copied) and the invariant checker."""

from __future__ import annotations

from tests.e2e.conftest import mlp_files

__all__ = ["mlp_files"]
