"""Files: streamed into storage while validated, listed with keyset paging, deleted safely."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.errors import Conflict, InvalidRequest, NotFound, TooLargeError
from app.core.storage import CHUNK_BYTES, Storage, TooLarge
from app.models import File, FineTuningJob, Project
from app.models.base import new_id
from app.services.datasets import DatasetValidator, status_details
from app.services.paging import page_after

UPLOAD_PURPOSES = ("fine-tune",)
ACTIVE_JOB_STATUSES = ("validating_files", "queued", "running", "paused")


def _lines(chunks: Iterable[bytes], validator: DatasetValidator) -> Iterator[bytes]:
    """Pass chunks through unchanged while feeding complete lines to the validator."""
    pending = b""
    line_number = 0
    for chunk in chunks:
        yield chunk
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for line in complete:
            line_number += 1
            validator.add_line(line_number, line)
    if pending:
        validator.add_line(line_number + 1, pending)


def _read_chunks(stream: BinaryIO) -> Iterator[bytes]:
    while chunk := stream.read(CHUNK_BYTES):
        yield chunk


def create_file(session: Session, *, storage: Storage, project: Project, stream: BinaryIO, filename: str,
                purpose: str, max_bytes: int) -> File:
    """Store an upload and validate it; a file that is not JSONL at all is refused and not kept."""
    if purpose not in UPLOAD_PURPOSES:
        raise InvalidRequest(f"Invalid purpose {purpose!r}: uploads for fine-tuning use purpose 'fine-tune'.",
                             param="purpose", code="invalid_value")
    file_id = new_id("file-")
    validator = DatasetValidator()
    key = f"files/{file_id}"
    try:
        stored = storage.write(key, _lines(_read_chunks(stream), validator), max_bytes=max_bytes)
    except TooLarge:
        raise TooLargeError(f"The file exceeds the maximum upload size of {max_bytes} bytes.",
                            param="file", code="file_too_large") from None
    report = validator.report()
    if stored.bytes == 0 or validator.valid_json_objects == 0:
        storage.delete(key)
        raise InvalidRequest(
            f"Invalid file format for fine-tuning: {filename!r} is not JSONL (one JSON object per line).",
            param="file", code="invalid_file_format")
    row = File(id=file_id, project_pk=project.pk, filename=filename[:255], purpose=purpose,
               bytes=stored.bytes, sha256=stored.sha256, blob_key=key,
               status="error" if report["error_count"] else "processed",
               status_details=status_details(report), report=report)
    session.add(row)
    try:
        session.commit()
    except BaseException:
        session.rollback()
        storage.delete(key)
        raise
    return row


def build_result_file(*, project_pk: int, filename: str, blob_key: str, size: int, sha256: str) -> File:
    """A `fine-tune-results` File for stored bytes, not yet in a session (the job's finish adds it)."""
    return File(id=new_id("file-"), project_pk=project_pk, filename=filename, purpose="fine-tune-results",
                bytes=size, sha256=sha256, blob_key=blob_key, status="processed")


def get_file(session: Session, *, project: Project, file_id: str, param: str = "file_id") -> File:
    row = session.scalar(select(File).where(File.id == file_id, File.project_pk == project.pk))
    if row is None:
        raise NotFound(f"No such File object: {file_id}", param=param)
    return row


def list_files(session: Session, *, project: Project, after: str | None, limit: int, order: str,
               purpose: str | None) -> tuple[list[File], bool]:
    query = select(File).where(File.project_pk == project.pk)
    if purpose:
        query = query.where(File.purpose == purpose)
    return page_after(session, query, File, project_pk=project.pk, after=after, limit=limit,
                      descending=order != "asc", param="after")


def delete_file(session: Session, *, storage: Storage, project: Project, file_id: str) -> None:
    row = get_file(session, project=project, file_id=file_id)
    in_use = session.scalar(
        select(FineTuningJob.id).where(
            FineTuningJob.project_pk == project.pk,
            FineTuningJob.status.in_(ACTIVE_JOB_STATUSES),
            (FineTuningJob.training_file == file_id) | (FineTuningJob.validation_file == file_id),
        ).limit(1))
    if in_use is not None:
        raise Conflict(f"File {file_id} is used by fine-tuning job {in_use}, which has not finished; "
                       "cancel the job or wait for it before deleting the file.", param="file_id",
                       code="file_in_use")
    session.delete(row)
    session.commit()
    storage.delete(row.blob_key)


def file_report(row: File) -> dict[str, Any] | None:
    return row.report
