"""A job's outputs: result-file artifacts, checkpoint archives, fine-tuned models and their deletion."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.db import hold_rows
from app.core.errors import Conflict, InvalidRequest, NotFound
from app.core.storage import Storage
from app.models import File, FineTuningJob, JobArtifact, JobCheckpoint, JobStatus, Project
from app.models.job import TERMINAL_STATUSES, UNFINISHED_STATUSES

# Kinds whose presence means the fine-tuned model exists (deleting the model removes them).
WEIGHT_KINDS = ("adapter", "model")


def weights_artifact(adapter_type: str) -> str:
    """The artifact that holds a job's trained weights: a full fine-tune's `model`, else its `adapter`."""
    return "model" if adapter_type == "full" else "adapter"


@dataclass(frozen=True)
class Artifact:
    name: str
    kind: str
    bytes: int
    sha256: str
    created_at: int
    blob_key: str
    filename: str
    file_id: str | None


def list_artifacts(session: Session, *, job: FineTuningJob) -> list[Artifact]:
    """Result files first (adapter, metrics, config, merged), then each registered checkpoint."""
    rows = session.execute(select(JobArtifact, File).join(File, JobArtifact.file_pk == File.pk)
                           .where(JobArtifact.job_pk == job.pk).order_by(JobArtifact.pk)).all()
    found = [Artifact(name=a.name, kind=a.kind, bytes=f.bytes, sha256=f.sha256, created_at=a.created_at,
                      blob_key=f.blob_key, filename=f.filename, file_id=f.id) for a, f in rows]
    checkpoints = session.scalars(select(JobCheckpoint).where(JobCheckpoint.job_pk == job.pk)
                                  .order_by(JobCheckpoint.step_number))
    found += [Artifact(name=f"checkpoint-step-{c.step_number}", kind="checkpoint", bytes=c.bytes, sha256=c.sha256,
                       created_at=c.created_at, blob_key=c.blob_key,
                       filename=f"{job.id}-checkpoint-step-{c.step_number}.tar", file_id=None) for c in checkpoints]
    return found


def get_artifact(session: Session, *, job: FineTuningJob, name: str) -> Artifact:
    for artifact in list_artifacts(session, job=job):
        if artifact.name == name:
            return artifact
    raise NotFound(f"Job {job.id} has no artifact named {name!r}.", param="name")


def has_weights(session: Session, *, job: FineTuningJob) -> bool:
    return session.scalar(select(JobArtifact.pk).where(JobArtifact.job_pk == job.pk,
                                                       JobArtifact.kind.in_(WEIGHT_KINDS)).limit(1)) is not None


# A checkpoint's step is a 32-bit column (JobCheckpoint.step_number): a longer number names no checkpoint.
MAX_CHECKPOINT_STEP = 2**31 - 1


# A checkpoint's model id: the fine-tuned model's, this, and the step.
CHECKPOINT_ID_INFIX = ":ckpt-step-"


def checkpoint_model_id(model_id: str, step: int) -> str:
    return f"{model_id}{CHECKPOINT_ID_INFIX}{step}"


def split_checkpoint_id(model_id: str) -> tuple[str, int | None]:
    """A fine-tuned model id and the checkpoint step of a ``...:ckpt-step-N`` id (None for the model itself: an id
    whose N is not a step, such as "²" or a number past MAX_CHECKPOINT_STEP, is looked up whole and found by
    nothing)."""
    head, sep, tail = model_id.rpartition(CHECKPOINT_ID_INFIX)
    if sep and tail.isascii() and tail.isdigit() and int(tail) <= MAX_CHECKPOINT_STEP:
        return head, int(tail)
    return model_id, None


def find_fine_tuned_model(session: Session, *, project: Project, model_id: str) -> tuple[FineTuningJob, int | None]:
    """The succeeded job behind a fine-tuned model id, and the checkpoint step for ``...:ckpt-step-N`` ids."""
    base_id, step = split_checkpoint_id(model_id)
    job = session.scalar(select(FineTuningJob).where(FineTuningJob.project_pk == project.pk,
                                                     FineTuningJob.fine_tuned_model == base_id,
                                                     FineTuningJob.status == JobStatus.SUCCEEDED))
    if job is None or not has_weights(session, job=job):
        raise NotFound(f"The model '{model_id}' does not exist.", param="model")
    if step is not None and session.scalar(select(JobCheckpoint.pk).where(
            JobCheckpoint.job_pk == job.pk, JobCheckpoint.step_number == step)) is None:
        raise NotFound(f"The model '{model_id}' does not exist.", param="model")
    return job, step


def hold_fine_tuned_model(session: Session, *, project: Project, model_id: str, param: str) -> None:
    """Hold the job row behind a fine-tuned model just before inserting a job (continued training) or an evaluation
    that reads its weights, in that insert's transaction (app/core/db.py). Deleting the weights holds the row
    first too (_hold_job), then looks for unfinished work on them, so either the insert commits first and the delete
    sees it (409 model_in_use), or the delete commits first and this finds the weights gone: 400
    model_not_available."""
    base_id, _step = split_checkpoint_id(model_id)
    hold_rows(session, FineTuningJob.fine_tuned_model, FineTuningJob.project_pk == project.pk,
              FineTuningJob.fine_tuned_model == base_id)
    try:
        find_fine_tuned_model(session, project=project, model_id=model_id)
    except NotFound:
        raise InvalidRequest(f"The model '{model_id}' was deleted while this request was handled.", param=param,
                             code="model_not_available") from None


def _hold_job(session: Session, job: FineTuningJob) -> None:
    """The hold that deleting a job's weights makes before its checks (hold_fine_tuned_model)."""
    hold_rows(session, FineTuningJob.fine_tuned_model, FineTuningJob.pk == job.pk)


def delete_fine_tuned_model(session: Session, *, storage: Storage, project: Project, model_id: str,
                            settings: Settings) -> None:
    """Remove a fine-tuned model's weights, result files and checkpoints; the job's record stays."""
    job, step = find_fine_tuned_model(session, project=project, model_id=model_id)
    if step is not None:
        raise InvalidRequest(f"The model '{model_id}' is a checkpoint of '{job.fine_tuned_model}': checkpoints go "
                             "with their model; delete that instead.", param="model", code="invalid_value")
    _hold_job(session, job)
    _check_not_trained_further(session, project=project, model_id=model_id, param="model")
    _check_not_evaluated(session, project=project, job=job, settings=settings, param="model")
    _delete_outputs(session, storage=storage, job=job)


def delete_job_outputs(session: Session, *, storage: Storage, project: Project, job: FineTuningJob,
                       settings: Settings) -> None:
    """Remove a finished job's stored outputs (weights, result files, checkpoints): a cancelled or failed job's
    checkpoints name no model, so this is the only way to free them; a succeeded job's go as its model's would."""
    if job.status not in TERMINAL_STATUSES:
        raise Conflict(f"Job {job.id} is {job.status}: its outputs can be deleted once it has finished; cancel it "
                       "first.", param="fine_tuning_job_id", code="job_not_finished")
    _hold_job(session, job)
    if job.fine_tuned_model is not None:
        _check_not_trained_further(session, project=project, model_id=job.fine_tuned_model,
                                   param="fine_tuning_job_id")
    _check_not_evaluated(session, project=project, job=job, settings=settings, param="fine_tuning_job_id")
    _delete_outputs(session, storage=storage, job=job)


def _check_not_evaluated(session: Session, *, project: Project, job: FineTuningJob, settings: Settings,
                         param: str) -> None:
    """409 while an evaluation of the job's weights has not finished: its inference worker reads them later."""
    from app.services.evaluations import unfinished_evaluation  # it imports this module

    evaluating = unfinished_evaluation(session, settings=settings, project_pk=project.pk, job_pk=job.pk)
    if evaluating is not None:
        raise Conflict(f"Evaluation {evaluating} of job {job.id}'s weights has not finished; wait for it before "
                       "deleting them.", param=param, code="model_in_use")


def _check_not_trained_further(session: Session, *, project: Project, model_id: str, param: str) -> None:
    in_use = session.scalar(select(FineTuningJob.id).where(
        FineTuningJob.project_pk == project.pk, FineTuningJob.status.in_(UNFINISHED_STATUSES),
        (FineTuningJob.model == model_id)
        | FineTuningJob.model.startswith(f"{model_id}{CHECKPOINT_ID_INFIX}", autoescape=True),
    ).limit(1))
    if in_use is not None:
        raise Conflict(f"The model '{model_id}' is trained further by fine-tuning job {in_use}, which has not "
                       "finished; cancel the job or wait for it before deleting the model.", param=param,
                       code="model_in_use")


def _delete_outputs(session: Session, *, storage: Storage, job: FineTuningJob) -> None:
    keys = [a.blob_key for a in list_artifacts(session, job=job)]
    file_pks = list(session.scalars(select(JobArtifact.file_pk).where(JobArtifact.job_pk == job.pk)))
    session.execute(delete(JobArtifact).where(JobArtifact.job_pk == job.pk))
    session.execute(delete(File).where(File.pk.in_(file_pks)))
    session.execute(delete(JobCheckpoint).where(JobCheckpoint.job_pk == job.pk))
    session.commit()
    for key in keys:  # bytes go after the rows: a crash here leaves orphan bytes, never a broken row
        storage.delete(key)


def prune_checkpoints(session: Session, *, storage: Storage, job_pk: int, keep: int,
                      keep_step: int | None = None) -> list[int]:
    """Retention: keep the latest `keep` checkpoints, the best by valid_loss, and the step `keep_step` (a running
    job's best by its own rule, which load_best_at_end ends on)."""
    checkpoints = list(session.scalars(select(JobCheckpoint).where(JobCheckpoint.job_pk == job_pk)
                                       .order_by(JobCheckpoint.step_number.desc())))
    kept = {c.pk for c in checkpoints[:keep]} | {c.pk for c in checkpoints if c.step_number == keep_step}
    scored = [c for c in checkpoints if isinstance(c.metrics.get("valid_loss"), int | float)]
    if scored:
        kept.add(min(scored, key=lambda c: c.metrics["valid_loss"]).pk)
    doomed = [c for c in checkpoints if c.pk not in kept]
    keys = [c.blob_key for c in doomed]
    pruned = [c.step_number for c in doomed]
    for checkpoint in doomed:
        session.delete(checkpoint)
    session.commit()
    for key in keys:
        storage.delete(key)
    return pruned
