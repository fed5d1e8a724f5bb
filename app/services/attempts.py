"""Running attempts: claim, heartbeat, fenced writes, finish, and the reaper.

The job row is the truth. An attempt is claimed in one short UPDATE that bumps `attempt` and writes a
lease; every later write of that attempt is an UPDATE guarded by `attempt = :mine AND status =
'running'`, so a stale attempt (reaped, cancelled, superseded) can change nothing and learns it must
stop. No transaction spans the training run.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from typing import Any, cast

from sqlalchemy import CursorResult, case, func, select, text, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.leases import StaleAttempt as StaleAttempt  # raised by the fenced writes below
from app.models import File, FineTuningJob, JobArtifact, JobCheckpoint, JobEvent, JobStatus, Project
from app.models.base import new_id, now_seconds
from app.models.job import WAITING_STATUSES
from app.services.jobs import add_event, move_job
from app.services.webhooks import enqueue_job_event
from app.services.workers import WorkerSpec, needs_of, worker_fits


def _execute(session: Session, statement: Any) -> CursorResult[Any]:
    """An UPDATE whose rowcount tells whether the fenced write applied."""
    return cast(CursorResult[Any], session.execute(statement))


def _fence(job_pk: int, attempt: int) -> Any:
    return ((FineTuningJob.pk == job_pk) & (FineTuningJob.attempt == attempt)
            & (FineTuningJob.status == JobStatus.RUNNING))


def _take(session: Session, *, job: FineTuningJob, owner: str, settings: Settings) -> FineTuningJob | None:
    """Take the lease of the queued job claim_next_job picked: one fenced UPDATE that bumps the attempt and
    writes the lease, then the event; None when another claim won. A claim never fails a job: every kind of
    hand-over (pause and resume, a worker's shutdown, a lost lease) is a claim, and only crashes count
    (requeue_after_crash)."""
    now = time.time()
    result = _execute(session,
        update(FineTuningJob)
        .where(FineTuningJob.pk == job.pk, FineTuningJob.status == JobStatus.QUEUED,
               FineTuningJob.attempt == job.attempt)
        .values(status=JobStatus.RUNNING, attempt=FineTuningJob.attempt + 1, lease_owner=owner,
                lease_expires_at=now + settings.lease_seconds, requested_action=None,
                started_at=job.started_at or int(now))
    )
    if result.rowcount != 1:
        session.rollback()
        return None  # another worker claimed it between our read and our update
    session.refresh(job)
    add_event(session, job=job, message=f"Attempt {job.attempt} started on {owner}.",
              data={"attempt": job.attempt, "worker": owner})
    session.commit()
    return job


def _running_per_project(session: Session, project_pk: int | None = None) -> dict[int, int]:
    query = select(FineTuningJob.project_pk, func.count()).where(FineTuningJob.status == JobStatus.RUNNING)
    if project_pk is not None:
        query = query.where(FineTuningJob.project_pk == project_pk)
    return {project: count for project, count in session.execute(query.group_by(FineTuningJob.project_pk))}


def claimable_jobs(session: Session, *, worker: WorkerSpec | None, settings: Settings,
                   prefer_job_id: str | None = None, project_pk: int | None = None,
                   missing_models: Collection[str] = ()) -> list[tuple[int, str, int]]:
    """Queued jobs in claim order, as (pk, id, project_pk): those that fit the worker (any worker when
    None), whose base model the worker's host holds (not in missing_models: a job waits queued while its model
    downloads) and whose project is under max_running_jobs_per_project; by priority, then the preferred job
    (a message's own), then age. Read without locks: claim_next_job re-checks under them."""
    query = select(FineTuningJob.pk, FineTuningJob.id, FineTuningJob.project_pk, FineTuningJob.priority,
                   FineTuningJob.resources).where(FineTuningJob.status == JobStatus.QUEUED)
    if missing_models:
        query = query.where(FineTuningJob.base_model.not_in(list(missing_models)))
    if project_pk is not None:
        query = query.where(FineTuningJob.project_pk == project_pk)
    limit = settings.max_running_jobs_per_project
    running = _running_per_project(session, project_pk) if limit else {}
    rows = [r for r in session.execute(query).all()
            if (worker is None or worker_fits(needs_of(r.resources), worker))
            and (not limit or running.get(r.project_pk, 0) < limit)]
    rows.sort(key=lambda r: (-r.priority, r.id != prefer_job_id, r.pk))
    return [(r.pk, r.id, r.project_pk) for r in rows]


def claim_next_job(session: Session, *, worker: WorkerSpec, settings: Settings,
                   message_job_id: str | None = None, missing_models: Collection[str] = ()) -> FineTuningJob | None:
    """Claim the best queued job this worker can run (see claimable_jobs); None when there is none.

    Postgres: the job row is locked (_lock_queued: passed over while another transaction holds it, then
    waited for briefly, so that a dispatch's write in flight cannot make a lower-priority job run first), and
    the project row is locked while its running jobs are counted, so two claims cannot both take a project's
    last slot. SQLite (embedded mode, one worker) ignores both; the fenced UPDATE in _take still lets only
    one claim win.
    """
    limit = settings.max_running_jobs_per_project
    full: set[int] = set()
    for pk, _id, project_pk in claimable_jobs(session, worker=worker, settings=settings,
                                              prefer_job_id=message_job_id, missing_models=missing_models):
        if project_pk in full:
            continue
        if limit:
            session.execute(select(Project.pk).where(Project.pk == project_pk).with_for_update())
            if _running_per_project(session, project_pk).get(project_pk, 0) >= limit:
                full.add(project_pk)
                session.rollback()
                continue
        job = _lock_queued(session, pk, wait=False) or _lock_queued(session, pk, wait=True)
        if job is None:  # claimed, cancelled or paused by someone else since we read the list
            session.rollback()
            continue
        taken = _take(session, job=job, owner=worker.name, settings=settings)
        if taken is not None:
            return taken
    session.rollback()
    return None


# How long a claim waits for a queued job's row that a short write holds (see _lock_queued).
CLAIM_LOCK_WAIT = "2s"


def _lock_queued(session: Session, pk: int, *, wait: bool) -> FineTuningJob | None:
    """The job's row, locked, while it is still queued; None when it is not, or (wait=False) when another
    transaction holds the row.

    A held row is passed over first (SKIP LOCKED). But the holder is often not a rival claim: a dispatch
    records where the job's message went, or writes its routing note, in the very moment the message
    reaches this worker. Passing over the best job then would run a lower-priority one ahead of it, so the
    claim waits for the row (at most CLAIM_LOCK_WAIT) and re-reads its status once the holder commits.
    A rival claim's hold lasts one UPDATE; after it, the job is no longer queued and the claim moves on.
    """
    query = (select(FineTuningJob).where(FineTuningJob.pk == pk, FineTuningJob.status == JobStatus.QUEUED)
             .execution_options(populate_existing=True))
    if not wait:
        return session.scalar(query.with_for_update(skip_locked=True))
    if session.get_bind().dialect.name != "postgresql":
        return None  # SQLite (embedded mode) has one worker and no row locks: the first read was final
    session.execute(text(f"SET LOCAL lock_timeout = '{CLAIM_LOCK_WAIT}'"))
    try:
        with session.begin_nested():
            job = session.scalar(query.with_for_update())
    except OperationalError:  # lock_timeout (or a deadlock): leave this job to its holder
        return None
    session.execute(text("SET LOCAL lock_timeout = DEFAULT"))
    return job


def renew_lease(session: Session, *, job_pk: int, attempt: int, settings: Settings) -> bool:
    """Heartbeat: extend the lease; False means this attempt must stop."""
    result = _execute(session, update(FineTuningJob).where(_fence(job_pk, attempt))
                             .values(lease_expires_at=time.time() + settings.lease_seconds))
    session.commit()
    return result.rowcount == 1


def requested_action(session: Session, *, job_pk: int, attempt: int) -> str:
    """"continue", "pause" or "cancel" (which also covers a lost lease) for a running attempt."""
    row = session.execute(select(FineTuningJob.status, FineTuningJob.attempt, FineTuningJob.requested_action)
                          .where(FineTuningJob.pk == job_pk)).one_or_none()
    if row is None or row.status != JobStatus.RUNNING or row.attempt != attempt:
        return "cancel"
    # "release" (worker shutting down) stops like a pause: checkpoint first, then give the job up.
    return "pause" if row.requested_action in ("pause", "release") else "continue"


def request_release(session: Session, *, job_pk: int, attempt: int) -> bool:
    """Ask a running attempt to checkpoint and requeue its job (its worker is shutting down, or its process was
    told to stop). A user's pause already asked for stays: the job then pauses rather than moves on."""
    result = _execute(session, update(FineTuningJob)
                      .where(_fence(job_pk, attempt), FineTuningJob.requested_action.is_distinct_from("pause"))
                      .values(requested_action="release"))
    session.commit()
    return result.rowcount == 1


def stop_after_checkpoint(session: Session, *, job_pk: int, attempt: int) -> str:
    """After a requested stop saved its checkpoint: "paused" (user pause) or "queued" (worker shutdown)."""
    action = session.scalar(select(FineTuningJob.requested_action).where(_fence(job_pk, attempt)))
    if action == "release":
        return release_job(session, job_pk=job_pk, attempt=attempt, status=JobStatus.QUEUED,
                           message=f"Attempt {attempt} was asked to stop (its worker is shutting down); checkpoint "
                                   "saved, the job is queued to continue on another worker.",
                           data={"attempt": attempt, "reason": "release"})
    release_job(session, job_pk=job_pk, attempt=attempt, status=JobStatus.PAUSED,
                message="Job paused after saving a checkpoint; resume it to continue.")
    return "paused"


def _fenced_update(session: Session, *, job_pk: int, attempt: int, **values: Any) -> FineTuningJob:
    result = _execute(session, update(FineTuningJob).where(_fence(job_pk, attempt)).values(**values))
    if result.rowcount != 1:
        session.rollback()
        raise StaleAttempt(f"attempt {attempt} of job {job_pk} no longer owns the job")
    job = session.get(FineTuningJob, job_pk)
    assert job is not None
    session.refresh(job)
    return job


def record_event(session: Session, *, job_pk: int, attempt: int, message: str, level: str = "info",
                 type_: str = "message", data: dict[str, Any] | None = None, **job_values: Any) -> None:
    """A fenced event (and optional job columns, e.g. progress) from the running attempt."""
    job = _fenced_update(session, job_pk=job_pk, attempt=attempt,
                         **(job_values or {"lease_owner": FineTuningJob.lease_owner}))
    add_event(session, job=job, message=message, level=level, type_=type_, data=data)
    session.commit()


def register_checkpoint(session: Session, *, job_pk: int, attempt: int, step: int, metrics: dict[str, Any],
                        blob_key: str, sha256: str, size: int) -> JobCheckpoint:
    """Record a stored, verified checkpoint; only registered checkpoints are resumed from. A new step is
    progress: the job's count of crashes in a row starts again."""
    existing = checkpoint_at(session, job_pk=job_pk, step=step)
    job = _fenced_update(session, job_pk=job_pk, attempt=attempt,
                         **({"crashes": 0} if existing is None else {"lease_owner": FineTuningJob.lease_owner}))
    if existing is not None:  # a resumed attempt saved the same step again: keep the newer bytes
        existing.blob_key, existing.sha256, existing.bytes = blob_key, sha256, size
        existing.metrics, existing.attempt = metrics, attempt
        checkpoint = existing
    else:
        checkpoint = JobCheckpoint(id=new_id("ftckpt_"), job_pk=job_pk, step_number=step, metrics=metrics,
                                   attempt=attempt, blob_key=blob_key, sha256=sha256, bytes=size)
        session.add(checkpoint)
    add_event(session, job=job, message=f"Checkpoint saved at step {step}.", data={"step": step, **metrics})
    session.commit()
    return checkpoint


def train_again_after(session: Session, *, job_pk: int, attempt: int, step: int) -> int:
    """An attempt that starts from the checkpoint at `step` (0: none) trains the later steps again: the metrics
    events earlier attempts wrote for them are marked superseded (listed no more, so the job has one per step and one
    loss curve; kept, so a client's cursor naming one still pages and streams), and progress goes back to `step`,
    with an event saying what is redone and how far each attempt had gone (data "reached": attempt -> last step).
    Fenced; returns how many were superseded."""
    job = _fenced_update(session, job_pk=job_pk, attempt=attempt, step=step)
    redone = session.execute(select(JobEvent.pk, JobEvent.data).where(
        JobEvent.job_pk == job_pk, JobEvent.type == "metrics", JobEvent.superseded.is_(False),
        JobEvent.data["step"].as_integer() > step)).all()
    if redone:
        _execute(session, update(JobEvent).where(JobEvent.pk.in_([pk for pk, _ in redone])).values(superseded=True)
                 .execution_options(synchronize_session=False))
        reached: dict[str, int] = {}
        for _, data in redone:
            key = str((data or {}).get("attempt"))
            reached[key] = max(reached.get(key, 0), int((data or {})["step"]))
        add_event(session, job=job, message=f"Steps after {step} are trained again from "
                  + (f"the checkpoint at step {step}" if step else "the start")
                  + f": the metrics of {len(redone)} step(s) an earlier attempt trained past it are superseded.",
                  data={"step": step, "superseded_metrics": len(redone), "reached": reached})
    session.commit()
    return len(redone)


def checkpoint_at(session: Session, *, job_pk: int, step: int) -> JobCheckpoint | None:
    return session.scalar(select(JobCheckpoint).where(JobCheckpoint.job_pk == job_pk,
                                                      JobCheckpoint.step_number == step))


def latest_checkpoint(session: Session, *, job_pk: int) -> JobCheckpoint | None:
    return session.scalar(select(JobCheckpoint).where(JobCheckpoint.job_pk == job_pk)
                          .order_by(JobCheckpoint.step_number.desc()).limit(1))


def finish_job(session: Session, *, job_pk: int, attempt: int, fine_tuned_model: str, trained_tokens: int,
               artifacts: list[tuple[str, str, File]], evaluation: dict[str, Any] | None = None,
               weights_step: int | None = None) -> None:
    """succeeded, with its result files (and the answer report's headline, also on the checkpoint of the weights
    it evaluated: the step `weights_step`), in one fenced transaction."""
    late_pause = session.scalar(select(FineTuningJob.requested_action).where(_fence(job_pk, attempt))) == "pause"
    job = _fenced_update(session, job_pk=job_pk, attempt=attempt, status=JobStatus.SUCCEEDED,
                         fine_tuned_model=fine_tuned_model, trained_tokens=trained_tokens, evaluation=evaluation,
                         finished_at=now_seconds(), lease_owner=None, lease_expires_at=None,
                         estimated_finish=None, requested_action=None)
    for name, kind, file in artifacts:
        session.add(file)
        session.flush()
        session.add(JobArtifact(job_pk=job_pk, file_pk=file.pk, name=name, kind=kind))
    if evaluation is not None and weights_step is not None:
        checkpoint = session.scalar(select(JobCheckpoint).where(JobCheckpoint.job_pk == job_pk,
                                                                JobCheckpoint.step_number == weights_step))
        if checkpoint is not None:  # the tuned model's scores, beside its losses (a new dict: JSON is replaced)
            checkpoint.metrics = {**checkpoint.metrics, **answer_metrics(evaluation)}
    if late_pause:  # asked for while the final weights were saved: nothing was left to pause
        add_event(session, job=job, message="The pause came after training had ended; the job finished instead.")
    add_event(session, job=job, message="The job has successfully completed.",
              data={"fine_tuned_model": fine_tuned_model, "trained_tokens": trained_tokens})
    enqueue_job_event(session, job=job)
    session.commit()


def answer_metrics(evaluation: dict[str, Any]) -> dict[str, float]:
    """The answer report's figures for the tuned weights, as flat checkpoint metrics."""
    tuned = evaluation["tuned"]
    return {"answer_exact_match": tuned["exact_match"], "answer_f1": tuned["f1"], "answer_rouge_l": tuned["rouge_l"],
            "answer_hit_max_tokens": tuned["hit_max_tokens"]}


def fail_job(session: Session, *, job_pk: int, attempt: int, code: str, message: str, **values: Any) -> None:
    """failed, from the running attempt (fenced); values: more job columns to write with it."""
    job = _fenced_update(session, job_pk=job_pk, attempt=attempt, status=JobStatus.FAILED, finished_at=now_seconds(),
                         error={"code": code, "message": message, "param": None}, requested_action=None,
                         lease_owner=None, lease_expires_at=None, estimated_finish=None, **values)
    add_event(session, job=job, level="error", message=message)
    enqueue_job_event(session, job=job)
    session.commit()


def fail_waiting_job(session: Session, *, job: FineTuningJob, code: str, message: str) -> bool:
    """failed, for a queued job that no attempt runs (its model cannot be had); the caller commits. False when
    the job left the queue meanwhile."""
    if not move_job(session, job, sources=(JobStatus.QUEUED,), status=JobStatus.FAILED, finished_at=now_seconds(),
                    estimated_finish=None, error={"code": code, "message": message, "param": "model"},
                    dispatched_at=None, dispatch_queue=None):
        return False  # one guarded UPDATE: a cancel or pause that landed meanwhile stands
    add_event(session, job=job, level="error", message=message)
    enqueue_job_event(session, job=job)
    return True


def release_job(session: Session, *, job_pk: int, attempt: int, status: str, message: str, level: str = "info",
                data: dict[str, Any] | None = None, **values: Any) -> str:
    """Give the job up without finishing it: "paused" (resume later) or "queued" (run elsewhere); returns which.
    Queued is decided in the UPDATE itself: a user's pause that lands between the caller's read and this write
    (pause_job's guarded write, while the job is still running) pauses it instead of being wiped."""
    target: Any = status if status != JobStatus.QUEUED else \
        case((FineTuningJob.requested_action == "pause", JobStatus.PAUSED.value), else_=status)
    job = _fenced_update(session, job_pk=job_pk, attempt=attempt, status=target, lease_owner=None,
                         lease_expires_at=None, requested_action=None, dispatched_at=None, **values)
    if job.status != status:
        message = f"{message} A pause was asked for meanwhile: the job is paused instead; resume it to continue."
    add_event(session, job=job, message=message, level=level, data=data)
    session.commit()
    return job.status


def requeue_after_crash(session: Session, *, job_pk: int, attempt: int, reason: str, settings: Settings) -> str:
    """An attempt died without recording an outcome: count the crash and queue the job again (it resumes from
    its last checkpoint), or fail it after max_attempts crashes in a row with no new checkpoint between them."""
    crashes = session.scalar(select(FineTuningJob.crashes).where(_fence(job_pk, attempt)))
    if crashes is None:
        raise StaleAttempt(f"attempt {attempt} of job {job_pk} no longer owns the job")
    crashes += 1
    if crashes >= settings.max_attempts:
        fail_job(session, job_pk=job_pk, attempt=attempt, code="too_many_attempts", crashes=crashes,
                 message=f"The job's training process died {crashes} times in a row without saving a new "
                         f"checkpoint; giving up. Last failure: {reason}")
        return "failed"
    status = _status_after_loss(session, job_pk=job_pk, attempt=attempt)
    return release_job(session, job_pk=job_pk, attempt=attempt, status=status, crashes=crashes, level="warn",
                       message=f"Attempt {attempt} ended without finishing: {reason}. The job is "
                               f"{_AFTER_LOSS[status]} (crash {crashes} of {settings.max_attempts} allowed in a row "
                               "without progress).",
                       data={"attempt": attempt, "crashes": crashes, "max_attempts": settings.max_attempts})


def requeue_after_database_loss(session: Session, *, job_pk: int, attempt: int) -> str:
    """An attempt lost its database connection: not the job's fault, no crash counted; "queued" or "paused"."""
    status = _status_after_loss(session, job_pk=job_pk, attempt=attempt)
    return release_job(session, job_pk=job_pk, attempt=attempt, status=status, level="warn",
                       message=f"Attempt {attempt} lost its database connection. The job is {_AFTER_LOSS[status]}.")


# What happens to a job whose attempt ended without finishing, in its event's words.
_AFTER_LOSS = {JobStatus.QUEUED: "queued again and resumes from its last checkpoint",
               JobStatus.PAUSED: "paused, as requested, at its last checkpoint; resume it to continue"}


def _status_after_loss(session: Session, *, job_pk: int, attempt: int) -> JobStatus:
    """Back to the queue, unless a pause was asked for and the attempt died before it could checkpoint: then the
    pause holds (at the last checkpoint), instead of the next claim forgetting it."""
    action = session.scalar(select(FineTuningJob.requested_action).where(_fence(job_pk, attempt)))
    return JobStatus.PAUSED if action == "pause" else JobStatus.QUEUED


def reap_expired_leases(session: Session, *, settings: Settings) -> list[str]:
    """Hand back running jobs whose lease expired (queued, or paused where a pause was asked for); return the ids
    that need dispatching. Each hand-back is one UPDATE guarded by the expired lease, which also decides queued or
    paused: a pause or a lease renewal landing after the read is neither wiped nor overridden (on SQLite a read
    takes no lock)."""
    now = time.time()
    expired = list(session.execute(select(FineTuningJob.pk, FineTuningJob.attempt, FineTuningJob.lease_owner).where(
        FineTuningJob.status == JobStatus.RUNNING, FineTuningJob.lease_expires_at < now
    ).with_for_update(skip_locked=True)))
    for job_pk, attempt, owner in expired:
        result = _execute(session, update(FineTuningJob).where(_fence(job_pk, attempt),
                                                               FineTuningJob.lease_expires_at < now).values(
            status=case((FineTuningJob.requested_action == "pause", JobStatus.PAUSED.value),
                        else_=JobStatus.QUEUED.value),
            lease_owner=None, lease_expires_at=None, dispatched_at=None, requested_action=None))
        if result.rowcount != 1:
            continue  # renewed, finished or handed back meanwhile
        job = session.get(FineTuningJob, job_pk)
        assert job is not None
        session.refresh(job)
        add_event(session, job=job, level="warn",
                  message=f"Attempt {attempt} on {owner} stopped renewing its lease; the job is "
                          f"{_AFTER_LOSS[JobStatus(job.status)]}.")
    session.commit()
    # Jobs accepted while the broker was down (or whose message was lost) are sent again.
    stale = now - max(settings.lease_seconds, 60.0)
    waiting = session.scalars(select(FineTuningJob.id).where(
        FineTuningJob.status.in_(WAITING_STATUSES),
        (FineTuningJob.dispatched_at.is_(None)) | (FineTuningJob.dispatched_at < stale)))
    return list(waiting)
