from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import select

from app.api.deps import CurrentProject, SessionDep, SettingsDep
from app.api.openapi import errors
from app.core.errors import PermissionDenied
from app.core.storage import get_storage
from app.models import FineTuningJob, JobArtifact, JobStatus
from app.schemas.models import ModelDeleted, ModelList, ModelPublic
from app.services import artifacts as artifact_service

router = APIRouter(prefix="/models", tags=["models"])


@router.get("", response_model=ModelList)
def list_models(session: SessionDep, project: CurrentProject, settings: SettingsDep) -> ModelList:
    """Catalogue base models and this project's fine-tuned models."""
    data = [ModelPublic(id=name, created=0, owned_by=entry.owned_by, root=name)
            for name, entry in sorted(settings.catalogue().items())]
    jobs = session.scalars(select(FineTuningJob).where(
        FineTuningJob.project_pk == project.pk, FineTuningJob.status == JobStatus.SUCCEEDED,
        FineTuningJob.fine_tuned_model.is_not(None),
        select(JobArtifact.pk).where(JobArtifact.job_pk == FineTuningJob.pk,
                                     JobArtifact.kind.in_(artifact_service.WEIGHT_KINDS)).exists(),
    ).order_by(FineTuningJob.pk))
    data += [ModelPublic(id=job.fine_tuned_model or "", created=job.finished_at or job.created_at,
                         owned_by=project.name, root=job.base_model, fine_tuning_job=job.id) for job in jobs]
    return ModelList(data=data, has_more=False)


@router.get("/{model_id:path}", response_model=ModelPublic)
def read_model(session: SessionDep, project: CurrentProject, settings: SettingsDep, model_id: str) -> ModelPublic:
    """Retrieve a base model, a fine-tuned model or one of its checkpoints (`...:ckpt-step-N`)."""
    catalogue = settings.catalogue()
    if model_id in catalogue:
        return ModelPublic(id=model_id, created=0, owned_by=catalogue[model_id].owned_by, root=model_id)
    job, _step = artifact_service.find_fine_tuned_model(session, project=project, model_id=model_id)
    return ModelPublic(id=model_id, created=job.finished_at or job.created_at, owned_by=project.name,
                       root=job.base_model, fine_tuning_job=job.id)


@router.delete("/{model_id:path}", response_model=ModelDeleted, responses=errors(403))
def delete_model(session: SessionDep, project: CurrentProject, settings: SettingsDep, model_id: str) -> ModelDeleted:
    """Delete a fine-tuned model: its adapter, merged weights, result files and checkpoints."""
    if model_id in settings.catalogue():
        raise PermissionDenied(f"'{model_id}' is a base model from the catalogue: only fine-tuned models can be "
                               "deleted through the API (base models are managed by the operator).", param="model")
    artifact_service.delete_fine_tuned_model(session, storage=get_storage(), project=project, model_id=model_id)
    return ModelDeleted(id=model_id)
