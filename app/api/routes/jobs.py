from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Request
from fastapi.responses import Response

from app.api.deps import CurrentProject, SessionDep, SettingsDep, check_limit
from app.api.openapi import binary_responses, errors
from app.api.streaming import stream_blob
from app.core.storage import get_storage
from app.schemas.jobs import (
    ArtifactList,
    ArtifactPublic,
    CheckpointList,
    JobArtifactsDeleted,
    JobCreate,
    JobEstimate,
    JobEventList,
    JobList,
    JobPublic,
)
from app.services import artifacts as artifact_service
from app.services import estimates
from app.services import jobs as job_service
from app.services.dispatch import dispatch_job
from app.services.quotas import check_job_quota

router = APIRouter(prefix="/fine_tuning/jobs", tags=["fine-tuning"])
BLOB = binary_responses("application/octet-stream", ranges=True)


def _metadata_filter(request: Request) -> dict[str, str]:
    return {key[len("metadata["):-1]: value for key, value in request.query_params.items()
            if key.startswith("metadata[") and key.endswith("]")}


@router.post("", response_model=JobPublic,
             responses=errors(409, error_codes={400: (*job_service.REQUEST_ERROR_CODES, "insufficient_memory"),
                                                429: ("quota_exceeded",)}))
def create_job(session: SessionDep, project: CurrentProject, settings: SettingsDep, body: JobCreate,
               idempotency_key: Annotated[str | None, Header(max_length=255)] = None) -> JobPublic:
    """Create a fine-tuning job; the same Idempotency-Key and body return the same job."""
    check_job_quota(session, project=project, settings=settings, idempotency_key=idempotency_key, lock=False)
    job, created = job_service.create_job(session, project=project, request=body, settings=settings,
                                          idempotency_key=idempotency_key)
    if created:
        dispatch_job(session, job_id=job.id)
    return job_service.job_public(session, job, project=project)


@router.post("/estimate", response_model=JobEstimate,
             responses=errors(error_codes={400: job_service.REQUEST_ERROR_CODES}))
def estimate_job(session: SessionDep, project: CurrentProject, settings: SettingsDep, body: JobCreate) -> JobEstimate:
    """Without training: a job's tokens, steps, predicted peak accelerator memory and the live workers it fits."""
    return JobEstimate.model_validate(estimates.estimate_job(session, project=project, request=body,
                                                             settings=settings))


@router.get("", response_model=JobList)
def list_jobs(request: Request, session: SessionDep, project: CurrentProject, settings: SettingsDep,
              after: str | None = None, limit: int = 20) -> JobList:
    """List the project's jobs, newest first (filter with metadata[key]=value)."""
    check_limit(limit, settings.list_limit_max)
    rows, has_more = job_service.list_jobs(session, project=project, after=after, limit=limit,
                                           metadata=_metadata_filter(request))
    return JobList(data=job_service.jobs_public(session, rows, projects={project.pk: project}), has_more=has_more)


@router.get("/{fine_tuning_job_id}", response_model=JobPublic)
def read_job(session: SessionDep, project: CurrentProject, fine_tuning_job_id: str) -> JobPublic:
    """Retrieve a job with its status, progress and results."""
    job = job_service.get_job(session, project=project, job_id=fine_tuning_job_id)
    return job_service.job_public(session, job, project=project)


@router.post("/{fine_tuning_job_id}/cancel", response_model=JobPublic)
def cancel_job(session: SessionDep, project: CurrentProject, fine_tuning_job_id: str) -> JobPublic:
    """Cancel a job; a running one stops within seconds."""
    job = job_service.cancel_job(session, project=project, job_id=fine_tuning_job_id)
    return job_service.job_public(session, job, project=project)


@router.post("/{fine_tuning_job_id}/pause", response_model=JobPublic)
def pause_job(session: SessionDep, project: CurrentProject, fine_tuning_job_id: str) -> JobPublic:
    """Pause a job: it checkpoints and stops until resumed."""
    job = job_service.pause_job(session, project=project, job_id=fine_tuning_job_id)
    return job_service.job_public(session, job, project=project)


@router.post("/{fine_tuning_job_id}/resume", response_model=JobPublic,
             responses=errors(error_codes={400: ("job_not_paused",), 429: ("quota_exceeded",)}))
def resume_job(session: SessionDep, project: CurrentProject, settings: SettingsDep,
               fine_tuning_job_id: str) -> JobPublic:
    """Resume a paused job from its last checkpoint (429 when the project already has its maximum of active jobs:
    a paused job does not count, a resumed one does)."""
    job = job_service.resume_job(session, project=project, job_id=fine_tuning_job_id, settings=settings)
    dispatch_job(session, job_id=job.id)
    return job_service.job_public(session, job, project=project)


@router.get("/{fine_tuning_job_id}/events", response_model=JobEventList)
def list_job_events(session: SessionDep, project: CurrentProject, settings: SettingsDep,
                    fine_tuning_job_id: str, after: str | None = None, limit: int = 20) -> JobEventList:
    """The job's events, newest first."""
    check_limit(limit, settings.list_limit_max)
    job = job_service.get_job(session, project=project, job_id=fine_tuning_job_id)
    rows, has_more = job_service.list_events(session, job=job, after=after, limit=limit)
    return JobEventList(data=[job_service.event_public(e) for e in rows], has_more=has_more)


@router.get("/{fine_tuning_job_id}/checkpoints", response_model=CheckpointList)
def list_job_checkpoints(session: SessionDep, project: CurrentProject, settings: SettingsDep,
                         fine_tuning_job_id: str, after: str | None = None, limit: int = 10) -> CheckpointList:
    """The job's registered checkpoints, newest first."""
    check_limit(limit, settings.list_limit_max)
    job = job_service.get_job(session, project=project, job_id=fine_tuning_job_id)
    rows, has_more = job_service.list_checkpoints(session, job=job, after=after, limit=limit)
    data = [job_service.checkpoint_public(c, job=job, project=project) for c in rows]
    return CheckpointList(data=data, has_more=has_more, first_id=data[0].id if data else None,
                          last_id=data[-1].id if data else None)


@router.get("/{fine_tuning_job_id}/artifacts", response_model=ArtifactList)
def list_job_artifacts(session: SessionDep, project: CurrentProject, fine_tuning_job_id: str) -> ArtifactList:
    """The job's downloadable outputs: adapter, metrics, training config, merged weights, checkpoints."""
    job = job_service.get_job(session, project=project, job_id=fine_tuning_job_id)
    data = [ArtifactPublic(name=a.name, kind=a.kind, bytes=a.bytes, sha256=a.sha256, created_at=a.created_at,
                           file_id=a.file_id) for a in artifact_service.list_artifacts(session, job=job)]
    return ArtifactList(data=data, has_more=False)


@router.delete("/{fine_tuning_job_id}/artifacts", response_model=JobArtifactsDeleted,
               responses=errors(404, error_codes={409: ("job_not_finished", "model_in_use")}))
def delete_job_artifacts(session: SessionDep, project: CurrentProject, settings: SettingsDep,
                         fine_tuning_job_id: str) -> JobArtifactsDeleted:
    """Extension: delete a finished job's stored outputs (weights, result files, checkpoints); for a cancelled or
    failed job the only way to free its checkpoints (409 while it runs, or while a job trains on from its model)."""
    job = job_service.get_job(session, project=project, job_id=fine_tuning_job_id)
    artifact_service.delete_job_outputs(session, storage=get_storage(), project=project, job=job, settings=settings)
    return JobArtifactsDeleted(id=job.id)


@router.get("/{fine_tuning_job_id}/artifacts/{name}", responses=BLOB)
def download_job_artifact(request: Request, session: SessionDep, project: CurrentProject,
                          fine_tuning_job_id: str, name: str) -> Response:
    """Stream one artifact (Content-Length, x-content-sha256, Range requests)."""
    job = job_service.get_job(session, project=project, job_id=fine_tuning_job_id)
    artifact = artifact_service.get_artifact(session, job=job, name=name)
    return stream_blob(request, key=artifact.blob_key, size=artifact.bytes, sha256=artifact.sha256,
                       filename=artifact.filename)
