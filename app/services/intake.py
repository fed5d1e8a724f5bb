"""The validating_files phase of a job: checks (and, for large files, work) that run in the worker
before a job is queued for training."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.models import File, FineTuningJob
from app.models.base import now_seconds
from app.services.jobs import add_event


def validate_job_files(session: Session, *, job_id: str, settings: Settings) -> bool:
    """validating_files -> queued once the job's files are usable; False if the job is elsewhere."""
    job = session.scalar(select(FineTuningJob).where(FineTuningJob.id == job_id).with_for_update())
    if job is None or job.status != "validating_files":
        return False
    for file_id in filter(None, (job.training_file, job.validation_file)):
        row = session.scalar(select(File).where(File.id == file_id, File.project_pk == job.project_pk))
        if row is None or row.status != "processed":
            job.status = "failed"
            job.finished_at = now_seconds()
            job.error = {"code": "invalid_file", "param": "training_file",
                         "message": f"File {file_id} is missing or failed validation."}
            add_event(session, job=job, level="error", message=job.error["message"])
            session.commit()
            return False
    job.status = "queued"
    add_event(session, job=job, message="Files validated; job queued.")
    session.commit()
    return True
