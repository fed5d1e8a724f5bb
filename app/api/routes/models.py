from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import select

from app.api.deps import CurrentProject, SessionDep, SettingsDep
from app.api.openapi import errors
from app.core.errors import PermissionDenied
from app.core.storage import get_storage
from app.models import FineTuningJob, JobArtifact, JobStatus, Project, RegisteredModel
from app.schemas.models import ModelDeleted, ModelDetails, ModelList, ModelPublic
from app.services import artifacts as artifact_service
from app.services import base_models

router = APIRouter(prefix="/models", tags=["models"])


def base_model_public(row: RegisteredModel) -> ModelPublic:
    return ModelPublic(id=row.name, created=row.created_at, owned_by=row.owned_by, root=row.name, source=row.source,
                       commit_sha=row.commit_sha, details=ModelDetails.model_validate(row.info))


@router.get("", response_model=ModelList)
def list_models(session: SessionDep, project: CurrentProject, settings: SettingsDep) -> ModelList:
    """Ready base models (with what was read from them) and this project's fine-tuned models."""
    ready = base_models.list_models(session, settings=settings, statuses=("ready",))
    data = [base_model_public(row) for row in ready]
    jobs = session.scalars(select(FineTuningJob).where(
        FineTuningJob.project_pk == project.pk, FineTuningJob.status == JobStatus.SUCCEEDED,
        FineTuningJob.fine_tuned_model.is_not(None),
        select(JobArtifact.pk).where(JobArtifact.job_pk == FineTuningJob.pk,
                                     JobArtifact.kind.in_(artifact_service.WEIGHT_KINDS)).exists(),
    ).order_by(FineTuningJob.pk))
    data += [fine_tuned_model_public(job.fine_tuned_model or "", job=job, project=project) for job in jobs]
    return ModelList(data=data, has_more=False)


@router.get("/{model_id:path}", response_model=ModelPublic)
def read_model(session: SessionDep, project: CurrentProject, settings: SettingsDep, model_id: str) -> ModelPublic:
    """Retrieve a base model, a fine-tuned model or one of its checkpoints (`...:ckpt-step-N`)."""
    base = base_models.find(session, settings=settings, name=model_id)
    if base is not None and base.status == "ready":
        return base_model_public(base)
    job, _step = artifact_service.find_fine_tuned_model(session, project=project, model_id=model_id)
    return fine_tuned_model_public(model_id, job=job, project=project)


def fine_tuned_model_public(model_id: str, *, job: FineTuningJob, project: Project) -> ModelPublic:
    return ModelPublic(id=model_id, created=job.finished_at or job.created_at, owned_by=project.name,
                       root=job.base_model, parent=job.base_model, fine_tuning_job=job.id)


@router.delete("/{model_id:path}", response_model=ModelDeleted,
               responses=errors(403, error_codes={400: ("invalid_value",), 409: ("model_in_use",)}))
def delete_model(session: SessionDep, project: CurrentProject, settings: SettingsDep, model_id: str) -> ModelDeleted:
    """Delete a fine-tuned model: its adapter, merged weights, result files and checkpoints (409 while a job that
    has not finished continues training from it; a checkpoint goes only with its model)."""
    if base_models.find(session, settings=settings, name=model_id) is not None:
        raise PermissionDenied(f"'{model_id}' is a base model: only fine-tuned models can be deleted here (base "
                               f"models are managed by the operator: DELETE /v1/admin/models/{model_id}).",
                               param="model")
    artifact_service.delete_fine_tuned_model(session, storage=get_storage(), project=project, model_id=model_id,
                                             settings=settings)
    return ModelDeleted(id=model_id)
