"""Wire models for the admin view of workers."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from app.schemas.common import ListPage


class WorkerJob(BaseModel):
    """The job a worker runs now."""

    id: str
    project_id: str
    project: str
    status: str
    attempt: int
    crashes: int
    step: int
    total_steps: int | None


class WorkerPublic(BaseModel):
    object: Literal["worker"] = "worker"
    # TUNEFORGE_WORKER_NAME (default host:pid): the name in "Attempt N started on ..." events.
    name: str
    hostname: str
    pid: int
    # idle | busy | draining, as the worker last wrote it; see live for whether it is still there.
    status: str
    # Heartbeat within TUNEFORGE_WORKER_STALE_SECONDS: routing only sends jobs to live workers.
    live: bool
    labels: list[str]
    gpus: int
    gpu_memory_gb: float | None
    gpu_names: list[str]
    cpu_count: int
    memory_gb: float | None
    queue: str
    version: str
    started_at: float
    heartbeat_at: float
    seconds_since_heartbeat: float
    current_job: WorkerJob | None


class WorkerList(ListPage[WorkerPublic]):
    pass
