"""Small factories for rows the tests need."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from app.models import FineTuningJob, Project
from app.models.base import new_id
from app.schemas.training import TrainingConfig
from app.services.projects import get_or_create_project


def create_project(session: Session, name: str = "team-a") -> Project:
    return get_or_create_project(session, name=name)


def create_job(session: Session, **overrides: Any) -> FineTuningJob:
    project = overrides.pop("project", None) or create_project(session)
    values: dict[str, Any] = {
        "id": new_id("ftjob-"), "project_pk": project.pk, "model": "tiny-llama", "base_model": "tiny-llama",
        "training_file": "file-x", "status": "queued", "config": TrainingConfig().model_dump(mode="json"),
        "seed": 42,
    }
    values.update(overrides)
    job = FineTuningJob(**values)
    session.add(job)
    session.commit()
    return job
