from __future__ import annotations

from typing import Any

from sqlalchemy import ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, BigIntKey, JSONType, KeyedMixin, now_seconds


class File(KeyedMixin, Base):
    """An uploaded dataset or a job's result file; its bytes live in storage under blob_key."""

    __tablename__ = "files"
    __table_args__ = (Index("ix_files_project_pk_pk", "project_pk", "pk"),)

    id: Mapped[str] = mapped_column(String(64), unique=True)
    project_pk: Mapped[int] = mapped_column(BigIntKey, ForeignKey("projects.pk", ondelete="CASCADE"))
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigIntKey)
    sha256: Mapped[str] = mapped_column(String(64))
    blob_key: Mapped[str] = mapped_column(String(255))
    # uploaded -> processed | error (validation of fine-tune datasets).
    status: Mapped[str] = mapped_column(String(16), default="uploaded")
    status_details: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Validation report: format, counts, per-line errors (capped) and statistics.
    report: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    created_at: Mapped[int] = mapped_column(Integer, default=now_seconds)
