"""Runs one job attempt in a child process and keeps its lease alive. Plain Python: the Celery task
is a thin wrapper, and tests call these functions directly."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from app.core.config import Settings
from app.core.db import session_scope
from app.core.logging import set_job_context
from app.services import attempts
from app.services.dispatch import dispatch_job
from app.services.intake import validate_job_files

logger = logging.getLogger("tuneforge.supervisor")
PR_SET_PDEATHSIG = 1

# Set when this worker process is asked to shut down (SIGTERM): the running attempt checkpoints,
# gives its lease back and the job continues on another worker.
_shutting_down = threading.Event()


def request_shutdown() -> None:
    _shutting_down.set()


def worker_name(settings: Settings) -> str:
    return settings.worker_name or f"{socket.gethostname()}:{os.getpid()}"


def _die_with_parent() -> None:
    """In the child, before exec: get SIGKILL when the supervising process dies (Linux)."""
    # Not Linux: no such call, but fencing still stops an orphan at its next write.
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _stop(child: subprocess.Popen[bytes], *, grace: float) -> None:
    """SIGTERM, then SIGKILL after the grace period; returns once the process is gone."""
    if child.poll() is not None:
        return
    child.terminate()
    try:
        child.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def supervise_job(job_id: str, *, settings: Settings) -> str:
    """Validate, claim and run one attempt of job_id; returns what happened (for logs and tests)."""
    set_job_context(job_id, None)
    with session_scope() as session:
        validate_job_files(session, job_id=job_id, settings=settings)
    owner = worker_name(settings)
    with session_scope() as session:
        job = attempts.claim_job(session, job_id=job_id, owner=owner, settings=settings)
        if job is None:
            return "not-claimed"  # already running elsewhere, finished, cancelled, or a duplicate message
        job_pk, attempt = job.pk, job.attempt
    set_job_context(job_id, attempt)

    log_dir = (settings.data_dir / "logs").resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{job_id}-attempt-{attempt}.log"
    with open(log_path, "wb") as log:
        child = subprocess.Popen([sys.executable, "-m", "worker.attempt", job_id, str(attempt)],
                                 stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
    logger.info("job %s attempt %s: training process %s started", job_id, attempt, child.pid)
    next_beat = time.monotonic() + settings.heartbeat_seconds
    release_requested = False
    while child.poll() is None:
        time.sleep(0.5)
        if _shutting_down.is_set() and not release_requested:
            release_requested = True
            logger.info("job %s: worker shutting down; asking attempt %s to checkpoint and release", job_id,
                        attempt)
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
            _stop(child, grace=settings.cancel_grace_seconds)
            return "stopped"

    code = child.returncode
    if code == 0:
        return "finished"
    reason = f"training process exited with code {code}"
    if code < 0:
        reason = f"training process was killed by signal {-code}" + (
            " (out of memory?)" if -code == signal.SIGKILL else "")
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
            dispatch_job(session, job_id=job_id)
    return outcome
