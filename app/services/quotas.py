"""Per-project quotas checked before work is accepted."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.db import hold_rows
from app.core.errors import RateLimited
from app.models import FineTuningJob, Project
from app.models.job import ACTIVE_STATUSES

# Jobs that hold (or wait for) a worker; paused jobs hold only a checkpoint and do not count.
QUOTA_JOB_STATUSES = ACTIVE_STATUSES
# A training job runs for minutes to hours: a hint for clients that poll, not a promise.
QUOTA_RETRY_AFTER_SECONDS = 60


def check_job_quota(session: Session, *, project: Project, settings: Settings, idempotency_key: str | None = None,
                    lock: bool = True) -> None:
    """Raise 429 quota_exceeded when the project already has its maximum of active jobs.

    With `lock`, the binding check, made just before the write that adds an active job and committed with it: the
    project's row is held first (app/core/db.py; SELECT ... FOR UPDATE locks nothing on SQLite), so of
    concurrent creates or resumes each counts the others' jobs, and a create with the Idempotency-Key of one that
    committed meanwhile finds that job. Without, a refusal before a request does its work (a job's planning reads
    files and may commit): fast, and not binding."""
    if lock:
        hold_rows(session, Project.name, Project.pk == project.pk)
    if idempotency_key is not None and session.scalar(select(FineTuningJob.pk).where(
            FineTuningJob.project_pk == project.pk, FineTuningJob.idempotency_key == idempotency_key)):
        return  # a replay returns the existing job and creates nothing
    active = session.scalar(select(func.count()).select_from(FineTuningJob).where(
        FineTuningJob.project_pk == project.pk, FineTuningJob.status.in_(QUOTA_JOB_STATUSES))) or 0
    if active >= settings.max_active_jobs_per_project:
        raise RateLimited(
            f"Quota exceeded: this project already has {active} active fine-tuning jobs (the maximum is "
            f"{settings.max_active_jobs_per_project}). Wait for one to finish, or cancel one, then retry.",
            code="quota_exceeded", retry_after=QUOTA_RETRY_AFTER_SECONDS, retry=False)
