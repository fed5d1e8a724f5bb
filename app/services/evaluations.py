"""Answer reports asked for after training (POST /v1/fine_tuning/jobs/{id}/evaluations): which weights and file
they compare, which inference worker runs them, and their state as the API shows it."""

from __future__ import annotations

from typing import Any

import httpx
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.db import move_row
from app.core.errors import APIError, InvalidRequest, NotFound
from app.models import AnswerEvaluation, File, FineTuningJob, Project
from app.models.base import new_id, now_seconds
from app.schemas.evaluations import EvaluationCreate, EvaluationPublic
from app.schemas.training import TrainingMethod
from app.services import inference
from app.services.artifacts import hold_fine_tuned_model, split_checkpoint_id
from app.services.jobs import FORMAT_NAMES, METHOD_FORMATS, dataset_file, hold_files
from app.services.paging import page_after

ACTIVE = ("queued", "running")
# An evaluation not yet handed to an inference worker (server unset) after this long was lost with its API request.
HANDOFF_SECONDS = 60
# The formats whose examples carry a reference answer (worker/training/answer_report.py: examples_of): a chat's last
# assistant turn, a completion, a preference pair's preferred answer. Text examples have nothing to compare with.
ANSWERED_FORMATS = ("chat", "prompt_completion", "preference")
# The `code` of each 400 POST .../evaluations can get: the request's shape, then the model's and the file's checks.
REQUEST_ERROR_CODES = ("invalid_json", "missing_required_parameter", "unknown_parameter", "invalid_value",
                       "model_not_available", "invalid_file", "invalid_file_purpose")


def evaluation_file(session: Session, *, project: Project, file_id: str, settings: Settings) -> File:
    """The project's file `file_id`, checked as a job's file of the method its format trains (a preference file as
    DPO's), and refused where its report says it has no answers to compare with."""
    report = session.scalar(select(File.report).where(File.id == file_id, File.project_pk == project.pk)) or {}
    method: TrainingMethod = "dpo" if report.get("format") in METHOD_FORMATS["dpo"] else "supervised"
    file = dataset_file(session, project=project, file_id=file_id, param="file_id", settings=settings, method=method)
    fmt = (file.report or {}).get("format")
    if fmt is not None and fmt not in ANSWERED_FORMATS:
        raise InvalidRequest(f"File {file_id} holds {FORMAT_NAMES.get(fmt, fmt)} examples, which have no answer to "
                             "compare with: an evaluation needs chat examples whose last message is the "
                             "assistant's, prompt/completion examples or preference pairs.", param="file_id",
                             code="invalid_file")
    return file


def create_evaluation(session: Session, *, project: Project, job: FineTuningJob, request: EvaluationCreate,
                      settings: Settings) -> AnswerEvaluation:
    """Check the model and the file, record the evaluation and hand it to a live inference worker."""
    model = request.model or job.fine_tuned_model
    if model is None or split_checkpoint_id(model)[0] != job.fine_tuned_model:
        raise InvalidRequest(f"Job {job.id} has no fine-tuned model {model!r} to evaluate" +
                             ("" if job.fine_tuned_model is None else
                              f": use {job.fine_tuned_model} or one of its checkpoints"), param="model",
                             code="invalid_value")
    target = inference.resolve_target(session, settings=settings, project=project, model=model)
    file = evaluation_file(session, project=project, file_id=request.file_id, settings=settings)
    urls = inference.servers_for(session, settings=settings, target=target)
    hold_files(session, project=project, files=[("file_id", file)])
    hold_fine_tuned_model(session, project=project, model_id=model, param="model")
    row = AnswerEvaluation(id=new_id("ftevaluation-"), job_pk=job.pk, project_pk=project.pk, model=model,
                           file_id=file.id, max_examples=request.max_examples, max_new_tokens=request.max_new_tokens,
                           target={**target.as_request(), "file_key": file.blob_key}, status="queued",
                           result_files=[])
    session.add(row)
    session.commit()  # the inference worker reads the row from its own session
    busy: APIError | None = None
    for url, token in urls:
        try:
            sent = httpx.post(url + inference.EVALUATIONS_PATH, json={"id": row.id}, timeout=10,
                              headers={inference.TOKEN_HEADER: token})
        except httpx.TransportError:
            continue
        if sent.status_code == 202:
            row.server = sent.json()["server"]
            session.commit()
            return row
        if sent.status_code == 429:  # its queue is full: as chat's, a 429 inference_busy if every one is
            busy = inference.error_from(sent)  # the one rule for an inference process's refusals
    # The client gets an error, so no evaluation exists: the row goes. A worker that took it yet answered too late
    # finds no row to start (or, rarely, none to finish: its result bytes are then left unreferenced).
    session.execute(delete(AnswerEvaluation).where(AnswerEvaluation.id == row.id))
    session.commit()
    if busy is not None:
        raise busy
    raise inference.InferenceUnavailable("No inference worker could take the evaluation; they may be restarting. "
                                         "Retry shortly.")


def _mark_orphans(session: Session, rows: list[AnswerEvaluation], *, settings: Settings, commit: bool = True) -> None:
    """Evaluations whose inference worker is gone (no live heartbeat) fail, saying so, instead of waiting forever
    (committed, or with `commit` False left to the caller's transaction)."""
    handed_off_by = now_seconds() - HANDOFF_SECONDS
    active = [r for r in rows if r.status in ACTIVE and (r.server is not None or r.created_at < handed_off_by)]
    if not active:
        return
    live = {s.name for s in inference.live_servers(session, settings=settings)}
    for row in active:
        if row.server not in live:  # guarded: a worker that finished or started it meanwhile is not overwritten
            same_server = AnswerEvaluation.server.is_(None) if row.server is None else \
                AnswerEvaluation.server == row.server
            move_row(session, row, AnswerEvaluation.status.in_(ACTIVE), same_server, status="failed",
                     finished_at=now_seconds(),
                     error={"code": "inference_failed", "message": "The inference worker running this evaluation "
                            "stopped before it finished; ask for it again.", "param": None})
    if commit:
        session.commit()
    else:
        session.flush()


def unfinished_evaluation(session: Session, *, settings: Settings, project_pk: int, file_id: str | None = None,
                          job_pk: int | None = None) -> str | None:
    """The id of an evaluation still to finish that reads the file `file_id` or the weights of the job `job_pk`
    (one whose inference worker is gone fails first, saying so: it would never finish), or None. The caller commits:
    a deletion asks, and its hold on the row (app/core/db.py) must last until its own commit."""
    query = select(AnswerEvaluation).where(AnswerEvaluation.project_pk == project_pk,
                                           AnswerEvaluation.status.in_(ACTIVE))
    if file_id is not None:
        query = query.where(AnswerEvaluation.file_id == file_id)
    if job_pk is not None:
        query = query.where(AnswerEvaluation.job_pk == job_pk)
    rows = list(session.scalars(query))
    _mark_orphans(session, rows, settings=settings, commit=False)
    return next((row.id for row in rows if row.status in ACTIVE), None)


def get_evaluation(session: Session, *, job: FineTuningJob, evaluation_id: str, settings: Settings
                   ) -> AnswerEvaluation:
    row = session.scalar(select(AnswerEvaluation).where(AnswerEvaluation.id == evaluation_id,
                                                        AnswerEvaluation.job_pk == job.pk))
    if row is None:
        raise NotFound(f"Job {job.id} has no evaluation {evaluation_id!r}.", param="evaluation_id")
    _mark_orphans(session, [row], settings=settings)
    return row


def list_evaluations(session: Session, *, job: FineTuningJob, after: str | None, limit: int, settings: Settings
                     ) -> tuple[list[AnswerEvaluation], bool]:
    rows, more = page_after(session, select(AnswerEvaluation).where(AnswerEvaluation.job_pk == job.pk),
                            AnswerEvaluation, project_pk=job.project_pk, after=after, limit=limit,
                            scope=AnswerEvaluation.job_pk == job.pk, noun="evaluation")
    _mark_orphans(session, rows, settings=settings)
    return rows, more


def evaluation_public(row: AnswerEvaluation, *, job: FineTuningJob) -> EvaluationPublic:
    return EvaluationPublic(id=row.id, fine_tuning_job_id=job.id, model=row.model, file_id=row.file_id,
                            max_examples=row.max_examples, max_new_tokens=row.max_new_tokens,
                            status=row.status, report=row.report,  # type: ignore[arg-type]
                            result_files=list(row.result_files), error=row.error, created_at=row.created_at,
                            finished_at=row.finished_at)


# --- the inference worker's side ------------------------------------------------------------------------------

def start(session: Session, *, evaluation_id: str) -> AnswerEvaluation | None:
    """queued -> running, for the worker that runs it; None if it is not queued any more."""
    row = session.scalar(select(AnswerEvaluation).where(AnswerEvaluation.id == evaluation_id))
    started = row is not None and move_row(session, row, AnswerEvaluation.status == "queued", status="running")
    session.commit()
    return row if started else None


def finish(session: Session, *, evaluation_id: str, report: dict[str, Any] | None, files: list[Any],
           error: str | None = None) -> bool:
    """succeeded with the report and its result files (File rows), or failed with the error; False when the
    evaluation had ended (or gone) meanwhile, and nothing was recorded."""
    row = session.scalar(select(AnswerEvaluation).where(AnswerEvaluation.id == evaluation_id))
    if row is None or row.status not in ACTIVE:
        return False
    outcome: dict[str, Any] = {"status": "succeeded", "report": report, "result_files": [f.id for f in files]} \
        if error is None else {"status": "failed", "error": {"code": "evaluation_failed", "message": error,
                                                             "param": None}}
    # Guarded: an evaluation marked failed meanwhile (its worker's heartbeat went stale) stays so, without files.
    if not move_row(session, row, AnswerEvaluation.status.in_(ACTIVE), finished_at=now_seconds(), **outcome):
        session.rollback()
        return False
    for file in files:
        session.add(file)
    session.commit()
    return True

