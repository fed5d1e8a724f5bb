"""The worker registry: what each worker offers, whether it is live, and which jobs fit it.

Workers write their own rows (worker/registration.py); routing (app/services/dispatch.py), claims
(app/services/attempts.py) and the admin view read them.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.models import FineTuningJob, Worker
from app.schemas.jobs import JobResources

# A row whose heartbeat is this old belongs to a worker that died long ago (SIGKILL, host lost): it is
# deleted when another worker registers. Until then the admin view shows it as not live.
FORGET_AFTER_SECONDS = 24 * 3600


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process is and offers, as it registers itself."""

    name: str
    hostname: str
    pid: int
    queue: str
    version: str
    gpus: int = 0
    gpu_memory_gb: float | None = None
    labels: tuple[str, ...] = ()
    gpu_names: tuple[str, ...] = ()
    cpu_count: int = 1
    memory_gb: float | None = None
    started_at: float = field(default_factory=time.time)


def direct_queue(settings: Settings, worker_name: str) -> str:
    """The queue only this worker consumes (beside the shared one). The folder broker names files after
    queues and exchanges and accepts only letters, digits, "_", "." and "-": "gpu-a:123" -> "gpu-a_123"."""
    return f"{settings.training_queue}.{re.sub(r'[^A-Za-z0-9_.-]', '_', worker_name)}"


def fits(needs: JobResources, *, gpus: int, gpu_memory_gb: float | None, labels: Any) -> bool:
    """Whether a worker offering gpus (the smallest with gpu_memory_gb) and labels can run the job."""
    if needs.gpus > gpus:
        return False
    if needs.min_gpu_memory_gb is not None and (gpu_memory_gb is None or gpu_memory_gb < needs.min_gpu_memory_gb):
        return False
    return set(needs.labels) <= set(labels)


def worker_fits(needs: JobResources, worker: Worker | WorkerSpec) -> bool:
    return fits(needs, gpus=worker.gpus, gpu_memory_gb=worker.gpu_memory_gb, labels=worker.labels)


def needs_of(resources: dict[str, Any] | None) -> JobResources:
    """A job row's resources (None: a job from before resources existed, which needs nothing: one process)."""
    return JobResources.model_validate(resources) if resources else JobResources(processes=1)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def describe_needs(needs: JobResources) -> str:
    """E.g. "2 GPUs with at least 40 GB each and label 'a100'"."""
    parts = []
    if needs.gpus:
        memory = f" with at least {needs.min_gpu_memory_gb:g} GB each" if needs.min_gpu_memory_gb else ""
        parts.append(_plural(needs.gpus, "GPU") + memory)
    if needs.labels:
        parts.append(("label " if len(needs.labels) == 1 else "labels ") + ", ".join(f"'{x}'" for x in needs.labels))
    return " and ".join(parts) or "nothing"


def describe_worker(worker: Worker) -> str:
    """E.g. "w2 (1 GPU, 24 GB, labels a100,eu)"."""
    parts = [_plural(worker.gpus, "GPU")]
    if worker.gpus and worker.gpu_memory_gb is not None:
        parts.append(f"{worker.gpu_memory_gb:g} GB")
    if worker.labels:
        parts.append("labels " + ",".join(worker.labels))
    return f"{worker.name} ({', '.join(parts)})"


def is_live(worker: Worker, *, settings: Settings, now: float | None = None) -> bool:
    return (now or time.time()) - worker.heartbeat_at <= settings.resolved_worker_stale_seconds


def list_workers(session: Session) -> list[Worker]:
    return list(session.scalars(select(Worker).order_by(Worker.name)))


def get_worker(session: Session, *, name: str) -> Worker | None:
    return session.scalar(select(Worker).where(Worker.name == name))


def live_workers(session: Session, *, settings: Settings) -> list[Worker]:
    """Workers that heartbeat and take new jobs (not draining), by name."""
    cutoff = time.time() - settings.resolved_worker_stale_seconds
    return list(session.scalars(select(Worker).where(Worker.heartbeat_at >= cutoff, Worker.status != "draining")
                                .order_by(Worker.name)))


def register_worker(session: Session, *, spec: WorkerSpec) -> Worker:
    """Insert or replace this worker's row (a restart under the same name replaces the old one)."""
    now = time.time()
    values: dict[str, Any] = {
        "hostname": spec.hostname, "pid": spec.pid, "labels": list(spec.labels), "gpus": spec.gpus,
        "gpu_memory_gb": spec.gpu_memory_gb, "gpu_names": list(spec.gpu_names), "cpu_count": spec.cpu_count,
        "memory_gb": spec.memory_gb, "queue": spec.queue, "version": spec.version, "started_at": spec.started_at,
        "heartbeat_at": now, "current_job_id": None, "status": "idle"}
    session.execute(delete(Worker).where(Worker.heartbeat_at < now - FORGET_AFTER_SECONDS, Worker.name != spec.name))
    row = get_worker(session, name=spec.name)
    if row is None:
        row = Worker(name=spec.name, **values)
        session.add(row)
        try:
            session.commit()
            return row
        except IntegrityError:  # a worker with the same name registered at the same moment
            session.rollback()
            row = get_worker(session, name=spec.name)
            assert row is not None
    for key, value in values.items():
        setattr(row, key, value)
    session.commit()
    return row


def record_heartbeat(session: Session, *, name: str, draining: bool = False) -> bool:
    """Refresh the worker's heartbeat (and mark it draining); False when its row is gone (re-register)."""
    values: dict[str, Any] = {"heartbeat_at": time.time()}
    if draining:
        values["status"] = "draining"
    result = session.execute(update(Worker).where(Worker.name == name).values(**values))
    session.commit()
    return bool(getattr(result, "rowcount", 0))


def set_current_job(session: Session, *, name: str, job_id: str | None, draining: bool = False) -> None:
    """busy with job_id, or idle (None); a draining worker stays draining."""
    status = "draining" if draining else ("busy" if job_id else "idle")
    session.execute(update(Worker).where(Worker.name == name)
                    .values(current_job_id=job_id, status=status, heartbeat_at=time.time()))
    session.commit()


def remove_worker(session: Session, *, name: str) -> None:
    """A clean shutdown: the worker leaves the registry."""
    session.execute(delete(Worker).where(Worker.name == name))
    session.commit()


def current_jobs(session: Session, workers: list[Worker]) -> dict[str, FineTuningJob]:
    """The jobs workers say they run, by job id (for the admin view)."""
    ids = {w.current_job_id for w in workers if w.current_job_id}
    if not ids:
        return {}
    return {j.id: j for j in session.scalars(select(FineTuningJob).where(FineTuningJob.id.in_(ids)))}
