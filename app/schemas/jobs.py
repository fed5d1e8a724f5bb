"""Wire models for fine-tuning jobs, events and checkpoints (OpenAI shapes plus our extensions)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

import annotated_types
from pydantic import (
    BaseModel,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    TypeAdapter,
    ValidationError,
    create_model,
    field_validator,
)
from pydantic.fields import FieldInfo

from app.core.config import LABEL_PATTERN
from app.models.job import JobStatus
from app.schemas.common import REQUEST_MODEL, ListPage, OmitsUnsetOptionals
from app.schemas.training import (
    DPO_HYPERPARAMETER_FIELDS,
    HYPERPARAMETER_FIELDS,
    MAX_PROCESSES,
    AdapterConfig,
    DistributedStrategy,
    EvaluationConfig,
    PreferenceConfig,
    TrainingConfig,
    TrainingMethod,
)

# OpenAI's hyperparameters of each method: "auto", or a value within the bounds of the config field it resolves to.
OPENAI_HYPERPARAMETERS = ("n_epochs", "batch_size", "learning_rate_multiplier")
OPENAI_DPO_HYPERPARAMETERS = (*OPENAI_HYPERPARAMETERS, "beta")
# Bounds on the wire only, for a value given alone: a stored config may hold a larger multiplier (an absolute
# learning_rate over 100x the method's base rate), and a request may carry it beside that learning_rate (a job's echo
# sent back). app/services/jobs.py applies the limit where it resolves the rate.
MAX_WIRE_MULTIPLIER = 100
WIRE_ONLY_BOUNDS: dict[str, tuple[Any, ...]] = {"learning_rate_multiplier": (annotated_types.Le(MAX_WIRE_MULTIPLIER),)}


def _config_field(name: str) -> FieldInfo:
    """The resolved config field a wire hyperparameter sets: PreferenceConfig's (a DPO loss) or TrainingConfig's."""
    return (PreferenceConfig if name in PreferenceConfig.model_fields else TrainingConfig).model_fields[name]


def _auto_or_within(name: str) -> tuple[tuple[Any, Any], Any]:
    """An OpenAI hyperparameter: its definition ("auto", or a value within its config field's bounds) and the
    validator that says so in one message."""
    field = _config_field(name)
    bounds = [*field.metadata, *WIRE_ONLY_BOUNDS.get(name, ())]
    bounded: Any = Annotated[field.annotation, *field.metadata]  # type: ignore[name-defined]
    adapter: TypeAdapter[Any] = TypeAdapter(bounded)
    low = next((f"[{b.ge}" if isinstance(b, annotated_types.Ge) else f"({b.gt}" for b in bounds
                if isinstance(b, annotated_types.Ge | annotated_types.Gt)), "(-inf")
    high = next((f"{b.le}]" if isinstance(b, annotated_types.Le) else f"{b.lt})" for b in bounds
                 if isinstance(b, annotated_types.Le | annotated_types.Lt)), "inf)")
    allowed = f"\"auto\" or {'an integer' if field.annotation is int else 'a number'} in {low}, {high}"
    if name in WIRE_ONLY_BOUNDS:
        allowed += " (more only beside a learning_rate that means it, as a job's echo carries it)"

    def within(value: Any) -> bool:
        try:  # strict: true is no number (Python would read it as 1)
            adapter.validate_python(value)
        except ValidationError:
            return False
        return True

    def check(cls: type[BaseModel], value: Any) -> Any:
        if value != "auto" and not within(value):
            raise ValueError(f"{name} must be {allowed}")
        return value

    definition = (Literal["auto"] | bounded, Field(default="auto", description=f"OpenAI's: {allowed}."))
    return definition, field_validator(name, mode="before")(classmethod(check))


def _left_out(name: str) -> tuple[Any, FieldInfo]:
    """The config field `name`, optional: left out (None), it takes its resolved default."""
    field = _config_field(name)
    return field.annotation | None, FieldInfo.merge_field_infos(field, default=None)  # type: ignore[operator]


def _hyperparameters_model(model_name: str, doc: str, *, openai: tuple[str, ...], fields: tuple[str, ...]) -> Any:
    """The wire model of a method's hyperparameters: OpenAI's first, then every other of `fields`, each derived from
    the config field it sets (adding a setting to TrainingConfig or PreferenceConfig adds it here)."""
    definitions: dict[str, Any] = {}
    validators: dict[str, Any] = {}
    for name in openai:
        definitions[name], validators[f"_{name}"] = _auto_or_within(name)
    definitions.update((name, _left_out(name)) for name in fields if name not in openai)
    return create_model(model_name, __config__=REQUEST_MODEL, __module__=__name__, __doc__=doc,
                        __validators__=validators, **definitions)


if TYPE_CHECKING:
    class Hyperparameters(BaseModel):
        """What mypy sees of the model built below: OpenAI's fields, and the others as Any."""

        n_epochs: Literal["auto"] | int = "auto"
        batch_size: Literal["auto"] | int = "auto"
        learning_rate_multiplier: Literal["auto"] | float = "auto"

        def __getattr__(self, name: str) -> Any: ...

    class DpoHyperparameters(Hyperparameters):
        beta: Literal["auto"] | float = "auto"
else:
    Hyperparameters = _hyperparameters_model(
        "Hyperparameters", "OpenAI's three hyperparameters plus tuneforge's; anything left out takes its default.",
        openai=OPENAI_HYPERPARAMETERS, fields=HYPERPARAMETER_FIELDS)
    DpoHyperparameters = _hyperparameters_model(
        "DpoHyperparameters", "OpenAI's four DPO hyperparameters plus tuneforge's, the preference loss's among them "
        "(beta \"auto\" depends on loss_type); anything left out takes its default.",
        openai=OPENAI_DPO_HYPERPARAMETERS, fields=DPO_HYPERPARAMETER_FIELDS)


class _MethodBlock(BaseModel):
    """The extensions a method block carries beside its hyperparameters."""

    model_config = REQUEST_MODEL

    adapter: AdapterConfig | None = None
    # Our extension: the base-vs-tuned answer report after training (with a validation file; on by default).
    evaluation: EvaluationConfig | None = None


class SupervisedMethod(_MethodBlock):
    hyperparameters: Hyperparameters | None = None


class DpoMethod(_MethodBlock):
    hyperparameters: DpoHyperparameters | None = None


class Method(BaseModel):
    model_config = REQUEST_MODEL

    type: TrainingMethod = "supervised"
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None


class WandbIntegration(BaseModel):
    model_config = REQUEST_MODEL

    project: str = Field(min_length=1, max_length=128)
    name: str | None = Field(default=None, max_length=128)
    entity: str | None = Field(default=None, max_length=128)
    tags: list[str] | None = None


class Integration(BaseModel):
    model_config = REQUEST_MODEL

    type: Literal["wandb"]
    wandb: WandbIntegration


class JobResources(BaseModel):
    """What a job needs from a worker; a job that asks for nothing runs on any worker."""

    model_config = REQUEST_MODEL

    # GPUs on one worker host; the job trains with one process per GPU.
    gpus: StrictInt = Field(default=0, ge=0, le=MAX_PROCESSES)  # one process per GPU
    # Each of those GPUs has at least this much memory (GiB, as nvidia-smi reports it: an 80 GB card
    # shows about 79.6). Needs gpus >= 1.
    min_gpu_memory_gb: StrictFloat | None = Field(default=None, gt=0, le=4096)
    # The worker must carry every one of these (TUNEFORGE_WORKER_LABELS), e.g. ["a100", "eu-west"].
    labels: list[Annotated[str, Field(pattern=LABEL_PATTERN.pattern)]] = Field(default_factory=list, max_length=16)
    # Training processes on that worker (data parallel): defaults to gpus, or 1 without GPUs (more
    # CPU processes only make sense for testing multi-process training).
    processes: StrictInt | None = Field(default=None, ge=1, le=MAX_PROCESSES)
    distributed: DistributedStrategy = "ddp"

    @property
    def requires_worker(self) -> bool:
        """True when only some workers can run the job (it is routed, not sent to the shared queue)."""
        return self.gpus > 0 or self.min_gpu_memory_gb is not None or bool(self.labels)


class JobCreate(BaseModel):
    model_config = REQUEST_MODEL

    model: str = Field(min_length=1, max_length=255)
    training_file: str = Field(min_length=1, max_length=64)
    validation_file: str | None = Field(default=None, max_length=64)
    # Part of the fine-tuned model's id, so kept to characters that are safe everywhere.
    suffix: str | None = Field(default=None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    seed: StrictInt | None = Field(default=None, ge=0, le=2147483647)
    metadata: dict[str, str] | None = None
    integrations: list[Integration] | None = None
    method: Method | None = None
    hyperparameters: Hyperparameters | None = None
    # Extension: also export merged full weights (base + adapter) as an artifact.
    merge: StrictBool = False
    # Extensions: what the job needs from a worker, and its place in the queue (higher runs first).
    resources: JobResources = Field(default_factory=JobResources)
    priority: StrictInt = Field(default=0, ge=-100, le=100)

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


class JobArtifactsDeleted(BaseModel):
    """A finished job's outputs deleted; its record stays."""

    id: str
    object: Literal["fine_tuning.job.artifacts"] = "fine_tuning.job.artifacts"
    deleted: bool = True


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
