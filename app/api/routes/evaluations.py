"""Answer reports asked for after training: a fine-tuned model (or checkpoint) against its base, on any file."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from app.api.deps import CurrentProject, SessionDep, SettingsDep, check_limit
from app.api.openapi import errors
from app.models import FineTuningJob
from app.schemas.evaluations import EvaluationCreate, EvaluationList, EvaluationPublic
from app.services import evaluations
from app.services import jobs as job_service

router = APIRouter(prefix="/fine_tuning/jobs", tags=["fine-tuning"])


def project_job(session: SessionDep, project: CurrentProject, fine_tuning_job_id: str) -> FineTuningJob:
    """The caller's job, looked up before the body is read: another project's job is a 404 whatever the body."""
    return job_service.get_job(session, project=project, job_id=fine_tuning_job_id)


ProjectJob = Annotated[FineTuningJob, Depends(project_job)]


@router.post("/{fine_tuning_job_id}/evaluations", response_model=EvaluationPublic,
             responses=errors(error_codes={400: evaluations.REQUEST_ERROR_CODES, 429: ("inference_busy",),
                                           503: ("inference_unavailable",)}))
def create_evaluation(session: SessionDep, project: CurrentProject, settings: SettingsDep, job: ProjectJob,
                      body: EvaluationCreate) -> EvaluationPublic:
    """Have the fine-tuned model (or a checkpoint) and its base answer a file's examples; poll it until succeeded."""
    row = evaluations.create_evaluation(session, project=project, job=job, request=body, settings=settings)
    return evaluations.evaluation_public(row, job=job)


@router.get("/{fine_tuning_job_id}/evaluations", response_model=EvaluationList)
def list_evaluations(session: SessionDep, settings: SettingsDep, job: ProjectJob, after: str | None = None,
                     limit: int = 20) -> EvaluationList:
    """The job's answer reports asked for after training, newest first."""
    check_limit(limit, settings.list_limit_max)
    rows, more = evaluations.list_evaluations(session, job=job, after=after, limit=limit, settings=settings)
    return EvaluationList(data=[evaluations.evaluation_public(r, job=job) for r in rows], has_more=more)


@router.get("/{fine_tuning_job_id}/evaluations/{evaluation_id}", response_model=EvaluationPublic,
            responses=errors(404))
def read_evaluation(session: SessionDep, settings: SettingsDep, job: ProjectJob, evaluation_id: str
                    ) -> EvaluationPublic:
    """One answer report: its status, headline and result files."""
    row = evaluations.get_evaluation(session, job=job, evaluation_id=evaluation_id, settings=settings)
    return evaluations.evaluation_public(row, job=job)
