from __future__ import annotations

import functools
from typing import Annotated, Any

import anyio
import anyio.from_thread
import anyio.to_thread
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from app.api.deps import CurrentProject, SessionDep, SettingsDep, check_limit
from app.api.multipart import MultipartUpload
from app.api.openapi import binary_responses, errors
from app.api.streaming import stream_blob
from app.core.security import plain_filename
from app.core.storage import get_storage
from app.schemas.files import FileDeleted, FileList, FilePublic, FileValidationReport
from app.services import files as file_service

router = APIRouter(prefix="/files", tags=["files"])

UPLOAD_OPENAPI: dict[str, Any] = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "purpose"],
    "properties": {"file": {"type": "string", "format": "binary"}, "purpose": {"type": "string", "enum": ["fine-tune"]},
                   "model": {"type": "string", "description": "Extension: measure token statistics with this "
                                                              "catalogue model's tokenizer."}}}}}}}


def file_public(row: file_service.File) -> FilePublic:
    return FilePublic(id=row.id, bytes=row.bytes, created_at=row.created_at, filename=row.filename,
                      purpose=row.purpose, status=row.status, status_details=row.status_details, sha256=row.sha256)


@router.post("", response_model=FilePublic, openapi_extra=UPLOAD_OPENAPI, responses=errors(413))
async def create_file(request: Request, session: SessionDep, project: CurrentProject, settings: SettingsDep,
                      model: Annotated[str | None, Query()] = None) -> FilePublic:
    """Upload a JSONL dataset (purpose `fine-tune`); it streams into storage and is validated as it arrives."""
    # End the key lookup's transaction: its pooled connection is not held while the body streams in (the
    # storage write takes a connection of its own).
    await anyio.to_thread.run_sync(session.commit)
    upload = MultipartUpload(request, max_file_bytes=settings.max_upload_bytes)
    await upload.start()
    # Fields sent before the file are checked before a byte is stored; later ones once it has streamed in.
    if "purpose" in upload.fields:
        file_service.check_purpose(upload.fields["purpose"])
    if model is not None or "model" in upload.fields:
        await anyio.to_thread.run_sync(functools.partial(
            file_service.check_model, session, model if model is not None else upload.fields["model"],
            settings=settings))

    def fields() -> dict[str, str]:
        form = anyio.from_thread.run(upload.finish)
        return {**form, "model": model} if model is not None else form

    def store() -> file_service.File:
        return file_service.create_file(session, storage=get_storage(), project=project,
                                        chunks=upload.file_chunks(), filename=plain_filename(upload.filename),
                                        fields=fields, settings=settings)

    return file_public(await anyio.to_thread.run_sync(store))


@router.get("", response_model=FileList)
def list_files(session: SessionDep, project: CurrentProject, settings: SettingsDep,
               after: str | None = None, limit: Annotated[int, Query()] = 20,
               order: Annotated[str, Query(pattern="^(asc|desc)$")] = "desc", purpose: str | None = None
               ) -> FileList:
    """List the project's files, newest first."""
    check_limit(limit, settings.list_limit_max)
    rows, has_more = file_service.list_files(session, project=project, after=after, limit=limit, order=order,
                                             purpose=purpose)
    data = [file_public(r) for r in rows]
    return FileList(data=data, has_more=has_more, first_id=data[0].id if data else None,
                    last_id=data[-1].id if data else None)


@router.get("/{file_id}", response_model=FilePublic)
def read_file(session: SessionDep, project: CurrentProject, file_id: str) -> FilePublic:
    """Retrieve a file, with its validation status."""
    return file_public(file_service.get_file(session, project=project, file_id=file_id))


@router.get("/{file_id}/validation_report", response_model=FileValidationReport)
def read_file_validation_report(session: SessionDep, project: CurrentProject, file_id: str
                                ) -> FileValidationReport:
    """The full validation report of a dataset: per-line errors (capped) and statistics."""
    row = file_service.get_file(session, project=project, file_id=file_id)
    return FileValidationReport(id=row.id, status=row.status, report=row.report)


@router.get("/{file_id}/content", responses=binary_responses("application/octet-stream", ranges=True))
def read_file_content(request: Request, session: SessionDep, project: CurrentProject, file_id: str) -> Response:
    """The file's bytes (Range requests supported)."""
    row = file_service.get_file(session, project=project, file_id=file_id)
    return stream_blob(request, key=row.blob_key, size=row.bytes, sha256=row.sha256, filename=row.id)


@router.delete("/{file_id}", response_model=FileDeleted, responses=errors(409))
def delete_file(session: SessionDep, project: CurrentProject, settings: SettingsDep, file_id: str) -> FileDeleted:
    """Delete a file, unless a job or an evaluation that has not finished still needs it."""
    file_service.delete_file(session, storage=get_storage(), project=project, file_id=file_id, settings=settings)
    return FileDeleted(id=file_id)
