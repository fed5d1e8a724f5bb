from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Query, Request, UploadFile
from fastapi.responses import Response

from app.api.deps import CurrentProject, SessionDep, SettingsDep
from app.api.streaming import stream_blob
from app.core.errors import InvalidRequest
from app.core.storage import get_storage
from app.schemas.files import FileDeleted, FileList, FilePublic, FileValidationReport
from app.services import files as file_service

router = APIRouter(prefix="/files", tags=["files"])


def file_public(row: file_service.File) -> FilePublic:
    return FilePublic(id=row.id, bytes=row.bytes, created_at=row.created_at, filename=row.filename,
                      purpose=row.purpose, status=row.status, status_details=row.status_details, sha256=row.sha256)


def check_limit(limit: int, maximum: int) -> None:
    if not 1 <= limit <= maximum:
        raise InvalidRequest(f"Invalid 'limit': must be between 1 and {maximum}.", param="limit",
                             code="invalid_value")


@router.post("", response_model=FilePublic)
def create_file(session: SessionDep, project: CurrentProject, settings: SettingsDep,
                file: UploadFile, purpose: Annotated[str, Form()]) -> FilePublic:
    """Upload a JSONL dataset (purpose `fine-tune`); it is validated as it streams in."""
    row = file_service.create_file(session, storage=get_storage(), project=project, stream=file.file,
                                   filename=file.filename or "upload.jsonl", purpose=purpose,
                                   max_bytes=settings.max_upload_bytes)
    return file_public(row)


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


@router.get("/{file_id}/content")
def read_file_content(request: Request, session: SessionDep, project: CurrentProject, file_id: str) -> Response:
    """The file's bytes (Range requests supported)."""
    row = file_service.get_file(session, project=project, file_id=file_id)
    return stream_blob(request, key=row.blob_key, size=row.bytes, sha256=row.sha256, filename=row.id)


@router.delete("/{file_id}", response_model=FileDeleted)
def delete_file(session: SessionDep, project: CurrentProject, file_id: str) -> FileDeleted:
    """Delete a file, unless a job that has not finished still needs it."""
    file_service.delete_file(session, storage=get_storage(), project=project, file_id=file_id)
    return FileDeleted(id=file_id)
