"""Hand jobs to the broker, after their rows are committed. A failed send loses nothing: the job
stays undispatched in the database and the reaper sends it again.

Routing: a job that needs nothing special goes to the shared training queue, which every worker
consumes. A job that asks for GPUs, GPU memory or labels goes there too while its files are checked,
then to the direct queue of a live worker that fits it (idle first, then the one with the fewest jobs
already waiting for it, then the smallest that fits). When no live worker fits, the job says so in one
event and waits; the reaper routes it again each pass, so it starts once a fitting worker registers.
Whichever worker takes a message claims the best queued job that fits it (app/services/attempts.py),
so a message is a wake-up call, not a lease.
"""

from __future__ import annotations

import logging
import time

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from app.core.broker import RUN_JOB_TASK, celery_client
from app.core.config import Settings, get_settings
from app.models import FineTuningJob, JobEvent, JobStatus, Worker
from app.models.job import WAITING_STATUSES
from app.schemas.jobs import JobResources
from app.services import workers as worker_service
from app.services.jobs import add_event

logger = logging.getLogger("tuneforge.dispatch")

NO_FIT_PREFIX = "No worker can run this job"
FIT_AGAIN_PREFIX = "A worker that can run this job is live"
MAX_WORKERS_NAMED = 10


def dispatch_job(session: Session, *, job_id: str, settings: Settings | None = None,
                 queue: str | None = None) -> bool:
    """Send the job's task to the queue its resources route it to (or to `queue`); True when sent."""
    settings = settings or get_settings()
    job = session.scalar(select(FineTuningJob).where(FineTuningJob.id == job_id))
    if job is None:
        return False
    if queue is None:
        queue = settings.training_queue
        needs = worker_service.needs_of(job.resources)
        if needs.requires_worker and job.status == JobStatus.VALIDATING_FILES:
            # Any free worker checks the files (that needs no GPU) and then routes the job on
            # (worker/supervisor.py), so a job waiting for a busy or missing worker already waits
            # `queued`, in priority order, instead of behind that worker's backlog.
            _fitting_workers(session, job=job, needs=needs, settings=settings)
        elif needs.requires_worker:
            target = route(session, job=job, needs=needs, settings=settings)
            if target is None:
                mark_undispatched(session, job_id=job_id)  # nothing to send: the reaper routes it again
                return False
            queue = target
    return send(session, job_id=job_id, queue=queue)


def mark_undispatched(session: Session, *, job_id: str) -> None:
    """The waiting job has no message on its way: the next reaper pass of any worker sends (or routes) it."""
    session.execute(update(FineTuningJob).where(FineTuningJob.id == job_id, FineTuningJob.status.in_(WAITING_STATUSES))
                    .values(dispatched_at=None, dispatch_queue=None))
    session.commit()


def send(session: Session, *, job_id: str, queue: str) -> bool:
    """Publish the run-job message to one queue and record when and where it went."""
    try:
        celery_client().send_task(RUN_JOB_TASK, args=[job_id], queue=queue, retry=True,
                             retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5})
    except Exception as exc:  # broker down: the reaper re-dispatches undispatched jobs
        logger.warning("could not dispatch job %s (will retry from the reaper): %s", job_id, exc)
        return False
    session.execute(update(FineTuningJob).where(FineTuningJob.id == job_id)
                    .values(dispatched_at=time.time(), dispatch_queue=queue))
    session.commit()
    return True


def route(session: Session, *, job: FineTuningJob, needs: JobResources, settings: Settings) -> str | None:
    """The direct queue of the live worker that should run the job; None (and a warn event) if none fits."""
    fitting = _fitting_workers(session, job=job, needs=needs, settings=settings)
    if not fitting:
        return None
    waiting = {queue: count for queue, count in session.execute(
        select(FineTuningJob.dispatch_queue, func.count()).where(
            FineTuningJob.status.in_(WAITING_STATUSES), FineTuningJob.pk != job.pk,
            FineTuningJob.dispatch_queue.in_([w.queue for w in fitting]))
        .group_by(FineTuningJob.dispatch_queue))}

    def rank(worker: Worker) -> tuple[bool, int, int, float, str]:
        return (worker.status != "idle", waiting.get(worker.queue, 0), worker.gpus, worker.gpu_memory_gb or 0.0,
                worker.name)

    chosen = min(fitting, key=rank)
    _note(session, job=job, level="info", message=f"{FIT_AGAIN_PREFIX}: sent to {chosen.name}.",
          data={"code": "routed", "worker": chosen.name}, only_after_no_fit=True)
    return chosen.queue


def _fitting_workers(session: Session, *, job: FineTuningJob, needs: JobResources, settings: Settings
                     ) -> list[Worker]:
    """Live workers that fit the job; when there are none, the job says so (once per reason)."""
    live = worker_service.live_workers(session, settings=settings)
    fitting = [w for w in live if worker_service.worker_fits(needs, w)]
    if not fitting:
        _note(session, job=job, level="warn", message=_no_fit_message(needs, live),
              data={"code": "no_fitting_worker", "resources": needs.model_dump(mode="json"),
                    "live_workers": [w.name for w in live]})
    return fitting


def _no_fit_message(needs: JobResources, live: list[Worker]) -> str:
    if not live:
        workers = "no worker is live"
    else:
        named = ", ".join(worker_service.describe_worker(w) for w in live[:MAX_WORKERS_NAMED])
        more = f" and {len(live) - MAX_WORKERS_NAMED} more" if len(live) > MAX_WORKERS_NAMED else ""
        workers = f"live workers: {named}{more}"
    return (f"{NO_FIT_PREFIX}: it asks for {worker_service.describe_needs(needs)}; {workers}. It stays queued and "
            "starts when a worker that fits registers (or cancel it and ask for less).")


def _note(session: Session, *, job: FineTuningJob, level: str, message: str, data: dict[str, object],
          only_after_no_fit: bool = False) -> None:
    """A routing event, written once per change: not again while the job's last routing note is the same."""
    last = session.scalar(select(JobEvent.message).where(
        JobEvent.job_pk == job.pk,
        or_(JobEvent.message.startswith(NO_FIT_PREFIX), JobEvent.message.startswith(FIT_AGAIN_PREFIX)))
        .order_by(JobEvent.pk.desc()).limit(1))
    if last == message or (only_after_no_fit and (last is None or not last.startswith(NO_FIT_PREFIX))):
        return
    add_event(session, job=job, level=level, message=message, data=data)
    session.commit()
