"""Engine and sessions. One engine per process; sessions are short (no transaction spans a run)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from app.core.config import get_settings

# Connections per process: POOL_SIZE kept open, up to POOL_MAX_OVERFLOW more at busy times; one more checkout
# waits up to pool_timeout (30 s). An API request holds its connection from the caller lookup to the end of its
# handler, across thread-pool hops: were every thread (anyio's default 40) waiting here for a connection, the
# requests holding the connections would wait for a thread, and the API would stall until pool_timeout (it did,
# at 100 concurrent requests in bench/api.py). Admitting at most this many sessions at once (FastAPI's
# Depends(get_session, max_concurrency=...) in app/api/deps.py) prevents it.
POOL_SIZE, POOL_MAX_OVERFLOW = 10, 20
CONNECT_TIMEOUT_SECONDS = 5


def build_engine(url: str) -> Engine:
    """An engine for url; SQLite gets WAL and a busy timeout so API and worker can share it."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    # pre_ping: a Postgres restart must cost one failed checkout, not a poisoned pool. connect_timeout: an
    # unreachable host fails a request (503) in seconds instead of hanging it for the TCP timeout.
    return create_engine(url, pool_pre_ping=True, pool_size=POOL_SIZE, max_overflow=POOL_MAX_OVERFLOW,
                         connect_args={"connect_timeout": CONNECT_TIMEOUT_SECONDS})


@lru_cache
def get_engine() -> Engine:
    return build_engine(get_settings().resolved_database_url)


@lru_cache
def get_sessionmaker() -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(), expire_on_commit=False)


@contextmanager
def session_scope() -> Iterator[Session]:
    """A session that commits on success and rolls back on error (worker and CLI use)."""
    session = get_sessionmaker()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
