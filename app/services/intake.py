"""The validating_files phase of a job, run in a worker before the job is queued: full validation of files
that were too large to validate during upload (a job whose files were validated at upload is queued at once), and
a DPO job's prompt-room rule on files too large to measure when it was created; and the token report (statistics
with the job's tokenizer, app/services/tokens.py), which the job's first attempt records as events.
"""

from __future__ import annotations

from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.storage import Storage, get_storage
from app.models import File, FineTuningJob, JobStatus
from app.models.base import now_seconds
from app.models.registered_model import USABLE_STATUSES
from app.schemas.training import TrainingConfig
from app.services.datasets import status_details, validate_chunks
from app.services.jobs import add_event, decide_from_count, move_job, too_few_examples
from app.services.tokens import (
    DEFAULT_MAX_SEQ_LENGTH,
    TemplateRefusal,
    prompt_room_problem,
    record_token_stats,
    truncation_warning,
)
from app.services.webhooks import enqueue_job_event


def validate_stored_file(session: Session, *, storage: Storage, file: File) -> None:
    """Validate a whole stored file (one too large to validate during upload) and record the verdict on every
    file sharing its bytes."""
    validator = validate_chunks(storage.read(file.blob_key))
    report = validator.report()
    status = "error" if report["error_count"] else "processed"
    twins = session.scalars(select(File).where(File.project_pk == file.project_pk, File.blob_key == file.blob_key,
                                               File.status == "uploaded"))
    for row in {file, *twins}:
        row.status, row.report, row.status_details = status, report, status_details(report)
    session.commit()


def _fail(session: Session, job: FineTuningJob, *, param: str, code: str, message: str) -> bool:
    """validating_files -> failed, in one guarded UPDATE: a cancel or pause that landed meanwhile stands (on SQLite a
    read takes no lock). Returns False either way (the job is not queued)."""
    if move_job(session, job, sources=(JobStatus.VALIDATING_FILES,), status=JobStatus.FAILED,
                finished_at=now_seconds(), error={"code": code, "param": param, "message": message}):
        add_event(session, job=job, level="error", message=message)
        enqueue_job_event(session, job=job)
    session.commit()
    return False


# (level, message, data) of one event to record.
EventToRecord = tuple[Literal["info", "warn"], str, dict[str, Any]]


def _decided_from_whole_count(job: FineTuningJob, *, examples: int) -> tuple[dict[str, Any], EventToRecord | None]:
    """The job's config with the settings creation decided from the first bytes of the training file decided again
    from all `examples`, and the event naming what changed (None when nothing did)."""
    before = TrainingConfig.model_validate(job.config)
    after = decide_from_count(before, names=job.decided_by_partial_count or (), n_examples=examples)
    changed = {name: (getattr(before, name), getattr(after, name)) for name in job.decided_by_partial_count or ()
               if getattr(before, name) != getattr(after, name)}
    if not changed:
        return job.config, None
    return after.model_dump(mode="json"), (
        "info", f"training_file holds {examples} examples in all: "
        + ", ".join(f"{name} {old} -> {new}" for name, (old, new) in changed.items())
        + " (decided at creation from the part of the file validated during upload).",
        {"examples": examples, "changed": {k: list(v) for k, v in changed.items()}})


def token_report(session: Session, job: FineTuningJob, *, settings: Settings) -> list[EventToRecord]:
    """Token statistics of the job's files for its model, as (level, message, data) events to record: one line per
    file, and a warning naming the first lines of the examples (a DPO job's pairs) that max_seq_length will
    truncate. Needs the model's tokenizer files."""
    from app.services import base_models

    model = base_models.find(session, settings=settings, name=job.base_model)
    if model is None or model.status not in USABLE_STATUSES:
        return []
    max_seq_length = int(job.config.get("max_seq_length", DEFAULT_MAX_SEQ_LENGTH))
    events: list[EventToRecord] = []
    for param, file_id in (("training_file", job.training_file), ("validation_file", job.validation_file)):
        file = session.scalar(select(File).where(File.id == file_id, File.project_pk == job.project_pk)) \
            if file_id else None
        if file is None:
            continue
        try:
            stats = record_token_stats(session, storage=get_storage(), file=file, model=job.base_model,
                                       settings=settings, max_seq_length=max_seq_length, param=param)
        except TemplateRefusal as exc:  # training stops at that example, saying so (worker/training/data.py)
            events.append(("warn", exc.describe(param=param, model=job.base_model), {"file": file.id,
                                                                                     "line": exc.line}))
            continue
        if stats is None:
            events.append(("info", f"No token statistics for {file.id}: model {job.base_model!r} has no "
                                   "tokenizer.json.", {"file": file.id}))
            continue
        summary = stats["tokens_per_example"] or {}
        events.append(("info", f"{param} {file.id}: {stats['examples']} examples, {stats['total_tokens']} tokens; "
                               f"tokens per example min {summary.get('min')}, mean {summary.get('mean')}, p50 "
                               f"{summary.get('p50')}, p95 {summary.get('p95')}, max {summary.get('max')} "
                               f"({stats['method']}).", {"file": file.id, "param": param, "model": job.base_model,
                                                         **stats}))
        key = str(max_seq_length)
        warning = truncation_warning(stats, file_id=file.id, param=param, max_seq_length=max_seq_length,
                                     preference=job.config.get("method") == "dpo")
        if warning is not None:
            events.append(("warn", warning, {"file": file.id, "param": param, "max_seq_length": max_seq_length,
                                             "over_max_seq_length": stats["over_max_seq_length"][key],
                                             "lines": stats["over_max_seq_length_lines"][key]}))
    return events


def _prompt_room(session: Session, job: FineTuningJob, *, file: File, param: str, settings: Settings) -> str | None:
    """A DPO job's prompt-room rule on one of its files, measured here when job creation could not (a file too large
    to tokenise in a request); None when the rule holds, for supervised jobs, and without a tokenizer to count with."""
    from app.services import base_models

    if job.config.get("method") != "dpo" or base_models.find(session, settings=settings, name=job.base_model) is None:
        return None
    max_seq_length = int(job.config.get("max_seq_length", DEFAULT_MAX_SEQ_LENGTH))
    stats = record_token_stats(session, storage=get_storage(), file=file, model=job.base_model, settings=settings,
                               max_seq_length=max_seq_length, param=param)
    if stats is None:
        return None
    return prompt_room_problem(stats, file_id=file.id, param=param, max_seq_length=max_seq_length)


def validate_job_files(session: Session, *, job_id: str, settings: Settings) -> bool:
    """validating_files -> queued once the job's files are usable; False if the job failed or is elsewhere.

    No lock is held while files are read (a large file takes a while): the job is locked only to change state.
    """
    job = session.scalar(select(FineTuningJob).where(FineTuningJob.id == job_id))
    if job is None or job.status != JobStatus.VALIDATING_FILES:
        return False
    examples = 0
    for param, file_id in (("training_file", job.training_file), ("validation_file", job.validation_file)):
        if file_id is None:
            continue
        row = session.scalar(select(File).where(File.id == file_id, File.project_pk == job.project_pk))
        if row is None:
            return _fail(session, job, param=param, code="invalid_file", message=f"{param} {file_id} no longer exists.")
        if row.status == "uploaded":
            add_event(session, job=job, message=f"Validating {param} {file_id} ({row.bytes} bytes).")
            session.commit()
            validate_stored_file(session, storage=get_storage(), file=row)
        if row.status != "processed":
            return _fail(session, job, param=param, code="invalid_file",
                         message=f"{param} {file_id} failed validation: {row.status_details}")
        if param == "training_file":
            examples = (row.report or {}).get("examples", 0)
        shortfall = too_few_examples(row, settings=settings, train_on_inputs=bool(job.config.get("train_on_inputs"))) \
            if param == "training_file" else None
        if shortfall:
            return _fail(session, job, param=param, code="too_few_examples", message=shortfall)
        try:
            problem = _prompt_room(session, job, file=row, param=param, settings=settings)
        except TemplateRefusal as exc:
            return _fail(session, job, param=param, code="invalid_file",
                         message=exc.describe(param=param, model=job.base_model))
        if problem:
            return _fail(session, job, param=param, code="prompt_too_long", message=problem)
    config, decided = _decided_from_whole_count(job, examples=examples) if job.decided_by_partial_count else \
        (job.config, None)
    # One guarded UPDATE: a cancel or pause that landed while the files were read stands (on SQLite a read takes no
    # lock, and the job would have been queued over it and trained).
    if not move_job(session, job, sources=(JobStatus.VALIDATING_FILES,), status=JobStatus.QUEUED, config=config,
                    decided_by_partial_count=None):
        session.commit()
        return False
    if decided is not None:
        add_event(session, job=job, level=decided[0], message=decided[1], data=decided[2])
    add_event(session, job=job, message="Files validated; job queued.")
    session.commit()
    return True
