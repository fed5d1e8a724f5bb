"""Wire models for fine-tuning jobs, events and checkpoints (OpenAI shapes plus our extensions)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, create_model, field_validator
from pydantic.fields import FieldInfo

from app.core.config import LABEL_PATTERN
from app.models.job import JobStatus
from app.schemas.common import ListPage, OmitsUnsetOptionals
from app.schemas.training import (
    HYPERPARAMETER_FIELDS,
    MAX_PROCESSES,
    AdapterConfig,
    DistributedStrategy,
    EvaluationConfig,
    TrainingConfig,
)


class _OpenAIHyperparameters(BaseModel):
    """OpenAI's three hyperparameters, each "auto" or a value."""

    model_config = ConfigDict(extra="forbid")

    n_epochs: Literal["auto"] | int = Field(default="auto")
    batch_size: Literal["auto"] | int = Field(default="auto")
    learning_rate_multiplier: Literal["auto"] | float = Field(default="auto")

    @field_validator("n_epochs")
    @classmethod
    def _epochs(cls, v: Literal["auto"] | int) -> Literal["auto"] | int:
        if v != "auto" and not 1 <= v <= 50:
            raise ValueError("n_epochs must be \"auto\" or between 1 and 50")
        return v

    @field_validator("batch_size")
    @classmethod
    def _batch(cls, v: Literal["auto"] | int) -> Literal["auto"] | int:
        if v != "auto" and not 1 <= v <= 256:
            raise ValueError("batch_size must be \"auto\" or between 1 and 256")
        return v

    @field_validator("learning_rate_multiplier")
    @classmethod
    def _multiplier(cls, v: Literal["auto"] | float) -> Literal["auto"] | float:
        if v != "auto" and not 0 < v <= 100:
            raise ValueError("learning_rate_multiplier must be \"auto\" or a number in (0, 100]")
        return v


def _left_out(name: str) -> tuple[Any, FieldInfo]:
    """TrainingConfig's field `name`, optional: left out (None), it takes TrainingConfig's default."""
    field = TrainingConfig.model_fields[name]
    return field.annotation | None, FieldInfo.merge_field_infos(field, default=None)  # type: ignore[operator]


# OpenAI's three plus every other TrainingConfig hyperparameter, with TrainingConfig's bounds: adding a setting to
# TrainingConfig adds it here.
if TYPE_CHECKING:
    class Hyperparameters(_OpenAIHyperparameters):
        """What mypy sees of the model built below: the three fields, and the others as Any."""

        def __getattr__(self, name: str) -> Any: ...
else:
    Hyperparameters = create_model(
        "Hyperparameters", __base__=_OpenAIHyperparameters, __module__=__name__,
        __doc__="OpenAI's three hyperparameters plus tuneforge's; anything left out takes its default.",
        **{name: _left_out(name) for name in HYPERPARAMETER_FIELDS if name not in _OpenAIHyperparameters.model_fields},
    )


class SupervisedMethod(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hyperparameters: Hyperparameters | None = None
    adapter: AdapterConfig | None = None
    # Our extension: the base-vs-tuned answer report after training (with a validation file; on by default).
    evaluation: EvaluationConfig | None = None


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["supervised", "dpo"] = "supervised"
    supervised: SupervisedMethod | None = None
    dpo: dict[str, Any] | None = None


class WandbIntegration(BaseModel):
    model_config = ConfigDict(extra="forbid")

    project: str = Field(min_length=1, max_length=128)
    name: str | None = Field(default=None, max_length=128)
    entity: str | None = Field(default=None, max_length=128)
    tags: list[str] | None = None


class Integration(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["wandb"]
    wandb: WandbIntegration


class JobResources(BaseModel):
    """What a job needs from a worker; a job that asks for nothing runs on any worker."""

    model_config = ConfigDict(extra="forbid")

    # GPUs on one worker host; the job trains with one process per GPU.
    gpus: int = Field(default=0, ge=0, le=MAX_PROCESSES)  # one process per GPU
    # Each of those GPUs has at least this much memory (GiB, as nvidia-smi reports it: an 80 GB card
    # shows about 79.6). Needs gpus >= 1.
    min_gpu_memory_gb: float | None = Field(default=None, gt=0, le=4096)
    # The worker must carry every one of these (TUNEFORGE_WORKER_LABELS), e.g. ["a100", "eu-west"].
    labels: list[Annotated[str, Field(pattern=LABEL_PATTERN.pattern)]] = Field(default_factory=list, max_length=16)
    # Training processes on that worker (data parallel): defaults to gpus, or 1 without GPUs (more
    # CPU processes only make sense for testing multi-process training).
    processes: int | None = Field(default=None, ge=1, le=MAX_PROCESSES)
    distributed: DistributedStrategy = "ddp"

    @property
    def requires_worker(self) -> bool:
        """True when only some workers can run the job (it is routed, not sent to the shared queue)."""
        return self.gpus > 0 or self.min_gpu_memory_gb is not None or bool(self.labels)


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=255)
    training_file: str = Field(min_length=1, max_length=64)
    validation_file: str | None = Field(default=None, max_length=64)
    # Part of the fine-tuned model's id, so kept to characters that are safe everywhere.
    suffix: str | None = Field(default=None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int | None = Field(default=None, ge=0, le=2147483647)
    metadata: dict[str, str] | None = None
    integrations: list[Integration] | None = None
    method: Method | None = None
    hyperparameters: Hyperparameters | None = None
    # Extension: also export merged full weights (base + adapter) as an artifact.
    merge: StrictBool = False
    # Extensions: what the job needs from a worker, and its place in the queue (higher runs first).
    resources: JobResources = Field(default_factory=JobResources)
    priority: int = Field(default=0, ge=-100, le=100)

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is None:
            return v
        if len(v) > 16:
            raise ValueError("at most 16 metadata pairs")
        for key, value in v.items():
            if len(key) > 64 or len(value) > 512:
                raise ValueError("metadata keys are at most 64 characters, values at most 512")
        return v


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class JobPublic(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    finished_at: int | None
    model: str
    fine_tuned_model: str | None
    organization_id: str
    status: JobStatus
    error: JobError | None
    hyperparameters: dict[str, Any]
    method: dict[str, Any]
    training_file: str
    validation_file: str | None
    result_files: list[str]
    trained_tokens: int | None
    seed: int
    suffix: str | None
    metadata: dict[str, str] | None
    integrations: list[dict[str, Any]] | None
    estimated_finish: int | None
    # Extensions.
    merge: bool
    # A pause answers at once; a running job keeps training until its next checkpoint is saved, then pauses.
    pause_requested: bool
    progress: dict[str, Any]
    attempt: int
    # Attempts that died since the job's last new checkpoint; the job fails when it reaches max_attempts.
    crashes: int
    resources: JobResources
    priority: int
    # The base-vs-tuned answer report's headline (eval_report.json in result_files has it all), once succeeded.
    evaluation: dict[str, Any] | None = None


class JobList(ListPage[JobPublic]):
    pass


class JobEventPublic(OmitsUnsetOptionals):
    OMITTED_WHEN_NONE = ("data",)

    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: str
    message: str
    type: str
    data: dict[str, Any] | None = None


class JobEventList(ListPage[JobEventPublic]):
    pass


class CheckpointPublic(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    step_number: int
    metrics: dict[str, Any]


class CheckpointList(ListPage[CheckpointPublic]):
    first_id: str | None = None
    last_id: str | None = None


class ArtifactPublic(BaseModel):
    object: Literal["fine_tuning.job.artifact"] = "fine_tuning.job.artifact"
    name: str
    kind: str
    bytes: int
    sha256: str
    created_at: int
    # The `fine-tune-results` file with the same bytes; checkpoints have none.
    file_id: str | None


class ArtifactList(ListPage[ArtifactPublic]):
    pass


class MemoryEstimatePublic(BaseModel):
    """Predicted peak accelerator memory of one training process (GiB), by component."""

    total_gib: float
    weights_gib: float
    gradients_gib: float
    optimizer_gib: float
    activations_gib: float
    logits_gib: float
    runtime_gib: float
    trainable_parameters: int
    precision: str


class WorkerFitPublic(BaseModel):
    name: str
    gpus: int
    gpu_memory_gb: float | None
    # null: the worker states no GPU memory (a CPU worker).
    fits: bool | None


class JobEstimate(BaseModel):
    """What a job would cost, without training: its data, steps, memory and the live workers it fits."""

    object: Literal["fine_tuning.job.estimate"] = "fine_tuning.job.estimate"
    model: str
    base_model: str
    method: str
    examples: int
    # Known when the training file was tokenised for the base model (upload with ?model=, or an earlier job).
    tokens: int | None
    n_epochs: int
    batch_size: int
    batches_per_epoch: int | None
    steps: int | None
    # null when the model's shape is unknown.
    memory: MemoryEstimatePublic | None
    workers: list[WorkerFitPublic]
