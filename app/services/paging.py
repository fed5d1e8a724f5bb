"""Keyset paging on the internal integer key: constant cost however deep the page."""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from app.core.errors import InvalidRequest

T = TypeVar("T")


def page_after(session: Session, query: Select[Any], model: Any, *, project_pk: int | None, after: str | None,
               limit: int, descending: bool = True, param: str = "after", scope: Any = None,
               noun: str = "object") -> tuple[list[Any], bool]:
    """One page of query's rows after the row whose public id is `after`, and whether more follow. The `after`
    row must belong to the project (project_pk) and satisfy `scope` (e.g. the job whose events are listed)."""
    if after:
        cursor = select(model.pk).where(model.id == after)
        if project_pk is not None:
            cursor = cursor.where(model.project_pk == project_pk)
        if scope is not None:
            cursor = cursor.where(scope)
        after_pk = session.scalar(cursor)
        if after_pk is None:
            raise InvalidRequest(f"Invalid 'after': no {noun} with id {after!r} to page after.", param=param,
                                 code="invalid_value")
        query = query.where(model.pk < after_pk if descending else model.pk > after_pk)
    query = query.order_by(model.pk.desc() if descending else model.pk.asc()).limit(limit + 1)
    rows = list(session.scalars(query))
    return rows[:limit], len(rows) > limit
