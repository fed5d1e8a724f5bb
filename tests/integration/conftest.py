"""Real processes: `tuneforge api` and `tuneforge worker` against Postgres and Redis (tests/support/service.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.core.processes import stop_process
from tests.support.databases import PG_ADMIN_URL
from tests.support.processes import free_port, wait_until_up
from tests.support.service import Service, all_events, running_service, wait_for_status


# Package scope: tests/faults imports this fixture too, and each package gets its own processes, database
# and queue, torn down when the package is done. (Shared names once let the faults package's workers,
# still alive, take the integration package's jobs.)
@pytest.fixture(scope="package")
def service(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Service]:
    """API and one worker as separate processes, sharing only Postgres and Redis."""
    root = tmp_path_factory.mktemp("service")
    with running_service(root, tiny_model_dir=tiny_model_dir, name=f"it_{os.getpid()}_{root.name}") as svc:
        yield svc


__all__ = ["all_events", "PG_ADMIN_URL", "Service", "free_port", "stop_process", "wait_for_status", "wait_until_up"]
