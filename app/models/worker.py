from __future__ import annotations

from typing import Any

from sqlalchemy import Double, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, JSONType, KeyedMixin


class Worker(KeyedMixin, Base):
    """A registered worker process and what it offers; the routing and admin view read these rows.

    Written only by the worker itself (register at start, heartbeat, current job, shutdown). A row whose
    heartbeat is older than `worker_stale_seconds` is a worker that died without saying so.
    """

    __tablename__ = "workers"

    # TUNEFORGE_WORKER_NAME (default host:pid): the lease owner in job events.
    name: Mapped[str] = mapped_column(String(255), unique=True)
    hostname: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    labels: Mapped[list[str]] = mapped_column(JSONType)
    gpus: Mapped[int] = mapped_column(Integer)
    # The smallest of its GPUs (a job's min_gpu_memory_gb applies to each GPU it gets), in GiB.
    gpu_memory_gb: Mapped[float | None] = mapped_column(Double, nullable=True)
    gpu_names: Mapped[list[str]] = mapped_column(JSONType)
    cpu_count: Mapped[int] = mapped_column(Integer)
    memory_gb: Mapped[float | None] = mapped_column(Double, nullable=True)
    # Its direct queue: jobs that need what only some workers have are sent here.
    queue: Mapped[str] = mapped_column(String(255))
    version: Mapped[str] = mapped_column(String(64))
    # Unix seconds (float).
    started_at: Mapped[float] = mapped_column(Double)
    heartbeat_at: Mapped[float] = mapped_column(Double)
    current_job_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # idle | busy | draining (shutting down: finishes or hands back its job, takes no new one)
    status: Mapped[str] = mapped_column(String(16), default="idle")

    def offers(self) -> dict[str, Any]:
        return {"gpus": self.gpus, "gpu_memory_gb": self.gpu_memory_gb, "labels": list(self.labels)}
