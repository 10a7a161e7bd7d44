"""Fixtures for the adversarial suite: the e2e ones, imported (not copied) from ``tests/e2e/conftest.py``."""

from __future__ import annotations

from tests.e2e.conftest import mlp_files

__all__ = ["mlp_files"]
