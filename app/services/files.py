"""Files: streamed into storage while validated, stored once per content, listed, deleted safely."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.db import hold_rows
from app.core.errors import Conflict, InvalidRequest, NotFound, TooLargeError
from app.core.storage import Storage, TooLarge
from app.models import File, FineTuningJob, JobArtifact, Project
from app.models.base import new_id
from app.models.job import UNFINISHED_STATUSES
from app.models.registered_model import USABLE_STATUSES
from app.services.artifacts import WEIGHT_KINDS
from app.services.datasets import VALIDATOR_VERSION, DatasetValidator, status_details
from app.services.evaluations import unfinished_evaluation
from app.services.paging import page_after
from app.services.tokens import TemplateRefusal, record_token_stats

UPLOAD_PURPOSES = ("fine-tune",)


def check_purpose(purpose: str | None) -> str:
    """The purpose of an upload, or a 400 naming `purpose`."""
    if purpose is None:
        raise InvalidRequest("Missing required parameter: 'purpose'.", param="purpose",
                             code="missing_required_parameter")
    if purpose not in UPLOAD_PURPOSES:
        raise InvalidRequest(f"Invalid purpose {purpose!r}: uploads for fine-tuning use purpose 'fine-tune'.",
                             param="purpose", code="invalid_value")
    return purpose


def too_large(max_bytes: int) -> TooLargeError:
    """The 413 for an upload past max_upload_bytes."""
    return TooLargeError(f"The file exceeds the maximum upload size of {max_bytes} bytes.", param="file",
                         code="file_too_large")


def check_model(session: Session, model: str | None, *, settings: Settings) -> str | None:
    """The registered model to measure token statistics with at upload time (extension), or None."""
    from app.services import base_models

    if model is not None:
        usable = [m.name for m in base_models.list_models(session, settings=settings, statuses=USABLE_STATUSES)]
        if model not in usable:
            raise InvalidRequest(f"Model {model!r} is not a registered base model; token statistics need one of "
                                 f"{usable}.", param="model", code="model_not_available")
    session.commit()  # no transaction (nor pooled connection) held while the upload streams in
    return model


def _validated(chunks: Iterable[bytes], validator: DatasetValidator, *, limit: int) -> Iterator[bytes]:
    """Pass chunks through unchanged, feeding the validator while the file is within `limit` bytes."""
    validating = True
    for chunk in chunks:
        # The first chunk is always checked: it is what tells a JSONL file from anything else.
        if validating and validator.bytes_read and validator.bytes_read + len(chunk) > limit:
            validating = False  # the worker validates the whole file later; stop paying for it here
        if validating:
            validator.feed(chunk)
        yield chunk
    if validating:
        validator.finish()


def create_file(session: Session, *, storage: Storage, project: Project, chunks: Iterable[bytes], filename: str,
                fields: Callable[[], dict[str, str]], settings: Settings) -> File:
    """Store an upload while validating it. `fields` gives the form fields once the file has streamed in
    (they may follow it); a file that is not JSONL, or a bad purpose, leaves nothing behind."""
    file_id = new_id("file-")
    validator = DatasetValidator()
    key = f"files/{file_id}"
    max_bytes = settings.max_upload_bytes
    try:
        stored = storage.write(key, _validated(chunks, validator, limit=settings.intake_sync_validation_bytes),
                               max_bytes=max_bytes)
    except TooLarge:
        raise too_large(max_bytes) from None
    try:
        form = fields()
        purpose = check_purpose(form.get("purpose"))
        model = check_model(session, form.get("model"), settings=settings)
        if stored.bytes == 0 or validator.valid_json_objects == 0:
            raise InvalidRequest(
                f"Invalid file format for fine-tuning: {filename!r} is not JSONL (one JSON object per line).",
                param="file", code="invalid_file_format")
        complete = validator.bytes_read == stored.bytes
        report = validator.report(partial=not complete)
        status = "error" if report["error_count"] else "processed" if complete else "uploaded"
        details = status_details(report)
        if status == "uploaded":
            details = (f"The first {validator.bytes_read} bytes are valid; the whole file is validated before a "
                       "job uses it.")
        row = File(id=file_id, project_pk=project.pk, filename=filename[:255], purpose=purpose,
                   bytes=stored.bytes, sha256=stored.sha256, blob_key=key, status=status,
                   status_details=details, report=report)
        # The row first, on its own bytes: on SQLite the insert takes the write lock, so a delete of the twin found
        # next cannot commit between finding it and this commit (on Postgres the twin's row lock does that).
        session.add(row)
        session.flush()
        twin = _same_content(session, project=project, sha256=stored.sha256, size=stored.bytes, other_than=row.pk)
        if twin is not None:
            row.blob_key = twin.blob_key
            if twin.status != "uploaded" and (twin.report or {}).get("validator") == VALIDATOR_VERSION:
                # same bytes, same verdict: reuse the complete report (one of an older validator: this upload's)
                row.status, row.status_details, row.report = twin.status, twin.status_details, twin.report
        session.commit()
    except BaseException:
        session.rollback()
        storage.delete(key)
        raise
    if row.blob_key != key:
        storage.delete(key)  # the twin's blob holds the same bytes
    if model is not None and row.status == "processed":
        try:
            record_token_stats(session, storage=storage, file=row, model=model, settings=settings, param="file")
        except TemplateRefusal:  # the file is stored and fine; a job on that model says which example, and why
            session.rollback()
        except InvalidRequest:  # deleted already, by a request that had its id: the upload itself went through
            session.rollback()
    return row


def _same_content(session: Session, *, project: Project, sha256: str, size: int,
                  other_than: int) -> File | None:
    """An earlier upload with the same bytes (not the row `other_than`), locked so that deleting it waits for this
    one's commit."""
    return session.scalar(
        select(File).where(File.project_pk == project.pk, File.sha256 == sha256, File.bytes == size,
                           File.purpose.in_(UPLOAD_PURPOSES), File.pk != other_than)
        .order_by(File.pk).limit(1).with_for_update())


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


def delete_file(session: Session, *, storage: Storage, project: Project, file_id: str,
                settings: Settings) -> None:
    """Delete a file's row, and its bytes unless another file with the same content shares them."""
    row = get_file(session, project=project, file_id=file_id)
    # Every file on this blob is locked first, in primary-key order (an upload adopting the blob locks the same rows,
    # and commits first, then is counted below), and this one held (app/core/db.py; on SQLite the write lock)
    # before the checks, as a job's or an evaluation's insert holds it first too (jobs.hold_files): one created
    # meanwhile is either seen below or finds the file gone.
    session.scalars(select(File.pk).where(File.blob_key == row.blob_key).order_by(File.pk).with_for_update()).all()
    hold_rows(session, File.bytes, File.pk == row.pk)
    in_use = session.scalar(
        select(FineTuningJob.id).where(
            FineTuningJob.project_pk == project.pk,
            FineTuningJob.status.in_(UNFINISHED_STATUSES),
            (FineTuningJob.training_file == file_id) | (FineTuningJob.validation_file == file_id),
        ).limit(1))
    if in_use is not None:
        raise Conflict(f"File {file_id} is used by fine-tuning job {in_use}, which has not finished; "
                       "cancel the job or wait for it before deleting the file.", param="file_id",
                       code="file_in_use")
    # An evaluation reads the file's bytes when its inference worker gets to it, as a job does.
    evaluating = unfinished_evaluation(session, settings=settings, project_pk=project.pk, file_id=file_id)
    if evaluating is not None:
        raise Conflict(f"File {file_id} is used by evaluation {evaluating}, which has not finished; wait for it "
                       "before deleting the file.", param="file_id", code="file_in_use")
    holds = session.scalar(select(FineTuningJob.fine_tuned_model)
                           .join(JobArtifact, JobArtifact.job_pk == FineTuningJob.pk)
                           .where(JobArtifact.file_pk == row.pk, JobArtifact.kind.in_(WEIGHT_KINDS)).limit(1))
    if holds is not None:  # its rows go with the file: the model would vanish without a word
        raise Conflict(f"File {file_id} holds the weights of the fine-tuned model {holds!r}; delete the model "
                       f"(DELETE /v1/models/{holds}), which removes its files and checkpoints.", param="file_id",
                       code="file_in_use")
    session.delete(row)
    session.flush()
    shared = session.scalar(select(func.count()).select_from(File).where(File.blob_key == row.blob_key))
    session.commit()
    if not shared:
        storage.delete(row.blob_key)


def file_report(row: File) -> dict[str, Any] | None:
    return row.report
