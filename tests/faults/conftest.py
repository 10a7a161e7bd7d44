"""Fixtures for the fault-injection suite: the e2e ones (imported, not copied) and the invariant checker."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import MlpFiles, mlp_files
from tests.faults.serving_kit import Seed, build_seed

__all__ = ["mlp_files", "seed"]


@pytest.fixture(scope="session")
def seed(tmp_path_factory: pytest.TempPathFactory, mlp_files: MlpFiles) -> Seed:
    """Upload ``m`` and ``slow`` once for every serving fault test, let their jobs succeed, stop the server."""
    return build_seed(tmp_path_factory.mktemp("serving-faults"), mlp_files)
