"""Two ways a write stays right while other requests and workers write the same rows, on PostgreSQL and on SQLite
(where a SELECT takes no lock and SELECT ... FOR UPDATE locks nothing):

- `move_row`: a state change as one UPDATE guarded by the state it moves from; its rowcount says whether it applied.
- `hold_rows`: a write to a row that a later check depends on, made before the check (an UPDATE that changes
  nothing: Postgres locks the row until the transaction ends, SQLite takes its database write lock). Two requests
  that each hold the same row before checking what the other does (create a job on a file / delete the file)
  cannot both pass: one waits for the other's commit and then sees it. Rows held together are held in primary-key
  order, so no two requests wait on each other.
"""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import CursorResult, update
from sqlalchemy.orm import InstrumentedAttribute, Session


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
