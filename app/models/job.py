from __future__ import annotations

from enum import StrEnum
from typing import Any

from sqlalchemy import Double, ForeignKey, Index, Integer, String, UniqueConstraint, false
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, BigIntKey, JSONType, KeyedMixin, now_seconds
from app.models.registered_model import BASE_REVISION_LENGTH


class JobStatus(StrEnum):
    """A job's status: OpenAI's, plus `paused`."""

    VALIDATING_FILES = "validating_files"
    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


# The one map of who may move a job where. Each state change is an UPDATE guarded by its source statuses
# (`sources_of`), so two processes racing for one job cannot both move it.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    # files checked (queued), failed validation, paused or cancelled before starting
    JobStatus.VALIDATING_FILES: frozenset({JobStatus.QUEUED, JobStatus.FAILED, JobStatus.PAUSED, JobStatus.CANCELLED}),
    # claimed by a worker (running), or paused/cancelled while waiting
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.FAILED, JobStatus.PAUSED, JobStatus.CANCELLED}),
    # finished; paused after a checkpoint; handed back (queued) on a stop, a crash or a lost lease
    JobStatus.RUNNING: frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.PAUSED,
                                  JobStatus.QUEUED}),
    # resumed (back to validating_files when it never ran: its files may not have been checked), or cancelled
    JobStatus.PAUSED: frozenset({JobStatus.QUEUED, JobStatus.VALIDATING_FILES, JobStatus.CANCELLED}),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}
TERMINAL_STATUSES = tuple(status for status, targets in TRANSITIONS.items() if not targets)
# Accepted and not yet running: waiting for a worker.
WAITING_STATUSES = (JobStatus.VALIDATING_FILES, JobStatus.QUEUED)
# Holding (or about to hold) a worker or the project's running-job quota.
ACTIVE_STATUSES = (*WAITING_STATUSES, JobStatus.RUNNING)
# Jobs that have not finished: active ones, and paused ones that resume. What they use (files, a model they continue
# from) cannot be deleted.
UNFINISHED_STATUSES = (*ACTIVE_STATUSES, JobStatus.PAUSED)


def sources_of(target: JobStatus) -> tuple[JobStatus, ...]:
    """The statuses a job may move to `target` from."""
    return tuple(status for status, targets in TRANSITIONS.items() if target in targets)


class FineTuningJob(KeyedMixin, Base):
    """A fine-tuning job. This row, not the broker, is the truth about the job and its lease."""

    __tablename__ = "fine_tuning_jobs"
    __table_args__ = (
        Index("ix_fine_tuning_jobs_project_pk_pk", "project_pk", "pk"),
        Index("ix_fine_tuning_jobs_status_lease", "status", "lease_expires_at"),
        UniqueConstraint("project_pk", "idempotency_key", name="uq_fine_tuning_jobs_idempotency"),
    )

    id: Mapped[str] = mapped_column(String(64), unique=True)
    project_pk: Mapped[int] = mapped_column(BigIntKey, ForeignKey("projects.pk", ondelete="CASCADE"))
    model: Mapped[str] = mapped_column(String(255))
    # The catalogue base model the weights come from (differs from `model` for continued training).
    base_model: Mapped[str] = mapped_column(String(255))
    training_file: Mapped[str] = mapped_column(String(64))
    validation_file: Mapped[str | None] = mapped_column(String(64), nullable=True)
    status: Mapped[str] = mapped_column(String(20), default=JobStatus.VALIDATING_FILES)
    # TrainingConfig.model_dump(): what the worker runs, fully resolved.
    config: Mapped[dict[str, Any]] = mapped_column(JSONType)
    suffix: Mapped[str | None] = mapped_column(String(64), nullable=True)
    seed: Mapped[int] = mapped_column(BigIntKey)
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSONType, nullable=True)
    integrations: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(255), nullable=True, unique=True)
    trained_tokens: Mapped[int | None] = mapped_column(BigIntKey, nullable=True)
    created_at: Mapped[int] = mapped_column(Integer, default=now_seconds)
    started_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
    finished_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
    estimated_finish: Mapped[int | None] = mapped_column(Integer, nullable=True)
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int | None] = mapped_column(Integer, nullable=True)

    # Lease: which attempt may write, who runs it and until when (Unix seconds, float).
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    # Attempts that died (killed, crashed) since the job last registered a new checkpoint; pauses, releases
    # and lost leases do not count. Settings.max_attempts bounds it.
    crashes: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    lease_owner: Mapped[str | None] = mapped_column(String(255), nullable=True)
    lease_expires_at: Mapped[float | None] = mapped_column(Double, nullable=True)
    # The answer report's headline (worker/training/answer_report.py): examples, the base's and the tuned model's
    # mean scores, tuned minus base; None without a validation file or with evaluation.generate false.
    evaluation: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    # "cancel" or "pause", set by the API and honoured by the running attempt.
    requested_action: Mapped[str | None] = mapped_column(String(16), nullable=True)
    # Last time the job was handed to the broker; the reaper re-sends stale dispatches.
    dispatched_at: Mapped[float | None] = mapped_column(Double, nullable=True)
    # The queue that last message went to (shared, or one worker's direct queue): routing spreads
    # jobs over fitting workers by counting what already waits on each.
    dispatch_queue: Mapped[str | None] = mapped_column(String(255), nullable=True)
    # What the job needs from a worker (JobResources, normalized; None = anything, as before 0005) and
    # its priority (higher is claimed first; FIFO within a priority).
    resources: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    # The registration of base_model the job trains on (base_models.revision_of: source@commit; None before 0013):
    # its fine-tuned model is refused on other weights registered under that name later.
    base_revision: Mapped[str | None] = mapped_column(String(BASE_REVISION_LENGTH), nullable=True)
    # Settings "auto" decided from the first bytes of a training file too large to validate during upload
    # (app/services/jobs.py: settings_from_count); validating_files decides them again from the whole file's count.
    decided_by_partial_count: Mapped[list[str] | None] = mapped_column(JSONType, nullable=True)

    idempotency_key: Mapped[str | None] = mapped_column(String(255), nullable=True)
    request_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


class JobEvent(KeyedMixin, Base):
    """A job event (message or metrics); pk orders them."""

    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_pk_pk", "job_pk", "pk"),)

    id: Mapped[str] = mapped_column(String(64), unique=True)
    job_pk: Mapped[int] = mapped_column(BigIntKey, ForeignKey("fine_tuning_jobs.pk", ondelete="CASCADE"))
    created_at: Mapped[int] = mapped_column(Integer, default=now_seconds)
    level: Mapped[str] = mapped_column(String(8), default="info")
    type: Mapped[str] = mapped_column(String(16), default="message")
    message: Mapped[str] = mapped_column(String(2000))
    data: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    # A metrics event of a step an earlier attempt trained past its checkpoint, which a later attempt trained again
    # (app/services/attempts.py: train_again_after): kept, so cursors naming it still page and stream, but listed
    # no more, so a job has one metrics event a step.
    superseded: Mapped[bool] = mapped_column(default=False, server_default=false())


class JobCheckpoint(KeyedMixin, Base):
    """A registered, verified checkpoint: a resume starts only from one of these."""

    __tablename__ = "job_checkpoints"
    __table_args__ = (UniqueConstraint("job_pk", "step_number", name="uq_job_checkpoints_job_step"),)

    id: Mapped[str] = mapped_column(String(64), unique=True)
    job_pk: Mapped[int] = mapped_column(BigIntKey, ForeignKey("fine_tuning_jobs.pk", ondelete="CASCADE"))
    step_number: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSONType)
    attempt: Mapped[int] = mapped_column(Integer)
    # An archive of the checkpoint directory (with its manifest) in storage.
    blob_key: Mapped[str] = mapped_column(String(255))
    sha256: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int] = mapped_column(BigIntKey)
    created_at: Mapped[int] = mapped_column(Integer, default=now_seconds)


class JobArtifact(KeyedMixin, Base):
    """A downloadable output of a job, backed by a `fine-tune-results` file."""

    __tablename__ = "job_artifacts"
    __table_args__ = (UniqueConstraint("job_pk", "name", name="uq_job_artifacts_job_name"),)

    job_pk: Mapped[int] = mapped_column(BigIntKey, ForeignKey("fine_tuning_jobs.pk", ondelete="CASCADE"))
    file_pk: Mapped[int] = mapped_column(BigIntKey, ForeignKey("files.pk", ondelete="CASCADE"))
    # adapter | metrics | config | checkpoint | merged
    name: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[int] = mapped_column(Integer, default=now_seconds)
