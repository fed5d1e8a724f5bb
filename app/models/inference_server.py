from __future__ import annotations

from typing import Any

from sqlalchemy import Double, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, JSONType, KeyedMixin


class InferenceServer(KeyedMixin, Base):
    """A running inference process (`tuneforge worker --inference`) and where the API reaches it.

    Written only by the process itself (register at start, heartbeat with what it has loaded, remove at
    shutdown); the API reads these rows to route a completion. A row whose heartbeat is older than
    `worker_stale_seconds` is a process that died without saying so: the API skips it.
    """

    __tablename__ = "inference_servers"

    name: Mapped[str] = mapped_column(String(255), unique=True)
    hostname: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    # The internal HTTP address the API sends generation requests to.
    url: Mapped[str] = mapped_column(String(1024))
    # The secret the API sends with each request (app/services/inference.py, TOKEN_HEADER).
    token: Mapped[str] = mapped_column(String(64))
    # "cpu", "cuda:0", ...
    device: Mapped[str] = mapped_column(String(64))
    # Base models loaded now (names): a request for one of these goes where it is warm.
    loaded: Mapped[list[Any]] = mapped_column(JSONType)
    # Requests generating or waiting there, as of the last heartbeat.
    queued: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[float] = mapped_column(Double)
    heartbeat_at: Mapped[float] = mapped_column(Double)
