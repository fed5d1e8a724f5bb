"""Shared test setup: a real Postgres database (savepoint per test), real Redis, the tiny model. Helpers that are
not fixtures live in tests/support/."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.databases import PG_ADMIN_URL, REDIS_URL, drop_database, recreate_database

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="tuneforge-tests-"))

# One database per test session, so that parallel sessions (several developers, CI) never collide.
TEST_DATABASE = f"tuneforge_test_{os.getpid()}"

# Settings are read from the environment once per process: set them before any app import.
os.environ.update({
    "TUNEFORGE_DATABASE_URL": f"{PG_ADMIN_URL}/{TEST_DATABASE}",
    "TUNEFORGE_BROKER_URL": f"{REDIS_URL}/15",
    "TUNEFORGE_DATA_DIR": str(_SESSION_DIR / "data"),
    "TUNEFORGE_CATALOGUE_FILE": str(_SESSION_DIR / "catalogue.json"),
    "TUNEFORGE_REQUIRE_API_KEYS": "true",
    "TUNEFORGE_STORAGE_BACKEND": "database",
})
TINY_MODEL_PATH = _SESSION_DIR / "models" / "tiny-llama"
Path(os.environ["TUNEFORGE_CATALOGUE_FILE"]).write_text(json.dumps({"tiny-llama": {"path": str(TINY_MODEL_PATH)}}))


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    url = recreate_database(TEST_DATABASE)
    yield url
    from app.core.db import get_engine

    get_engine().dispose()
    drop_database(TEST_DATABASE)


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The tiny Llama model, built once per test session and registered as "tiny-llama"."""
    if not (TINY_MODEL_PATH / "config.json").exists():
        subprocess.run([sys.executable, "-m", "worker.training.tiny_model", str(TINY_MODEL_PATH)], check=True)
    return TINY_MODEL_PATH


@pytest.fixture
def session(database_url: str) -> Iterator[object]:
    """A session inside a transaction that is rolled back after the test; commits become savepoints."""
    from sqlalchemy.orm import Session

    from app.core.db import get_engine

    connection = get_engine().connect()
    transaction = connection.begin()
    db = Session(bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False)
    try:
        yield db
    finally:
        db.close()
        transaction.rollback()
        connection.close()
