"""Fine-tuning jobs: creation (validation, "auto" resolution, idempotency), reads and state changes."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.db import hold_rows, move_row
from app.core.errors import Conflict, InvalidRequest, NotFound
from app.core.storage import get_storage
from app.models import (
    File,
    FineTuningJob,
    JobArtifact,
    JobCheckpoint,
    JobEvent,
    JobStatus,
    Project,
    RegisteredModel,
)
from app.models.base import new_id, now_seconds
from app.models.job import WAITING_STATUSES, sources_of
from app.schemas.jobs import (
    MAX_WIRE_MULTIPLIER,
    CheckpointPublic,
    DpoHyperparameters,
    DpoMethod,
    Hyperparameters,
    JobCreate,
    JobError,
    JobEventPublic,
    JobPublic,
    JobResources,
    Method,
    SupervisedMethod,
)
from app.schemas.training import (
    DPO_HYPERPARAMETER_FIELDS,
    EVAL_COST_SHARE,
    HYPERPARAMETER_FIELDS,
    MIN_EVAL_EXAMPLES,
    AdapterConfig,
    ConfigConflict,
    PreferenceConfig,
    TrainingConfig,
    TrainingMethod,
)
from app.services.artifacts import MAX_CHECKPOINT_STEP, checkpoint_model_id, hold_fine_tuned_model
from app.services.paging import page_after
from app.services.quotas import check_job_quota
from app.services.tokens import (
    TemplateRefusal,
    countable_in_request,
    file_deleted_meanwhile,
    known_token_stats,
    prompt_room_problem,
    record_token_stats,
)
from app.services.webhooks import enqueue_job_event
from app.services.workers import needs_of

# Starting learning rates that work for most models; learning_rate_multiplier scales them. DPO nudges a model that
# already answers well, and its loss rewards moving away from the reference: its rates are the alignment recipes'
# (Zephyr's DPO: 5e-7 for a full fine-tune, 5e-6 with an adapter), far below supervised ones.
BASE_LEARNING_RATE: dict[str, dict[str, float]] = {
    "supervised": {"lora": 2e-4, "dora": 2e-4, "qlora": 2e-4, "full": 2e-5},
    "dpo": {"lora": 5e-6, "dora": 5e-6, "qlora": 5e-6, "full": 5e-7},
}
# A DPO job's adapter dropout when it gives none (resolve_training_config says why).
DPO_ADAPTER_DROPOUT = 0.0
# OpenAI's heuristic for n_epochs "auto": see at least this many examples, at most that many.
MIN_TARGET_EXAMPLES, MAX_TARGET_EXAMPLES, MAX_AUTO_EPOCHS = 100, 25_000, 25
# With a validation file and neither n_evals nor eval_steps given, a job evaluates up to this many times over its
# run (a validation curve, and valid_loss on the checkpoints evaluated), fewer when a tenth of the examples it
# trains on cannot give each evaluation the recipe's minimum sample (worker/training/recipe.py), but twice at least.
DEFAULT_N_EVALS, MIN_DEFAULT_N_EVALS = 10, 2
# The intake formats (app/services/datasets.py) each training method learns from.
METHOD_FORMATS: dict[str, tuple[str, ...]] = {"supervised": ("chat", "prompt_completion", "text"),
                                              "dpo": ("preference",)}
FORMAT_NAMES = {"chat": "chat", "prompt_completion": "prompt/completion", "text": "text",
                "preference": "preference (DPO)"}
# The `code` of each 400 a job request can get: the request's shape (invalid_json ... invalid_value), then
# plan_job's checks in order; creation adds insufficient_memory. The OpenAPI document lists them.
REQUEST_ERROR_CODES = ("invalid_json", "missing_required_parameter", "unknown_parameter", "invalid_value",
                       "model_not_available", "invalid_file", "invalid_file_purpose", "too_few_examples",
                       "integration_not_configured", "prompt_too_long")


def add_event(session: Session, *, job: FineTuningJob, message: str, level: str = "info",
              type_: str = "message", data: dict[str, Any] | None = None) -> JobEvent:
    event = JobEvent(id=new_id("ftevent-"), job_pk=job.pk, level=level, type=type_, message=message[:2000],
                     data=data)
    session.add(event)
    return event


def hold_files(session: Session, *, project: Project, files: Sequence[tuple[str, File]]) -> None:
    """Hold the rows of the files (param, row) a job or evaluation reads, just before inserting it, in that insert's
    transaction (app/core/db.py). delete_file holds the row too before it looks for unfinished work on the
    file, so either the insert commits first and the delete sees it (409 file_in_use), or the delete commits first
    and this finds the file gone: 400 invalid_file, never a job on a deleted file."""
    for param, file in sorted(files, key=lambda pair: pair[1].pk):
        if not hold_rows(session, File.bytes, File.project_pk == project.pk, File.pk == file.pk):
            raise file_deleted_meanwhile(file.id, param=param)


def dataset_file(session: Session, *, project: Project, file_id: str, param: str, settings: Settings,
                 method: TrainingMethod = "supervised") -> File:
    """The project's file `file_id`, usable as `param` of a job of `method` (or of an answer report: supervised
    examples); InvalidRequest naming `param` otherwise."""
    row = session.scalar(select(File).where(File.id == file_id, File.project_pk == project.pk))
    if row is None:
        raise InvalidRequest(f"Invalid file: no file with id {file_id!r} exists in this project.", param=param,
                             code="invalid_file")
    if row.purpose != "fine-tune":
        raise InvalidRequest(f"File {file_id} has purpose {row.purpose!r}; fine-tuning needs a file uploaded "
                             "with purpose 'fine-tune'.", param=param, code="invalid_file_purpose")
    if row.status == "error":
        raise InvalidRequest(f"File {file_id} failed validation: {row.status_details}", param=param,
                             code="invalid_file")
    found = (row.report or {}).get("format")
    if found is not None and found not in METHOD_FORMATS[method]:
        raise InvalidRequest(_wrong_format(file_id, found=found, method=method), param=param, code="invalid_file")
    return row


# The formats the trainer renders with the model's chat template (worker/training/data.py, preference.py).
TEMPLATE_FORMATS = ("chat", "preference")


def _check_chat_template(model: RegisteredModel | None, *, files: list[File]) -> None:
    """400 invalid_file when a file's examples are rendered with a chat template and the model has none (its
    registration says so): the worker could not tokenise them."""
    if model is None or (model.info or {}).get("has_chat_template") is not False:
        return
    for param, file in zip(("training_file", "validation_file"), files, strict=False):
        found = (file.report or {}).get("format")
        if found in TEMPLATE_FORMATS:
            raise InvalidRequest(f"Model {model.name!r} has no chat template, and {param} {file.id} holds "
                                 f"{FORMAT_NAMES[found]} examples, which training renders with one. Use "
                                 "prompt/completion or text examples, or a model that has a chat template.",
                                 param=param, code="invalid_file")


def _fit_positions(model: RegisteredModel | None, *, config: TrainingConfig, given: int | None) -> TrainingConfig:
    """A model with learned positions (info["position_limit"]) trains rows of at most that many tokens: the default
    max_seq_length is cut to it, and a larger one asked for is refused (the worker would fail indexing past them)."""
    limit = (model.info or {}).get("position_limit") if model is not None else None
    if limit is None or config.max_seq_length <= limit:
        return config
    if given is None:
        return config.model_copy(update={"max_seq_length": limit})
    assert model is not None
    raise InvalidRequest(f"max_seq_length {given} is more than the {limit} positions {model.name!r} has (its "
                         f"position embeddings are learned, one per position): give at most {limit}.",
                         param=wire_param("max_seq_length", method=config.method), code="invalid_value")


def _check_target_modules(model: RegisteredModel | None, *, config: TrainingConfig) -> None:
    """400 when target_modules names a module the base model does not have (a typo PEFT would only report in the
    worker, after the weights were fetched): each name's last part must be one of the model's modules with
    weights, read from its safetensors headers at registration (info["modules"]: None where they are not known,
    and nothing is checked)."""
    targets = config.adapter.target_modules
    if model is None or config.adapter.type == "full" or not isinstance(targets, list):
        return
    modules = (model.info or {}).get("modules")
    if not modules:
        return
    unknown = [name for name in targets if name.rpartition(".")[2] not in modules]
    if unknown:
        raise InvalidRequest(f"target_modules names {', '.join(map(repr, unknown))}, which model {model.name!r} does "
                             f"not have; its modules with weights are {', '.join(modules)}. Name some of those, or "
                             "use \"all-linear\".", param=wire_param("adapter.target_modules", method=config.method),
                             code="invalid_value")


def _wrong_format(file_id: str, *, found: str, method: TrainingMethod) -> str:
    holds = f"File {file_id} holds {FORMAT_NAMES.get(found, found)} examples (detected format {found!r})"
    if method == "dpo":
        return (f"{holds}; DPO trains on preference pairs, one a line: {{\"input\": {{\"messages\": [...]}}, "
                "\"preferred_output\": [assistant message], \"non_preferred_output\": [assistant message]}. Use a "
                "preference file, or train on this one with method.type \"supervised\".")
    return (f"{holds}; supervised fine-tuning needs chat, prompt/completion or text examples (a preference file "
            "trains a job with method.type \"dpo\").")


def too_few_examples(file: File, *, settings: Settings, train_on_inputs: bool) -> str | None:
    """Why a training file cannot train a job for want of examples (the rule job creation and the
    validating_files phase both apply), or None. Without train_on_inputs, a chat example whose every assistant
    message has weight 0 has nothing to learn (the trainer drops it) and does not count."""
    report = file.report or {}
    examples = report.get("examples", 0)
    untrained = 0 if train_on_inputs else report.get("examples_without_trained_answer", 0)
    if examples - untrained < settings.min_training_examples:
        reason = (f", {untrained} of them with no assistant message of weight 1 (nothing to learn without "
                  "train_on_inputs)") if untrained else ""
        return (f"File {file.id} has {examples} example(s){reason}; training needs at least "
                f"{settings.min_training_examples}.")
    return None


def resolve_resources(requested: JobResources) -> JobResources:
    """The job's resources with processes decided and labels de-duplicated; InvalidRequest if inconsistent."""
    if requested.min_gpu_memory_gb is not None and requested.gpus == 0:
        raise InvalidRequest("resources.min_gpu_memory_gb applies to the GPUs a job asks for; set resources.gpus "
                             "to at least 1, or remove min_gpu_memory_gb.", param="resources.min_gpu_memory_gb",
                             code="invalid_value")
    processes = requested.processes or max(requested.gpus, 1)
    if requested.gpus > 0 and processes != requested.gpus:
        raise InvalidRequest(f"resources.processes must equal resources.gpus ({requested.gpus}): training runs one "
                             f"process per GPU. Ask for {processes} GPU(s) or leave processes out.",
                             param="resources.processes", code="invalid_value")
    return requested.model_copy(update={"processes": processes, "labels": list(dict.fromkeys(requested.labels))})


def auto_n_epochs(n_examples: int) -> int:
    """n_epochs "auto": 3, or as many as it takes to see MIN_TARGET_EXAMPLES, or as few as keep within
    MAX_TARGET_EXAMPLES."""
    if n_examples * 3 < MIN_TARGET_EXAMPLES:
        return min(MAX_AUTO_EPOCHS, math.ceil(MIN_TARGET_EXAMPLES / max(n_examples, 1)))
    if n_examples * 3 > MAX_TARGET_EXAMPLES:
        return max(1, MAX_TARGET_EXAMPLES // n_examples)
    return 3


def default_n_evals(*, n_examples: int, n_epochs: int) -> int:
    """How many times a job with a validation file evaluates when it does not say."""
    affordable = math.floor(EVAL_COST_SHARE * n_examples * n_epochs / MIN_EVAL_EXAMPLES)
    return max(MIN_DEFAULT_N_EVALS, min(DEFAULT_N_EVALS, affordable))


@dataclass(frozen=True)
class MethodRequest:
    """What a request asks of its method: which one, its block, its hyperparameters and the parameter naming them."""

    method: TrainingMethod
    block: SupervisedMethod | DpoMethod
    hyperparameters: Hyperparameters | DpoHyperparameters
    prefix: str


def method_request(request: JobCreate) -> MethodRequest:
    """The request's method settings; InvalidRequest when its blocks contradict method.type (a setting that would
    be ignored)."""
    method = request.method or Method()
    other = "dpo" if method.type == "supervised" else "supervised"
    if getattr(method, other) is not None:
        raise InvalidRequest(f"method.{other} configures a {other} job and method.type is {method.type!r}: set "
                             f"method.type to {other!r}, or move these settings to method.{method.type}.",
                             param=f"method.{other}", code="invalid_value")
    top = request.hyperparameters
    if method.type == "supervised":
        supervised = method.supervised or SupervisedMethod()
        if supervised.hyperparameters is None:
            hyper = top or Hyperparameters()
            return MethodRequest(method="supervised", block=supervised, hyperparameters=hyper,
                                 prefix="hyperparameters")
        _same_as_method(top, supervised.hyperparameters, method="supervised")
        return MethodRequest(method="supervised", block=supervised, hyperparameters=supervised.hyperparameters,
                             prefix="method.supervised.hyperparameters")
    dpo = method.dpo or DpoMethod()
    if top is not None and dpo.hyperparameters is None:
        raise InvalidRequest("The deprecated top-level hyperparameters configure supervised jobs; give a DPO job's "
                             "under method.dpo.hyperparameters.", param="hyperparameters", code="invalid_value")
    dpo_hyper = dpo.hyperparameters or DpoHyperparameters()
    _same_as_method(top, dpo_hyper, method="dpo")
    return MethodRequest(method="dpo", block=dpo, hyperparameters=dpo_hyper, prefix="method.dpo.hyperparameters")


def _same_as_method(top: Hyperparameters | None, inner: Hyperparameters | DpoHyperparameters, *,
                    method: TrainingMethod) -> None:
    """The deprecated top-level hyperparameters beside the method's: each one given must repeat the method's value
    (an echoed job carries both), or it would be ignored."""
    for name in sorted(top.model_fields_set if top is not None else ()):
        if name not in type(inner).model_fields or getattr(top, name) != getattr(inner, name):
            raise InvalidRequest(f"hyperparameters.{name} differs from method.{method}.hyperparameters.{name}: the "
                                 f"top-level hyperparameters are deprecated; give a {method} job's under "
                                 f"method.{method}.hyperparameters only.", param=f"hyperparameters.{name}",
                                 code="invalid_value")


def settings_from_count(request: JobCreate) -> tuple[str, ...]:
    """The settings a request leaves to the training file's example count that decide_from_count decides: n_epochs
    "auto", and n_evals where a validation file is given with neither n_evals nor eval_steps. (batch_size "auto" is
    decided from the count too, once: it sets how many rows a forward pass holds, which creation's memory check
    was made for, so a later count leaves it as it is.)"""
    hyper = method_request(request).hyperparameters
    names: tuple[str, ...] = ("n_epochs",) if hyper.n_epochs == "auto" else ()
    if request.validation_file is not None and hyper.n_evals is None and hyper.eval_steps is None:
        names += ("n_evals",)
    return names


def decide_from_count(config: TrainingConfig, *, names: Sequence[str], n_examples: int) -> TrainingConfig:
    """`config` with the settings `names` (settings_from_count) decided again from `n_examples`: the whole file's
    count, where creation saw the first intake_sync_validation_bytes of it only."""
    n_epochs = auto_n_epochs(n_examples) if "n_epochs" in names else config.n_epochs
    update: dict[str, int] = {"n_epochs": n_epochs}
    if "n_evals" in names:
        update["n_evals"] = default_n_evals(n_examples=n_examples, n_epochs=n_epochs)
    return config.model_copy(update=update)


# The adapter settings a continued job trains with whatever it asks: its parent's, saved with the adapter it loads
# (worker/training/model.py's adapter_differences reads the same ones); DoRA is one of them. Its dropout is how it
# trains from here: the job's own where it gives one (the worker sets it on the loaded adapter), else the parent's.
CONTINUED_ADAPTER_FIELDS = ("r", "alpha", "target_modules", "use_rslora")


def continued_adapter(given: AdapterConfig | None, *, parent: AdapterConfig, model: str,
                      method: TrainingMethod) -> AdapterConfig:
    """The adapter of a job continuing from `model`, whose adapter is `parent`: the parent's settings, with the
    request's type (lora or qlora: how the base's weights are held) and quantization where it gives them; 400
    naming the field where the request asks for a setting the adapter it trains does not have."""
    given_fields = given.model_fields_set if given is not None else set()
    type_ = given.type if given is not None and "type" in given_fields else parent.type
    if type_ == "full" or (type_ == "dora") != (parent.type == "dora"):
        raise InvalidRequest(f"{model} is a {parent.type} adapter, and a job continuing from it trains that "
                             f"adapter: adapter.type {type_!r} cannot; leave it out, or use "
                             f"{'dora' if parent.type == 'dora' else 'lora or qlora'}.",
                             param=wire_param("adapter.type", method=method), code="invalid_value")
    for name in CONTINUED_ADAPTER_FIELDS:
        if given is not None and name in given_fields and getattr(given, name) != getattr(parent, name):
            raise InvalidRequest(f"{model}'s adapter has {name} {getattr(parent, name)!r}, and a job continuing "
                                 f"from it trains that adapter: leave adapter.{name} out (or give the same).",
                                 param=wire_param(f"adapter.{name}", method=method), code="invalid_value")
    quantization = given.quantization if given is not None and "quantization" in given_fields else \
        parent.quantization if parent.type == "qlora" == type_ else None
    dropout = given.dropout if given is not None and "dropout" in given_fields else parent.dropout
    return AdapterConfig(**{name: getattr(parent, name) for name in CONTINUED_ADAPTER_FIELDS}, type=type_,
                         quantization=quantization, dropout=dropout)


def resolve_training_config(request: JobCreate, *, n_examples: int,
                            continued: tuple[str, AdapterConfig] | None = None) -> TrainingConfig:
    """The complete TrainingConfig for a request: defaults filled and every "auto" decided. `continued`: the
    fine-tuned model a job continues from, and its adapter."""
    chosen = method_request(request)
    hyper = chosen.hyperparameters
    adapter = continued_adapter(chosen.block.adapter, parent=continued[1], model=continued[0], method=chosen.method) \
        if continued is not None else chosen.block.adapter or AdapterConfig()
    if chosen.method == "dpo" and adapter.type != "full" and \
            "dropout" not in (chosen.block.adapter.model_fields_set if chosen.block.adapter else set()):
        # A preference loss compares the policy's log-probabilities with the reference's, scored without dropout:
        # with it, the two differ before any update (TRL's DPOTrainer disables dropout by default too).
        adapter = adapter.model_copy(update={"dropout": DPO_ADAPTER_DROPOUT})

    n_epochs = auto_n_epochs(n_examples) if hyper.n_epochs == "auto" else hyper.n_epochs
    batch_size: int
    if hyper.batch_size == "auto":
        batch_size = max(1, min(32, n_examples // 64, n_examples)) if n_examples >= 256 else min(4, n_examples)
    else:
        batch_size = hyper.batch_size
    base_lr = BASE_LEARNING_RATE[chosen.method][adapter.type]
    if hyper.learning_rate is not None:
        learning_rate, multiplier = hyper.learning_rate, hyper.learning_rate / base_lr
        given = hyper.learning_rate_multiplier
        # an echoed job carries both, the multiplier derived from the rate: only a different one would be ignored
        if given != "auto" and not math.isclose(float(given), multiplier, rel_tol=1e-6):
            raise InvalidRequest(f"learning_rate {learning_rate:g} and learning_rate_multiplier {given:g} disagree "
                                 f"(this method's base rate is {base_lr:g}, so the rate means a multiplier of "
                                 f"{multiplier:g}): give one of them.",
                                 param=f"{chosen.prefix}.learning_rate_multiplier", code="invalid_value")
    else:
        given = hyper.learning_rate_multiplier
        if given != "auto" and given > MAX_WIRE_MULTIPLIER:
            raise InvalidRequest(f"learning_rate_multiplier {given:g} is over {MAX_WIRE_MULTIPLIER}; give a "
                                 "learning_rate instead for a rate that high.",
                                 param=f"{chosen.prefix}.learning_rate_multiplier", code="invalid_value")
        multiplier = 1.0 if hyper.learning_rate_multiplier == "auto" else float(hyper.learning_rate_multiplier)
        learning_rate = base_lr * multiplier
    preference_fields = set(PreferenceConfig.model_fields)
    extras = hyper.model_dump(exclude={"n_epochs", "batch_size", "learning_rate_multiplier", "learning_rate",
                                       *preference_fields}, exclude_none=True)
    if chosen.method == "dpo":
        # beta "auto" (left out) and simpo_gamma left out are decided by PreferenceConfig, per loss_type.
        extras["preference"] = {name: value for name, value in hyper.model_dump(include=preference_fields).items()
                                if value not in (None, "auto")}
    if "n_evals" in settings_from_count(request):
        extras["n_evals"] = default_n_evals(n_examples=n_examples, n_epochs=n_epochs)
    resources = resolve_resources(request.resources)
    if chosen.block.evaluation:
        extras["evaluation"] = chosen.block.evaluation
    resolved = {"method": chosen.method, "adapter": adapter, "n_epochs": n_epochs, "batch_size": batch_size,
                "learning_rate": learning_rate, "learning_rate_multiplier": round(multiplier, 6),
                "merge": request.merge, "seed": request.seed if request.seed is not None else 42,
                "processes": resources.processes or 1, "distributed": resources.distributed, **extras}
    try:
        return TrainingConfig.model_validate(resolved, context={"validation_file": request.validation_file is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        conflict = (first.get("ctx") or {}).get("error")
        loc = [str(p) for p in first["loc"]]
        # A conflict names its field within the model that found it (TrainingConfig, or a nested block).
        field = ".".join([*loc, conflict.field] if isinstance(conflict, ConfigConflict) else loc)
        param = wire_param(field, method=chosen.method, hyperparameters=chosen.prefix)
        raise InvalidRequest(f"Invalid value for '{param}': {first['msg'].removeprefix('Value error, ')}",
                             param=param, code="invalid_value") from None


def wire_param(field: str, *, method: TrainingMethod = "supervised", hyperparameters: str | None = None) -> str:
    """The request parameter that sets TrainingConfig's `field` for a job of `method` (hyperparameters under the
    given prefix, by default the method's block)."""
    name, _, rest = field.partition(".")
    prefix = hyperparameters or f"method.{method}.hyperparameters"
    if name == "preference":  # its fields sit flat among a DPO job's hyperparameters
        return f"{prefix}.{rest}" if rest else prefix
    if name in HYPERPARAMETER_FIELDS:
        return f"{prefix}.{field}"
    if name in ("adapter", "evaluation"):
        return f"method.{method}.{field}"
    if name in ("processes", "distributed"):
        return f"resources.{field}"
    if name == "method":
        return "method.type"
    return field  # seed, merge, validation_file: top-level request fields


def _request_hash(request: JobCreate) -> str:
    body = request.model_dump(mode="json")
    # Left at their defaults, the extensions added in 0005 stay out of the hash, so an Idempotency-Key
    # replayed across the upgrade still matches; given, they count like any other field.
    if request.priority == 0:
        body.pop("priority")
    if request.resources == JobResources():
        body.pop("resources")
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class JobPlan:
    """A request checked and resolved as creation would store it (the estimate answers from the same)."""

    base_model: str
    files: list[File]
    resources: JobResources
    config: TrainingConfig
    # Files of a DPO job too large to measure in a request: its validating_files phase applies the prompt-room rule.
    unmeasured: list[File]
    # The settings decided from a count of the training file's first bytes only (a file too large to validate
    # during upload): its validating_files phase decides them again from the whole file's (decide_from_count).
    decided_by_partial_count: tuple[str, ...] = ()
    # The base model's registration (base_models.revision_of), kept on the job.
    base_revision: str | None = None


def plan_job(session: Session, *, project: Project, request: JobCreate, settings: Settings) -> JobPlan:
    """Validate a job request and resolve its model, files, resources and training config; nothing written (but
    token statistics a DPO job measures, kept in its files' reports)."""
    from app.services import base_models

    method: TrainingMethod = request.method.type if request.method is not None else "supervised"
    base_model, parent_adapter = _base_model(session, project=project, model=request.model, settings=settings)
    training = dataset_file(session, project=project, file_id=request.training_file, param="training_file",
                            settings=settings, method=method)
    files = [training]
    if request.validation_file is not None:
        files.append(dataset_file(session, project=project, file_id=request.validation_file,
                                  param="validation_file", settings=settings, method=method))
        if request.validation_file == request.training_file:
            raise InvalidRequest("validation_file must differ from training_file; a model scored on its own "
                                 "training data says nothing about generalisation.", param="validation_file",
                                 code="invalid_file")
    registered = base_models.find(session, settings=settings, name=base_model)
    _check_chat_template(registered, files=files)
    if request.integrations and settings.wandb_mode == "online" and settings.wandb_api_key is None:
        raise InvalidRequest("The wandb integration needs a W&B API key on this service, and none is configured: the "
                             "operator sets TUNEFORGE_WANDB_API_KEY on the API and the workers (or "
                             "TUNEFORGE_WANDB_MODE=offline to keep runs on the worker hosts for `wandb sync`). "
                             "Remove integrations to train without W&B.", param="integrations",
                             code="integration_not_configured")
    _check_model_name_length(base_model=base_model, organization=project.name, suffix=request.suffix)
    resources = resolve_resources(request.resources)
    config = resolve_training_config(request, n_examples=(training.report or {}).get("examples", 0),
                                     continued=(request.model, parent_adapter) if parent_adapter else None)
    _check_target_modules(registered, config=config)
    # A file too large to validate during upload ("uploaded") is counted in full by the worker's validating_files
    # phase, which fails the job then if it is short; its report covers a prefix only.
    shortfall = too_few_examples(training, settings=settings, train_on_inputs=config.train_on_inputs) \
        if training.status != "uploaded" else None
    if shortfall:
        raise InvalidRequest(shortfall, param="training_file", code="too_few_examples")
    config = _fit_positions(registered, config=config, given=method_request(request).hyperparameters.max_seq_length)
    unmeasured = check_prompt_room(session, files=files, base_model=base_model, config=config, settings=settings) \
        if config.method == "dpo" else []
    partial = training.status == "uploaded"
    return JobPlan(base_model=base_model, files=files, resources=resources, config=config, unmeasured=unmeasured,
                   decided_by_partial_count=settings_from_count(request) if partial else (),
                   base_revision=base_models.revision_of(registered) if registered is not None else None)


def check_prompt_room(session: Session, *, files: list[File], base_model: str, config: TrainingConfig,
                      settings: Settings) -> list[File]:
    """A DPO job's prompt-room rule (app/services/tokens.py): 400 prompt_too_long when pairs' prompts leave no room
    for their answers at max_seq_length. A file is measured here, once per model and length (kept in its report),
    when it is small enough to tokenise in a request (intake_sync_validation_bytes, as at upload); the files
    returned are left to the job's validating_files phase (app/services/intake.py)."""
    unmeasured = []
    for param, file in zip(("training_file", "validation_file"), files, strict=False):
        stats = known_token_stats(file, model=base_model, max_seq_length=config.max_seq_length)
        if stats is None and countable_in_request(file, settings):
            try:
                stats = record_token_stats(session, storage=get_storage(), file=file, model=base_model,
                                           settings=settings, max_seq_length=config.max_seq_length, param=param)
            except TemplateRefusal as exc:
                raise InvalidRequest(exc.describe(param=param, model=base_model), param=param,
                                     code="invalid_file") from None
            if stats is None:  # the model has no tokenizer.json: nothing to count with, here or in a worker
                continue
        if stats is None:
            unmeasured.append(file)
            continue
        problem = prompt_room_problem(stats, file_id=file.id, param=param, max_seq_length=config.max_seq_length)
        if problem:
            raise InvalidRequest(problem, param=param, code="prompt_too_long")
    return unmeasured


def check_fits_some_worker(session: Session, *, plan: JobPlan, settings: Settings) -> None:
    """400 with the numbers when every live worker states its GPU memory and none has enough for the job."""
    from app.services import estimates

    memory = estimates.plan_memory(session, plan=plan, settings=settings)
    if memory is None:
        return
    fits = estimates.worker_fits(session, peak_gib=memory.total_gib, resources=plan.resources, settings=settings)
    if fits and not any(f.fits is None or f.fits for f in fits):
        best = max(f.gpu_memory_gb or 0 for f in fits)
        raise InvalidRequest(
            f"This job needs about {memory.total_gib:.1f} GiB of accelerator memory per process ({memory.summary()}), "
            f"and the largest GPU of a live worker has {best:g} GiB. Use QLoRA, gradient_checkpointing, a smaller "
            "batch_size or max_seq_length, more processes with distributed \"fsdp\", or add a larger worker "
            "(POST /v1/fine_tuning/jobs/estimate shows the numbers).", param="model", code="insufficient_memory")


def create_job(session: Session, *, project: Project, request: JobCreate, settings: Settings,
               idempotency_key: str | None = None) -> tuple[FineTuningJob, bool]:
    """Validate and store a new job; returns (job, created). The caller dispatches it after commit."""
    request_hash = _request_hash(request)
    if idempotency_key is not None:
        existing = _job_for_key(session, project=project, key=idempotency_key, request_hash=request_hash)
        if existing is not None:
            return existing, False
    plan = plan_job(session, project=project, request=request, settings=settings)
    base_model, files, resources, config = plan.base_model, plan.files, plan.resources, plan.config
    check_fits_some_worker(session, plan=plan, settings=settings)
    # Files validated in full at upload need no worker to check them: the job waits `queued`, as it is. Only a
    # file too large to validate during upload (or, for a DPO job, to measure in a request) sends the job through
    # validating_files (app/services/intake.py).
    validated = all(f.status == "processed" for f in files) and not plan.unmeasured
    # The binding checks, after the planning (which may commit) and committed with the insert below: what the job
    # reads is still there (and stays, as deleting it waits for this insert and then sees the job), and the quota.
    hold_files(session, project=project, files=list(zip(("training_file", "validation_file"), files, strict=False)))
    if request.model.startswith("ft:"):
        hold_fine_tuned_model(session, project=project, model_id=request.model, param="model")
    from app.services import base_models

    base_models.hold(session, name=base_model, revision=plan.base_revision)
    check_job_quota(session, project=project, settings=settings, idempotency_key=idempotency_key)
    job = FineTuningJob(
        id=new_id("ftjob-"), project_pk=project.pk, model=request.model, base_model=base_model,
        training_file=request.training_file, validation_file=request.validation_file,
        status=JobStatus.QUEUED if validated else JobStatus.VALIDATING_FILES, config=config.model_dump(mode="json"),
        suffix=request.suffix,
        seed=config.seed, metadata_=request.metadata,
        integrations={"items": [i.model_dump(mode="json") for i in request.integrations]}
        if request.integrations else None,
        idempotency_key=idempotency_key, request_hash=request_hash,
        resources=resources.model_dump(mode="json"), priority=request.priority,
        decided_by_partial_count=list(plan.decided_by_partial_count) or None, base_revision=plan.base_revision,
    )
    session.add(job)
    try:
        session.flush()
    except IntegrityError:
        # A concurrent request with the same Idempotency-Key won the insert.
        session.rollback()
        if idempotency_key is None:
            raise
        existing = _job_for_key(session, project=project, key=idempotency_key, request_hash=request_hash)
        if existing is None:
            raise
        return existing, False
    add_event(session, job=job, message=f"Created fine-tuning job: {job.id}")
    if validated:
        add_event(session, job=job, message="Files validated at upload; job queued.")
    session.commit()
    return job, True


def _base_model(session: Session, *, project: Project, model: str, settings: Settings
                ) -> tuple[str, AdapterConfig | None]:
    """The catalogue model whose weights a job starts from; a fine-tuned model (or one of its checkpoints)
    continues training from its adapter (returned too) on its own base."""
    from app.services import base_models
    from app.services.artifacts import find_fine_tuned_model

    if model.startswith("ft:"):
        try:
            parent, _step = find_fine_tuned_model(session, project=project, model_id=model)
        except NotFound:
            raise InvalidRequest(f"Fine-tuned model {model!r} does not exist in this project.", param="model",
                                 code="model_not_available") from None
        adapter = TrainingConfig.model_validate(parent.config).adapter
        if adapter.type == "full":
            raise InvalidRequest("Continued training from a full fine-tune is not supported; continue from an "
                                 "adapter (lora, qlora, dora) job.", param="model", code="model_not_available")
        base = base_models.find(session, settings=settings, name=parent.base_model)
        if base is None:
            raise InvalidRequest(f"The base model {parent.base_model!r} of {model!r} is no longer registered.",
                                 param="model", code="model_not_available")
        base_models.check_trained_on(parent, base, model=model)
        return parent.base_model, adapter
    return base_models.ready_for_jobs(session, settings=settings, name=model).name, None


def _job_for_key(session: Session, *, project: Project, key: str, request_hash: str) -> FineTuningJob | None:
    job = session.scalar(select(FineTuningJob).where(FineTuningJob.project_pk == project.pk,
                                                     FineTuningJob.idempotency_key == key))
    if job is not None and job.request_hash != request_hash:
        raise Conflict("This Idempotency-Key was already used with a different request body; use a new key "
                       "for a different job.", param="Idempotency-Key", code="idempotency_key_reused")
    return job


def get_job(session: Session, *, project: Project, job_id: str) -> FineTuningJob:
    job = session.scalar(select(FineTuningJob).where(FineTuningJob.id == job_id,
                                                     FineTuningJob.project_pk == project.pk))
    if job is None:
        raise NotFound(f"No such fine-tuning job: {job_id}", param="fine_tuning_job_id")
    return job


def list_jobs(session: Session, *, project: Project, after: str | None, limit: int,
              metadata: dict[str, str]) -> tuple[list[FineTuningJob], bool]:
    query = select(FineTuningJob).where(FineTuningJob.project_pk == project.pk)
    for key, value in metadata.items():
        query = query.where(FineTuningJob.metadata_[key].as_string() == value)
    return page_after(session, query, FineTuningJob, project_pk=project.pk, after=after, limit=limit)


def move_job(session: Session, job: FineTuningJob, *, sources: Sequence[str], **values: Any) -> bool:
    """One UPDATE of the job's row that applies only while its status is one of `sources` (TRANSITIONS' rule: a
    worker finishing, handing off or claiming the job at the same moment cannot be overwritten); the row is read
    again either way. False when the job had moved on: nothing was written."""
    return move_row(session, job, FineTuningJob.status.in_(sources), **values)


def cancel_job(session: Session, *, project: Project, job_id: str) -> FineTuningJob:
    """Cancel at once; a running attempt sees the status change and stops (the supervisor makes sure)."""
    job = get_job(session, project=project, job_id=job_id)
    if not move_job(session, job, sources=sources_of(JobStatus.CANCELLED), status=JobStatus.CANCELLED,
                 finished_at=now_seconds(), requested_action=None, lease_owner=None, lease_expires_at=None):
        raise InvalidRequest(f"Job {job_id} has already {job.status} and cannot be cancelled.",
                             param="fine_tuning_job_id", code="job_not_cancellable")
    add_event(session, job=job, message="Job cancelled by request.")
    enqueue_job_event(session, job=job)
    session.commit()
    return job


def pause_job(session: Session, *, project: Project, job_id: str) -> FineTuningJob:
    """Queued jobs pause at once; a running job checkpoints first, then its attempt marks it paused. Each is one
    guarded write: when a worker moves the job between the read and the write (claims it, hands it back), the
    pause is decided again on the status it left."""
    job = get_job(session, project=project, job_id=job_id)
    while True:
        if job.status in WAITING_STATUSES:
            if move_job(session, job, sources=WAITING_STATUSES, status=JobStatus.PAUSED):
                add_event(session, job=job, message="Job paused before it started.")
                break
        elif job.status == JobStatus.RUNNING:
            if move_job(session, job, sources=(JobStatus.RUNNING,), requested_action="pause"):
                add_event(session, job=job, message="Pause requested: the job will checkpoint and stop.")
                break
        elif job.status == JobStatus.PAUSED:
            break
        else:
            raise InvalidRequest(f"Job {job_id} has {job.status} and cannot be paused.", param="fine_tuning_job_id",
                                 code="job_not_pausable")
    session.commit()
    return job


def resume_job(session: Session, *, project: Project, job_id: str, settings: Settings) -> FineTuningJob:
    """A paused job goes back to the queue and continues from its last checkpoint, taking a slot of the project's
    active-job quota (429 when it is full: a paused job holds none). One that never ran goes back through
    validating_files instead: it may have been paused there, and the intake's checks (app/services/intake.py) run
    again, at once for files already read whole."""
    job = get_job(session, project=project, job_id=job_id)
    if job.status == JobStatus.PAUSED:
        check_job_quota(session, project=project, settings=settings)
    target = JobStatus.VALIDATING_FILES if job.attempt == 0 else JobStatus.QUEUED
    # Guarded by `paused`: of two resumes at once (or a resume and a cancel), the second finds the status the
    # first left, on SQLite too, where a SELECT ... FOR UPDATE locks nothing.
    if job.status != JobStatus.PAUSED or not move_job(session, job, sources=(JobStatus.PAUSED,), status=target,
                                                   requested_action=None, dispatched_at=None):
        raise InvalidRequest(f"Job {job_id} is {job.status}, not paused; only paused jobs resume.",
                             param="fine_tuning_job_id", code="job_not_paused")
    if target == JobStatus.VALIDATING_FILES:
        add_event(session, job=job, message="Job resumed: its files are checked, then it is queued.")
    else:
        add_event(session, job=job, message="Job resumed: queued to continue from its last checkpoint.")
    session.commit()
    return job


def list_all_jobs(session: Session, *, project_pk: int | None, after: str | None, limit: int
                  ) -> tuple[list[FineTuningJob], bool]:
    """Every project's jobs (or one project's), newest first: the admin view."""
    query = select(FineTuningJob)
    if project_pk is not None:
        query = query.where(FineTuningJob.project_pk == project_pk)
    return page_after(session, query, FineTuningJob, project_pk=None, after=after, limit=limit)


def list_events(session: Session, *, job: FineTuningJob, after: str | None, limit: int
                ) -> tuple[list[JobEvent], bool]:
    # Superseded metrics are not listed; a cursor naming one still finds its place (the scope has them).
    return page_after(session, select(JobEvent).where(JobEvent.job_pk == job.pk, JobEvent.superseded.is_(False)),
                      JobEvent, project_pk=None, scope=JobEvent.job_pk == job.pk, noun="event of this job",
                      after=after, limit=limit)


def list_checkpoints(session: Session, *, job: FineTuningJob, after: str | None, limit: int
                     ) -> tuple[list[JobCheckpoint], bool]:
    return page_after(session, select(JobCheckpoint).where(JobCheckpoint.job_pk == job.pk), JobCheckpoint,
                      project_pk=None, scope=JobCheckpoint.job_pk == job.pk, noun="checkpoint of this job", after=after,
                      limit=limit)


def fine_tuned_model_name(job: FineTuningJob, *, organization: str) -> str:
    return _model_name(base_model=job.base_model, organization=organization, suffix=job.suffix, job_id=job.id)


def _model_name(*, base_model: str, organization: str, suffix: str | None, job_id: str) -> str:
    return f"ft:{base_model}:{organization}:{suffix or ''}:{job_id.removeprefix('ftjob-')[-8:]}"


def _check_model_name_length(*, base_model: str, organization: str, suffix: str | None) -> None:
    """400 when the id the job's model would get is too long for its checkpoints' ids (the model's, then
    ":ckpt-step-N") to fit a model column (a job's `model` names one to continue from): otherwise the job trains, then
    fails storing its id, or its checkpoints cannot be named."""
    column: int = FineTuningJob.__table__.c.model.type.length  # type: ignore[attr-defined]
    longest = column - len(checkpoint_model_id("", MAX_CHECKPOINT_STEP))
    length = len(_model_name(base_model=base_model, organization=organization, suffix=suffix,
                             job_id="ftjob-" + "0" * 8))
    if length > longest:
        raise InvalidRequest(f"The fine-tuned model's id (ft:<model>:<organization>:<suffix>:<8 characters>) would be "
                             f"{length} characters, over the limit of {longest} (its checkpoints' ids add "
                             "\":ckpt-step-N\"): use a shorter suffix or a base model with a shorter name.",
                             param="suffix" if suffix else "model", code="invalid_value")


def result_files_of(session: Session, jobs: list[FineTuningJob]) -> dict[int, list[str]]:
    """Each job's result file ids, in one query for a page of jobs. Only a succeeded job has any (they
    are attached in the transaction that marks it succeeded), so the others cost nothing."""
    found: dict[int, list[str]] = {job.pk: [] for job in jobs}
    succeeded = [job.pk for job in jobs if job.status == JobStatus.SUCCEEDED]
    if succeeded:
        rows = session.execute(select(JobArtifact.job_pk, File.id).join(File, JobArtifact.file_pk == File.pk)
                               .where(JobArtifact.job_pk.in_(succeeded)).order_by(JobArtifact.pk))
        for job_pk, file_id in rows:
            found[job_pk].append(file_id)
    return found


def jobs_public(session: Session, jobs: list[FineTuningJob], *, projects: dict[int, Project]) -> list[JobPublic]:
    """A page of jobs for the wire; projects: each job's project by pk."""
    files = result_files_of(session, jobs)
    return [job_public(session, job, project=projects[job.project_pk], result_files=files[job.pk]) for job in jobs]


def job_public(session: Session, job: FineTuningJob, *, project: Project,
               result_files: list[str] | None = None) -> JobPublic:
    """The job on the wire; result_files when the caller has read them already (jobs_public)."""
    config = TrainingConfig.model_validate(job.config)
    hyperparameters = {"n_epochs": config.n_epochs, "batch_size": config.batch_size,
                       "learning_rate_multiplier": config.learning_rate_multiplier}
    if result_files is None:
        result_files = result_files_of(session, [job])[job.pk]
    error = JobError(**job.error) if job.error else None
    return JobPublic(
        id=job.id, created_at=job.created_at, finished_at=job.finished_at, model=job.model,
        fine_tuned_model=job.fine_tuned_model, organization_id=project.id, status=JobStatus(job.status), error=error,
        hyperparameters=hyperparameters,
        method=method_public(config),
        training_file=job.training_file, validation_file=job.validation_file, result_files=result_files,
        trained_tokens=job.trained_tokens, seed=job.seed, suffix=job.suffix, metadata=job.metadata_,
        integrations=(job.integrations or {}).get("items"), estimated_finish=job.estimated_finish,
        progress={"step": job.step, "total_steps": job.total_steps}, attempt=job.attempt,
        crashes=job.crashes, merge=config.merge,
        pause_requested=job.requested_action == "pause", resources=needs_of(job.resources), priority=job.priority,
        evaluation=job.evaluation,
    )


def method_public(config: TrainingConfig) -> dict[str, Any]:
    """The job's `method`, resolved. Everything is echoed where a request sets it, so the echo can be sent back as a
    new job: hyperparameters under the method (a DPO job's preference settings flat among them, as OpenAI's beta),
    seed and merge at the top level, processes and distributed in resources."""
    if config.method == "dpo" and config.preference is not None:
        hyperparameters = {**config.model_dump(mode="json", include=set(DPO_HYPERPARAMETER_FIELDS)),
                           **config.preference.model_dump(mode="json")}
    else:
        hyperparameters = config.model_dump(mode="json", include=set(HYPERPARAMETER_FIELDS))
    return {"type": config.method, config.method: {"hyperparameters": hyperparameters,
                                                   "adapter": config.adapter.model_dump(mode="json"),
                                                   "evaluation": config.evaluation.model_dump(mode="json")}}


def event_public(event: JobEvent) -> JobEventPublic:
    return JobEventPublic(id=event.id, created_at=event.created_at, level=event.level, message=event.message,
                          type=event.type, data=event.data)


def checkpoint_public(checkpoint: JobCheckpoint, *, job: FineTuningJob, project: Project) -> CheckpointPublic:
    base = job.fine_tuned_model or fine_tuned_model_name(job, organization=project.name)
    return CheckpointPublic(id=checkpoint.id, created_at=checkpoint.created_at,
                            fine_tuned_model_checkpoint=checkpoint_model_id(base, checkpoint.step_number),
                            fine_tuning_job_id=job.id, step_number=checkpoint.step_number,
                            metrics=checkpoint.metrics)
