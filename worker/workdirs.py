"""A worker host's scratch space: each attempt's work directory lives as long as the attempt, each attempt's log
as long as Settings.attempt_log_retention_days. Everything a job keeps (checkpoints, artifacts) is in storage."""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.models import FineTuningJob, JobStatus

logger = logging.getLogger("tuneforge.workdirs")

# A work directory younger than this is never swept: its attempt may have been claimed after the sweep read
# which attempts run.
SWEEP_MIN_AGE_SECONDS = 120.0


def remove_attempt_dir(settings: Settings, *, job_id: str, attempt: int) -> None:
    """Delete an ended attempt's work directory, and the job's once it is empty."""
    directory = settings.attempt_work_dir(job_id, attempt)
    shutil.rmtree(directory, ignore_errors=True)
    with contextlib.suppress(OSError):  # another attempt of the job still has its directory here
        directory.parent.rmdir()


def sweep(session: Session, *, settings: Settings, now: float | None = None) -> list[Path]:
    """Remove what ended attempts left on this host (a worker killed with its attempt leaves its directory) and
    attempt logs past their retention; returns what was removed."""
    now = time.time() if now is None else now
    removed: list[Path] = []
    if settings.work_root.is_dir():
        running = {(job_id, attempt) for job_id, attempt in session.execute(
            select(FineTuningJob.id, FineTuningJob.attempt).where(FineTuningJob.status == JobStatus.RUNNING))}
        for job_dir in settings.work_root.iterdir():
            for attempt_dir in job_dir.glob("attempt-*"):
                number = attempt_dir.name.removeprefix("attempt-")
                live = number.isdigit() and (job_dir.name, int(number)) in running
                if not live and now - attempt_dir.stat().st_mtime > SWEEP_MIN_AGE_SECONDS:
                    shutil.rmtree(attempt_dir, ignore_errors=True)
                    removed.append(attempt_dir)
            with contextlib.suppress(OSError):
                job_dir.rmdir()
    if settings.log_root.is_dir():
        horizon = now - settings.attempt_log_retention_days * 86400
        for log in settings.log_root.glob("*.log"):
            if log.stat().st_mtime < horizon:
                log.unlink(missing_ok=True)
                removed.append(log)
    if removed:
        logger.info("removed %d leftover work directories and old attempt logs", len(removed))
    return removed
