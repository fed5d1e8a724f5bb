"""Landing another request's write at a chosen moment of this one: on the session's own connection, just before the
first statement this request sends that starts with a given text (the write the race is about). The other write
runs in the same transaction, so no lock of this request's makes the test wait: it shows what this request does
with a change it did not read, which is what a concurrent request committing at that moment does."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import Session


@contextmanager
def landing_before(session: Session, statement_start: str, write: str | Callable[[Any], None]) -> Iterator[list[str]]:
    """While the block runs, `write` (SQL, or a function of the DB-API cursor) runs once, just before the first
    statement that starts with `statement_start` (case-insensitive); the list yielded holds that statement once
    it has (assert it did: a test whose write never landed shows nothing)."""
    landed: list[str] = []

    def land(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        if not landed and statement.lstrip().upper().startswith(statement_start.upper()):
            landed.append(statement)
            if isinstance(write, str):
                cursor.execute(write)
            else:
                write(cursor)

    bind = session.get_bind()
    event.listen(bind, "before_cursor_execute", land)
    try:
        yield landed
    finally:
        event.remove(bind, "before_cursor_execute", land)
