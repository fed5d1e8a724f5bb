"""Admin API: keys and projects across tenants, jobs across projects, and the workers. Admin keys only."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy.orm import Session
from starlette.convertors import Convertor, register_url_convertor

from app.api.deps import AdminKey, SessionDep, SettingsDep, check_limit
from app.api.openapi import errors
from app.core.config import Settings
from app.core.errors import InvalidRequest, NotFound
from app.models import ApiKey, Project, RegisteredModel, Worker
from app.schemas.admin import ApiKeyCreate, ApiKeyCreated, ApiKeyList, ApiKeyPublic, ProjectList, ProjectPublic
from app.schemas.jobs import JobList
from app.schemas.models import (
    ModelDetails,
    ModelDownload,
    ModelPull,
    ModelPullSent,
    ModelRegister,
    RegisteredModelList,
    RegisteredModelPublic,
)
from app.schemas.workers import WorkerJob, WorkerList, WorkerPublic
from app.services import base_models
from app.services import jobs as job_service
from app.services import projects as project_service
from app.services import workers as worker_service

router = APIRouter(prefix="/admin", tags=["admin"])


class ModelNameConvertor(Convertor[str]):
    """A registered model's name in a path: may hold "/" (hub ids do) but never ends with "/pull", so that
    `/models/{name}/pull` is the pull action and nothing else."""

    regex = r".+(?<!/pull)"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("model_name", ModelNameConvertor())


def key_public(row: ApiKey, project: Project) -> ApiKeyPublic:
    return ApiKeyPublic(id=row.id, name=row.name, project_id=project.id, project=project.name,
                        key_prefix=row.key_prefix, is_admin=row.is_admin, created_at=row.created_at,
                        revoked_at=row.revoked_at)


def _projects(session: Session, pks: set[int]) -> dict[int, Project]:
    return project_service.projects_by_pk(session, pks)


@router.post("/keys", response_model=ApiKeyCreated)
def create_api_key(session: SessionDep, _admin: AdminKey, body: ApiKeyCreate) -> ApiKeyCreated:
    """Create an API key for a project (created if new); the key is in this response only."""
    row, key = project_service.create_api_key(session, project_name=body.project, name=body.name,
                                              is_admin=body.is_admin)
    session.commit()
    project = session.get(Project, row.project_pk)
    assert project is not None
    return ApiKeyCreated(**key_public(row, project).model_dump(), key=key)


@router.get("/keys", response_model=ApiKeyList)
def list_api_keys(session: SessionDep, _admin: AdminKey, settings: SettingsDep, after: str | None = None,
                  limit: int = 20) -> ApiKeyList:
    """List API keys of every project, newest first (prefixes only, never the keys)."""
    check_limit(limit, settings.list_limit_max)
    rows, has_more = project_service.page_api_keys(session, after=after, limit=limit)
    projects = _projects(session, {r.project_pk for r in rows})
    return ApiKeyList(data=[key_public(r, projects[r.project_pk]) for r in rows], has_more=has_more)


@router.delete("/keys/{key_id}", response_model=ApiKeyPublic)
def revoke_api_key(session: SessionDep, _admin: AdminKey, key_id: str) -> ApiKeyPublic:
    """Revoke an API key; it stops working at once (revoking twice is harmless)."""
    row = project_service.get_api_key(session, key_id=key_id)
    if row is None:
        raise NotFound(f"No such API key: {key_id}", param="key_id")
    project_service.revoke_api_key(session, key_id=key_id)
    session.commit()
    project = session.get(Project, row.project_pk)
    assert project is not None
    return key_public(row, project)


@router.get("/projects", response_model=ProjectList)
def list_projects(session: SessionDep, _admin: AdminKey, settings: SettingsDep, after: str | None = None,
                  limit: int = 20) -> ProjectList:
    """List projects, newest first."""
    check_limit(limit, settings.list_limit_max)
    rows, has_more = project_service.page_projects(session, after=after, limit=limit)
    return ProjectList(data=[ProjectPublic(id=p.id, name=p.name, created_at=p.created_at) for p in rows],
                       has_more=has_more)


@router.get("/jobs", response_model=JobList)
def list_all_jobs(session: SessionDep, _admin: AdminKey, settings: SettingsDep, after: str | None = None,
                  limit: int = 20, project: Annotated[str | None, Query(max_length=64)] = None) -> JobList:
    """List jobs across projects, newest first (filter with project=<project id>)."""
    check_limit(limit, settings.list_limit_max)
    project_pk = None
    if project is not None:
        found = project_service.get_project(session, project_id=project)
        if found is None:
            raise InvalidRequest(f"Invalid 'project': no project with id {project!r}.", param="project",
                                 code="invalid_value")
        project_pk = found.pk
    rows, has_more = job_service.list_all_jobs(session, project_pk=project_pk, after=after, limit=limit)
    projects = _projects(session, {j.project_pk for j in rows})
    return JobList(data=job_service.jobs_public(session, rows, projects=projects), has_more=has_more)


def _workers_public(session: Session, rows: list[Worker], settings: Settings) -> list[WorkerPublic]:
    now = time.time()
    jobs = worker_service.current_jobs(session, rows)
    projects = _projects(session, {j.project_pk for j in jobs.values()})
    data = []
    for w in rows:
        job = jobs.get(w.current_job_id or "")
        current = None if job is None else WorkerJob(
            id=job.id, project_id=projects[job.project_pk].id, project=projects[job.project_pk].name,
            status=job.status, attempt=job.attempt, crashes=job.crashes, step=job.step, total_steps=job.total_steps)
        data.append(WorkerPublic(
            name=w.name, hostname=w.hostname, pid=w.pid, status=w.status,
            live=worker_service.is_live(w, settings=settings, now=now), labels=list(w.labels), gpus=w.gpus,
            gpu_memory_gb=w.gpu_memory_gb, gpu_names=list(w.gpu_names), cpu_count=w.cpu_count,
            memory_gb=w.memory_gb, queue=w.queue, version=w.version, started_at=w.started_at,
            heartbeat_at=w.heartbeat_at, seconds_since_heartbeat=round(max(0.0, now - w.heartbeat_at), 1),
            current_job=current))
    return data


@router.get("/workers", response_model=WorkerList)
def list_workers(session: SessionDep, _admin: AdminKey, settings: SettingsDep) -> WorkerList:
    """List registered workers by name: resources, labels, heartbeat, liveness and current job."""
    rows = worker_service.list_workers(session)
    return WorkerList(data=_workers_public(session, rows, settings), has_more=False)


@router.get("/workers/{name}", response_model=WorkerPublic)
def read_worker(session: SessionDep, _admin: AdminKey, settings: SettingsDep, name: str) -> WorkerPublic:
    """Retrieve one worker by name."""
    row = worker_service.get_worker(session, name=name)
    if row is None:
        raise NotFound(f"No such worker: {name}", param="name")
    return _workers_public(session, [row], settings)[0]


def registered_model_public(row: RegisteredModel) -> RegisteredModelPublic:
    return RegisteredModelPublic(
        id=row.name, source=row.source, revision=row.revision, commit_sha=row.commit_sha,
        trust_remote_code=row.trust_remote_code, allow_pickle=row.allow_pickle,
        status=row.status,  # type: ignore[arg-type]
        error=row.error, download=ModelDownload.model_validate(row.download) if row.download else None,
        hosts=row.hosts, details=ModelDetails.model_validate(row.info), files=len(row.files),
        created_at=row.created_at)


@router.post("/models", response_model=RegisteredModelPublic, responses=errors(409, 502))
def register_model(session: SessionDep, _admin: AdminKey, settings: SettingsDep,
                   body: ModelRegister) -> RegisteredModelPublic:
    """Register a base model by hub id (pinned to the commit its revision resolves to) or local folder."""
    row = base_models.register(session, settings=settings, name=body.name, source=body.source,
                               revision=body.revision, trust_remote_code=body.trust_remote_code,
                               allow_pickle=body.allow_pickle)
    session.commit()
    return registered_model_public(row)


@router.get("/models", response_model=RegisteredModelList)
def list_registered_models(session: SessionDep, _admin: AdminKey, settings: SettingsDep) -> RegisteredModelList:
    """Every registered base model, whatever its status, by name."""
    rows = base_models.list_models(session, settings=settings)
    return RegisteredModelList(data=[registered_model_public(r) for r in rows])


@router.get("/models/{name:model_name}", response_model=RegisteredModelPublic)
def read_registered_model(session: SessionDep, _admin: AdminKey, settings: SettingsDep,
                          name: str) -> RegisteredModelPublic:
    """Retrieve one registered base model."""
    return registered_model_public(base_models.get(session, settings=settings, name=name))


@router.delete("/models/{name:model_name}", response_model=RegisteredModelPublic, responses=errors(409))
def remove_registered_model(session: SessionDep, _admin: AdminKey, settings: SettingsDep,
                            name: str) -> RegisteredModelPublic:
    """Unregister a base model, unless a job that has not finished uses it (workers' cached copies stay)."""
    row = base_models.remove(session, settings=settings, name=name)
    session.commit()
    return registered_model_public(row)


@router.post("/models/{name:model_name}/pull", response_model=ModelPullSent)
def pull_registered_model(session: SessionDep, _admin: AdminKey, settings: SettingsDep, name: str,
                          body: ModelPull | None = None) -> ModelPullSent:
    """Download a hub model into the cache of every live worker (or one) before a job needs it."""
    workers = base_models.request_pull(session, settings=settings, name=name,
                                       worker=body.worker if body is not None else None)
    return ModelPullSent(model=name, workers=workers)
