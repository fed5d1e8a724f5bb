"""Runs one job attempt in a child process and keeps its lease alive. Plain Python: the Celery task
is a thin wrapper, and tests call these functions directly."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.db import session_scope
from app.core.logging import set_job_context
from app.core.processes import Stoppable, stop_process
from app.models import FineTuningJob, JobEvent, JobStatus, RegisteredModel
from app.services import attempts, base_models
from app.services.dispatch import dispatch_job, mark_undispatched, send
from app.services.intake import validate_job_files
from app.services.jobs import add_event
from app.services.workers import needs_of, worker_fits
from worker import model_cache, registration
from worker.exits import EXIT_DATABASE, EXIT_OK, EXIT_STALE
from worker.model_cache import ModelRef
from worker.workdirs import remove_attempt_dir
from worker.zygote import zygote

logger = logging.getLogger("tuneforge.supervisor")
PR_SET_PDEATHSIG = 1

# Set when this worker process is asked to shut down (SIGTERM): the running attempt checkpoints,
# gives its lease back and the job continues on another worker.
_shutting_down = threading.Event()


def request_shutdown() -> None:
    _shutting_down.set()


def shutting_down() -> threading.Event:
    return _shutting_down


def _die_with_parent() -> None:
    """In the child, before exec: get SIGKILL when the supervising process dies (Linux)."""
    # Not Linux: no such call, but fencing still stops an orphan at its next write.
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


CGROUP_MEMORY_EVENTS = Path("/sys/fs/cgroup/memory.events")


def oom_kills(events: Path = CGROUP_MEMORY_EVENTS) -> int | None:
    """How many processes the kernel's out-of-memory killer has killed in this host's (or container's) cgroup
    (cgroup v2 memory.events); None where that cannot be read."""
    try:
        text = events.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            return int(value)
    return None


def describe_exit(code: int, *, oom_killed: bool) -> str:
    """Why a training process that recorded no outcome ended, in words an operator can act on."""
    if code > 0:
        return (f"the training process exited with code {code} without recording an outcome (a crash outside "
                "Python's error handling, e.g. in native code; the worker's log has its last lines)")
    if -code == signal.SIGKILL:
        return ("the training process was killed by the kernel's out-of-memory killer; lower batch_size or "
                "max_seq_length, or use gradient_checkpointing or QLoRA" if oom_killed else
                "the training process was killed (SIGKILL) by someone other than tuneforge, e.g. an operator, "
                "the orchestrator or an out-of-memory killer outside this host")
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = "unknown signal"
    return f"the training process was killed by signal {-code} ({name})"


def supervise_job(job_id: str, *, settings: Settings) -> str:
    """Validate job_id's files, then claim and run one attempt of the best queued job this worker fits
    (usually job_id itself); returns what happened (for logs and tests)."""
    set_job_context(job_id, None)
    if _shutting_down.is_set():
        # A message taken while this worker drains (Celery still runs the one it had reserved): leave the job
        # to the others: the next reaper pass of any worker sends it again.
        with session_scope() as session:
            mark_undispatched(session, job_id=job_id)
        return "declined"
    with session_scope() as session:
        validate_job_files(session, job_id=job_id, settings=settings)
    me = registration.this_worker(settings)
    with session_scope() as session:
        missing = model_cache.missing_here(session, settings=settings)
        job = attempts.claim_next_job(session, worker=me, settings=settings, message_job_id=job_id,
                                      missing_models=missing)
        claimed = None if job is None else (job.id, job.pk, job.attempt, job.project_pk,
                                            int(job.config.get("processes", 1)))
    with session_scope() as session:
        _pass_on(session, message_job_id=job_id, claimed_job_id=claimed and claimed[0], settings=settings)
    if claimed is None:
        with session_scope() as session:
            model = _model_to_fetch(session, job_id=job_id, missing=missing, settings=settings)
        if model is not None:
            return _fetch_for_queue(job_id, model, settings=settings)
        return "not-claimed"  # nothing this worker may run now: running elsewhere, finished, or waiting
    job_id, job_pk, attempt, project_pk, processes = claimed
    registration.set_current_job(settings, job_id, draining=_shutting_down.is_set())
    try:
        return _run_attempt(job_id, job_pk=job_pk, attempt=attempt, processes=processes, settings=settings)
    finally:
        registration.set_current_job(settings, None, draining=_shutting_down.is_set())
        try:
            with session_scope() as session:
                _wake_next(session, project_pk=project_pk, settings=settings)
        except Exception:  # broker or database down: the reaper re-sends waiting jobs
            logger.exception("could not dispatch the next waiting job")


def _pass_on(session: Session, *, message_job_id: str, claimed_job_id: str | None, settings: Settings) -> None:
    """A message is a wake-up call: if it did not start its own job, send that job on again when another
    worker may run it (this one took another job, or it does not fit this one). A job left waiting only
    for its project's running-jobs limit is woken when one of the project's attempts ends (_wake_next)."""
    if claimed_job_id == message_job_id:
        return
    job = session.scalar(select(FineTuningJob).where(FineTuningJob.id == message_job_id))
    if job is None or job.status != JobStatus.QUEUED:
        return
    if claimed_job_id is not None or not worker_fits(needs_of(job.resources), registration.this_worker(settings)):
        dispatch_job(session, job_id=message_job_id, settings=settings)


def _model_to_fetch(session: Session, *, job_id: str, missing: set[str], settings: Settings) -> ModelRef | None:
    """The model this host should fetch so that the message's job can start here: the job is queued, fits this
    worker, and waits only for its model, which no other host is downloading now."""
    job = session.scalar(select(FineTuningJob).where(FineTuningJob.id == job_id))
    if job is None or job.status != JobStatus.QUEUED or job.base_model not in missing:
        return None
    if not worker_fits(needs_of(job.resources), registration.this_worker(settings)):
        return None
    row = session.scalar(select(RegisteredModel).where(RegisteredModel.name == job.base_model))
    if row is None:
        return None
    if base_models.downloading_elsewhere(row, worker=registration.this_worker(settings).name):
        # That host sends the job on when its copy is complete (or the reaper does, if that host dies).
        _note_waiting(session, model=row.name, message=f"Waiting in the queue while worker "
                      f"{(row.download or {}).get('worker')} downloads {row.source.removeprefix('hf:')}.")
        session.execute(update(FineTuningJob).where(FineTuningJob.id == job_id).values(dispatched_at=time.time()))
        session.commit()
        return None
    return ModelRef.of(row)


def _note_waiting(session: Session, *, model: str, message: str) -> None:
    """An event on each job queued on the model, once per message (the heartbeat repeats progress)."""
    for job in session.scalars(select(FineTuningJob).where(FineTuningJob.base_model == model,
                                                           FineTuningJob.status == JobStatus.QUEUED)):
        last = session.scalar(select(JobEvent.message).where(JobEvent.job_pk == job.pk)
                              .order_by(JobEvent.pk.desc()).limit(1))
        if last != message:
            add_event(session, job=job, message=message)
    session.commit()


def _fetch_for_queue(job_id: str, model: ModelRef, *, settings: Settings) -> str:
    """Fetch the model into this host's cache while the jobs on it wait queued (with progress events), then
    send the message's job to this worker's own queue, where it is claimed like any other."""
    me = registration.this_worker(settings)

    def progress(message: str) -> None:
        with session_scope() as session:
            _note_waiting(session, model=model.name, message=message)
            # The download is the waiting jobs' message on its way: the reaper leaves them alone meanwhile.
            session.execute(update(FineTuningJob).where(FineTuningJob.base_model == model.name,
                                                        FineTuningJob.status == JobStatus.QUEUED)
                            .values(dispatched_at=time.time()))
            session.commit()

    progress(f"Waiting in the queue while worker {me.name} downloads {model.repo}.")
    try:
        model_cache.local_model(model, settings=settings, progress=progress,
                                log=model_cache.RegistryLog(model, worker=me.name))
    except model_cache.ModelUnavailable as exc:
        logger.warning("job %s: model %s cannot be had here: %s", job_id, model.name, exc)
        if not exc.model_error:  # only this host lacks it (offline): the job fails here with why
            with session_scope() as session:
                job = session.scalar(select(FineTuningJob).where(FineTuningJob.id == job_id))
                if job is not None and attempts.fail_waiting_job(session, job=job, code="model_not_available",
                                                                 message=str(exc)):
                    session.commit()
        return "model-unavailable"  # a model error failed every job queued on it (base_models.record_failure)
    except Exception:  # the Hub out of reach, the database restarting: the reaper sends the job again
        logger.exception("job %s: downloading %s failed", job_id, model.name)
        with session_scope() as session:
            mark_undispatched(session, job_id=job_id)
        return "download-failed"
    with session_scope() as session:
        send(session, job_id=job_id, queue=me.queue)
    return "model-fetched"


def _wake_next(session: Session, *, project_pk: int, settings: Settings) -> None:
    """After an attempt ends, a worker and one of its project's slots are free: send a message for the
    best job this worker may run now (to its own queue) and for the best waiting job of that project."""
    sent = set()
    if not _shutting_down.is_set():
        mine = attempts.claimable_jobs(session, worker=registration.this_worker(settings), settings=settings)
        if mine:
            send(session, job_id=mine[0][1], queue=registration.this_worker(settings).queue)
            sent.add(mine[0][1])
    # The project's best job may fit no live worker; then the next one gets the slot.
    for _pk, job_id, _project in attempts.claimable_jobs(session, worker=None, settings=settings,
                                                          project_pk=project_pk)[:5]:
        if job_id in sent or dispatch_job(session, job_id=job_id, settings=settings):
            return


def _attempt_command(job_id: str, attempt: int, processes: int) -> list[str]:
    """The training process: `python -m worker.attempt`, or torchrun starting one per process the job asks for."""
    if processes <= 1:
        return [sys.executable, "-m", "worker.attempt", job_id, str(attempt)]
    # --standalone: a rendezvous of its own on a free local port, so several jobs can share a host.
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
            "-m", "worker.attempt", job_id, str(attempt)]


def _run_attempt(job_id: str, *, job_pk: int, attempt: int, processes: int, settings: Settings) -> str:
    """Run the claimed attempt in a child process, renewing its lease, until it ends."""
    set_job_context(job_id, attempt)

    log_path = settings.attempt_log_path(job_id, attempt)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    oom_before = oom_kills()
    log_path.write_bytes(b"")
    child: Stoppable | None = None
    if processes <= 1 and settings.worker_warm_start:  # forked from the pre-imported process
        child = zygote().fork(job_id, attempt, log_path)
    if child is None:
        with open(log_path, "wb") as log:
            child = subprocess.Popen(_attempt_command(job_id, attempt, processes), stdout=log,
                                     stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
    logger.info("job %s attempt %s: training process %s started", job_id, attempt, child.pid)
    next_beat = time.monotonic() + settings.heartbeat_seconds
    release_requested = False
    while child.poll() is None:
        time.sleep(0.5)
        if _shutting_down.is_set() and not release_requested:
            release_requested = True
            logger.info("job %s: worker shutting down; asking attempt %s to checkpoint and release", job_id,
                        attempt)
            # Draining before the job is handed back, so routing does not send it here again.
            registration.set_current_job(settings, job_id, draining=True)
            with session_scope() as session:
                attempts.request_release(session, job_pk=job_pk, attempt=attempt)
        if time.monotonic() < next_beat:
            continue
        next_beat = time.monotonic() + settings.heartbeat_seconds
        try:
            with session_scope() as session:
                alive = attempts.renew_lease(session, job_pk=job_pk, attempt=attempt, settings=settings)
        except Exception as exc:  # database restarting: keep training, the lease has slack
            logger.warning("job %s: heartbeat failed (%s); retrying", job_id, exc)
            continue
        if not alive:
            logger.info("job %s attempt %s no longer owns the job (cancelled or reaped); stopping", job_id,
                        attempt)
            stop_process(child, grace=settings.cancel_grace_seconds)
            return "stopped"

    code = child.poll()
    assert code is not None
    remove_attempt_dir(settings, job_id=job_id, attempt=attempt)  # what a killed attempt left behind
    if code == EXIT_OK:
        return "finished"
    if code == EXIT_STALE:  # an outcome, not a crash: its writes were refused, the job is no longer this attempt's
        logger.info("job %s attempt %s stopped: it no longer owns the job (cancelled, or handed to another attempt)",
                    job_id, attempt)
        return "stopped"
    if code == EXIT_DATABASE:
        try:
            with session_scope() as session:
                outcome = attempts.requeue_after_database_loss(session, job_pk=job_pk, attempt=attempt)
        except attempts.StaleAttempt:
            return "stopped"
        if outcome == JobStatus.QUEUED:
            with session_scope() as session:
                dispatch_job(session, job_id=job_id, settings=settings)
        return outcome
    oom_after = oom_kills()
    oom_killed = oom_before is not None and oom_after is not None and oom_after > oom_before
    reason = describe_exit(code, oom_killed=oom_killed)
    tail = _log_tail(log_path)
    logger.warning("job %s attempt %s: %s\n%s", job_id, attempt, reason, tail)
    try:
        with session_scope() as session:
            outcome = attempts.requeue_after_crash(session, job_pk=job_pk, attempt=attempt, reason=reason,
                                                   settings=settings)
    except attempts.StaleAttempt:
        return "stopped"
    if outcome == "queued":
        with session_scope() as session:
            dispatch_job(session, job_id=job_id, settings=settings)
    return outcome
