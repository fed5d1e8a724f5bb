"""Declarative base with a constraint naming convention (stable names for Alembic)."""

from __future__ import annotations

import secrets
import time
from typing import Any

from sqlalchemy import JSON, BigInteger, Integer, MetaData
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# BIGINT keys in Postgres; SQLite only autoincrements an INTEGER PRIMARY KEY.
BigIntKey = BigInteger().with_variant(Integer, "sqlite")
JSONType = JSON().with_variant(JSONB(), "postgresql")


def now_seconds() -> int:
    return int(time.time())


def new_id(prefix: str) -> str:
    """A public id like ``file-3f9a...``: random, so ids leak neither order nor counts."""
    return f"{prefix}{secrets.token_hex(12)}"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: dict[Any, Any] = {dict[str, Any]: JSONType}


class KeyedMixin:
    """An internal integer key for joins and keyset paging, beside the public string id."""

    pk: Mapped[int] = mapped_column(BigIntKey, primary_key=True, autoincrement=True)
