"""What the service benchmarks (and the integration tests) share: a free port, waiting for a server, a scratch
Postgres database. Stopping a process: app.core.processes.stop_process."""

from __future__ import annotations

import os
import socket
import subprocess
import time

import httpx

PG = os.environ.get("TUNEFORGE_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until_up(url: str, *, process: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    """Until url answers 200; fails at once if process exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def create_database(name: str) -> str:
    """A new, empty Postgres database called name (dropped first if it exists); returns its URL."""
    _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', f'CREATE DATABASE "{name}"')
    return f"{PG}/{name}"


def drop_database(name: str) -> None:
    _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _admin(*statements: str) -> None:
    from sqlalchemy import create_engine, text

    admin = create_engine(f"{PG}/postgres", isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            for statement in statements:
                conn.execute(text(statement))
    finally:
        admin.dispose()
