"""Engine and sessions. One engine per process; sessions are short (no transaction spans a run).

And two ways a write stays right while other requests and workers write the same rows, on PostgreSQL and on SQLite
(where a SELECT takes no lock and SELECT ... FOR UPDATE locks nothing):

- `move_row`: a state change as one UPDATE guarded by the state it moves from; its rowcount says whether it applied.
- `hold_rows`: a write to a row that a later check depends on, made before the check (an UPDATE that changes
  nothing: Postgres locks the row until the transaction ends, SQLite takes its database write lock). Two requests
  that each hold the same row before checking what the other does (create a job on a file / delete the file)
  cannot both pass: one waits for the other's commit and then sees it. Rows held together are held in primary-key
  order, so no two requests wait on each other.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, cast

from sqlalchemy import CursorResult, Engine, create_engine, event, update
from sqlalchemy.orm import InstrumentedAttribute, Session, sessionmaker

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


def move_row(session: Session, row: Any, *conditions: Any, **values: Any) -> bool:
    """UPDATE `row` with `values` where `conditions` still hold; the row is read again either way. False when they
    did not (another writer moved it on): nothing was written."""
    model = type(row)
    result = cast(CursorResult[Any], session.execute(
        update(model).where(model.pk == row.pk, *conditions).values(**values)
        .execution_options(synchronize_session=False)))
    session.refresh(row)
    return result.rowcount == 1


def hold_rows(session: Session, column: InstrumentedAttribute[Any], *conditions: Any) -> int:
    """Hold the row (or rows) of `column`'s table that match `conditions`, writing `column` as it is (a column no
    foreign key refers to, so Postgres takes its weaker row lock); returns how many there were. Several rows held
    together: one call each, in primary-key order."""
    model = column.class_
    result = cast(CursorResult[Any], session.execute(
        update(model).where(*conditions).values({column.key: column}).execution_options(synchronize_session=False)))
    return result.rowcount
