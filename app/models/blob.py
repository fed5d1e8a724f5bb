from __future__ import annotations

from sqlalchemy import Integer, LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, BigIntKey, now_seconds


class Blob(Base):
    """Bytes kept in the database (storage backend "database"). Present only once complete."""

    __tablename__ = "blobs"

    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    bytes: Mapped[int] = mapped_column(BigIntKey)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[int] = mapped_column(Integer, default=now_seconds)


class BlobChunk(Base):
    """One chunk of a blob; chunks of an unfinished write carry a staging key, never a Blob row."""

    __tablename__ = "blob_chunks"

    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)
