"""Thin Celery tasks: ids in, plain functions called, state kept in the database."""

from __future__ import annotations

from app.core.config import get_settings
from worker.celery_app import RUN_JOB_TASK, celery_app
from worker.supervisor import supervise_job


@celery_app.task(name=RUN_JOB_TASK)
def run_job(job_id: str) -> str:
    """Run one attempt of a job; a second delivery of the same message finds it claimed and returns."""
    return supervise_job(job_id, settings=get_settings())
