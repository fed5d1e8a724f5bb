from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import select

from app.api.deps import CurrentProject, SessionDep, SettingsDep
from app.core.errors import NotFound
from app.models import FineTuningJob
from app.schemas.models import ModelList, ModelPublic

router = APIRouter(prefix="/models", tags=["models"])


def _fine_tuned(session: SessionDep, project_pk: int) -> list[FineTuningJob]:
    return list(session.scalars(select(FineTuningJob).where(
        FineTuningJob.project_pk == project_pk, FineTuningJob.status == "succeeded",
        FineTuningJob.fine_tuned_model.is_not(None)).order_by(FineTuningJob.pk)))


@router.get("", response_model=ModelList)
def list_models(session: SessionDep, project: CurrentProject, settings: SettingsDep) -> ModelList:
    """Catalogue base models and this project's fine-tuned models."""
    data = [ModelPublic(id=name, created=0, owned_by=entry.owned_by, root=name)
            for name, entry in sorted(settings.catalogue().items())]
    data += [ModelPublic(id=job.fine_tuned_model or "", created=job.finished_at or job.created_at,
                         owned_by=project.name, root=job.base_model, fine_tuning_job=job.id)
             for job in _fine_tuned(session, project.pk)]
    return ModelList(data=data, has_more=False)


@router.get("/{model_id:path}", response_model=ModelPublic)
def read_model(session: SessionDep, project: CurrentProject, settings: SettingsDep, model_id: str) -> ModelPublic:
    """Retrieve a base or fine-tuned model."""
    catalogue = settings.catalogue()
    if model_id in catalogue:
        return ModelPublic(id=model_id, created=0, owned_by=catalogue[model_id].owned_by, root=model_id)
    job = session.scalar(select(FineTuningJob).where(FineTuningJob.project_pk == project.pk,
                                                     FineTuningJob.fine_tuned_model == model_id))
    if job is None or job.status != "succeeded":
        raise NotFound(f"The model '{model_id}' does not exist.", param="model")
    return ModelPublic(id=model_id, created=job.finished_at or job.created_at, owned_by=project.name,
                       root=job.base_model, fine_tuning_job=job.id)
