from __future__ import annotations

from sqlalchemy import Boolean, ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, BigIntKey, KeyedMixin, now_seconds


class Project(KeyedMixin, Base):
    """A tenant: every file, job and model belongs to exactly one project."""

    __tablename__ = "projects"

    id: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[int] = mapped_column(Integer, default=now_seconds)


class ApiKey(KeyedMixin, Base):
    """An API key; only its sha256 is stored, the key itself is shown once at creation."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(64), unique=True)
    project_pk: Mapped[int] = mapped_column(BigIntKey, ForeignKey("projects.pk", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(128), default="")
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # The first characters, so an operator can tell keys apart in listings.
    key_prefix: Mapped[str] = mapped_column(String(16))
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[int] = mapped_column(Integer, default=now_seconds)
    revoked_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
