"""Hand jobs to the broker, after their rows are committed. A failed send loses nothing: the job
stays undispatched in the database and the reaper sends it again."""

from __future__ import annotations

import logging
import time

from sqlalchemy import update
from sqlalchemy.orm import Session

from app.models import FineTuningJob

logger = logging.getLogger("tuneforge.dispatch")


def dispatch_job(session: Session, *, job_id: str) -> bool:
    """Send the job's task; True when the broker took it."""
    from worker.celery_app import RUN_JOB_TASK, celery_app  # celery only, no torch

    try:
        celery_app.send_task(RUN_JOB_TASK, args=[job_id], retry=True,
                             retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5})
    except Exception as exc:  # broker down: the reaper re-dispatches undispatched jobs
        logger.warning("could not dispatch job %s (will retry from the reaper): %s", job_id, exc)
        return False
    session.execute(update(FineTuningJob).where(FineTuningJob.id == job_id).values(dispatched_at=time.time()))
    session.commit()
    return True
