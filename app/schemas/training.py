"""The resolved, per-job training configuration.

The API validates a job request into this model (no "auto" left), stores it on the job row and
echoes it back; the worker's training code reads the same model. It imports no torch so that both
sides share one definition. A job is supervised (next-token loss on the answers) or DPO (preference
pairs: `method` "dpo" with a `preference` block).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from pydantic import BaseModel, Field, StrictBool, StrictFloat, StrictInt, ValidationInfo, model_validator

from app.schemas.common import REQUEST_MODEL

AdapterType = Literal["lora", "qlora", "dora", "full"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]
SchedulerName = Literal["linear", "cosine", "constant"]
# How a multi-process job splits its work (TrainingConfig.distributed, requested as resources.distributed).
DistributedStrategy = Literal["ddp", "fsdp"]
MAX_PROCESSES = 64
# What a job learns from: supervised examples (chat, prompt/completion, text) or preference pairs (DPO).
TrainingMethod = Literal["supervised", "dpo"]
# The preference loss: "sigmoid" is DPO's, "ipo" a squared loss that does not saturate (less prone to overfit
# pairs it already ranks right), "simpo" is reference-free (length-normalised log-probabilities and a target
# margin simpo_gamma; no reference model, so no reference pass).
PreferenceLoss = Literal["sigmoid", "ipo", "simpo"]
# beta "auto", per loss: 0.1 is DPO's and IPO's usual value (TRL's default); SimPO's rewards are average
# log-probabilities, an order of magnitude smaller than DPO's summed log-ratios, so its beta is larger (its
# paper uses 2 to 10; 2.0 is the conservative end).
AUTO_BETA: dict[str, float] = {"sigmoid": 0.1, "ipo": 0.1, "simpo": 2.0}
# Training and evaluation run the output layer on at most this many labelled positions at a time (never the full
# logits; worker/training/logprobs.py).
LOGP_CHUNK_TOKENS = 1024
# A batch whose padded size (rows x longest row) is above this many tokens runs as several forward passes
# of whole rows (the step's loss and gradient are unchanged: the loss is normalised by the step's tokens).
# Activation memory then scales with this budget, not with batch_size x the longest example: a long-tailed
# dataset no longer needs memory for batch_size copies of its longest example. Costs a little speed where
# a forward of this size does not fill the device (small models on a GPU). 1,024 rather than 2,048: on the
# qwen2-152k benchmark (fp32, CPU) the LoRA peak fell from 2,442 to 2,087 MB at the same speed (29.3 against
# 30.0 s) and the QLoRA peak from 2,236 to 1,763 MB (19.9 against 18.9 s); 512 was 8% slower than 1,024.
MAX_TOKENS_PER_FORWARD = 1024
# With gradient checkpointing a pass keeps its products' outputs (worker/training/checkpointing.py) and its backward's
# peak is one layer's recomputed activations, both in proportion to the pass's tokens. Halving the pass made room
# for what it keeps: qwen2-152k QLoRA in fp32 peaked at 1,381-1,449 MB keeping them in passes of 512 tokens against
# 1,404-1,457 MB for plain checkpointing in passes of 1,024, and 1,529-1,533 MB keeping up to 128 MB in passes of 1,024
# (docs/benchmarks.md, issue 18, stop 32).
MAX_TOKENS_PER_CHECKPOINTED_FORWARD = 512


def pack_rows(order: Iterable[int], lengths: Sequence[int], max_seq_length: int) -> list[list[int]]:
    """Packing's rows: the examples in `order`, each row filled until the next example would take it past
    max_seq_length (an example is never split: the worker truncated each to max_seq_length). The worker plans its
    epochs with it (worker/training/data.py); the API counts a file's rows with it for the estimate."""
    rows: list[list[int]] = []
    row: list[int] = []
    used = 0
    for i in order:
        if row and used + lengths[i] > max_seq_length:
            rows.append(row)
            row, used = [], 0
        row.append(i)
        used += lengths[i]
    if row:
        rows.append(row)
    return rows


def forward_tokens(gradient_checkpointing: bool) -> int:
    """The padded tokens (rows x longest row) a training forward pass holds at most, a row longer than that alone:
    worker/training/recipe.py splits each batch by it, and the memory estimate (app/services/estimates.py) counts
    one such pass's activations."""
    return MAX_TOKENS_PER_CHECKPOINTED_FORWARD if gradient_checkpointing else MAX_TOKENS_PER_FORWARD


# On a CPU a frozen output layer (adapters) runs on a block of its rows (vocabulary entries) at a time: a block's
# logits, then its share of the gradient while the block is in the cache, with no [positions, vocabulary] buffer
# (worker/training/fused_head.py; the memory estimate's CPU figures count it). A block holds about
# VOCAB_BLOCK_LOGITS logits: its rows are the power of two nearest VOCAB_BLOCK_LOGITS / positions, within
# VOCAB_BLOCK_ROWS. Few positions (a pass's answers) take long blocks: each block costs some twenty small operations
# whatever its size, and the sweep reads the whole weight anyway. qwen2-152k's output layer, forward and backward
# (docs/benchmarks.md, issue 18, stop 35). Intel Xeon with AMX, bf16: 22 positions 57 ms in blocks of 2,048 rows, 41
# in 16,384; 86 positions 87 / 68 ms (8,192); 150 positions 108 / 95 (4,096); 600 positions 267 ms in 2,048 and
# 303 in 8,192. fp32 moves less: 40-300 positions 0-7% faster in 4,096-8,192 rows than in 2,048; 14 positions 105
# ms in 2,048, 108 in 16,384, 121 in 32,768 (hence the top of the range).
VOCAB_BLOCK_LOGITS = 2**19
VOCAB_BLOCK_ROWS = (2048, 16384)
# ... and a block's weight takes at most 1/VOCAB_BLOCK_CACHE_SHARE of the host's last-level cache, where the host
# reports one: the sweep reads each block twice, and the second read must find it still in the cache, beside the
# logits and whatever else the cache holds. A Zen 4 with a 32 MB L3 (stop 36): fp32 on 14 / 22 / 40 positions took
# 116 / 143 / 262 ms in blocks of 2,048 rows (7.3 MB), 148 / 166 / 291 in 4,096 (14.7 MB) and 173 / 212 / 295 in
# 16,384 (59 MB); bf16 62 / 67 / 94 ms in 4,096 rows (7.3 MB), 67 / 70 / 101 in 8,192.
VOCAB_BLOCK_CACHE_SHARE = 4


def vocab_block_rows(positions: int, *, row_bytes: int = 0, cache_bytes: int | None = None) -> int:
    """The rows of a CPU sweep's block over a frozen output layer for `positions` positions at once, each row of
    `row_bytes` (the hidden size times the product's element size), on a host with `cache_bytes` of last-level
    cache. Without both (the memory estimate, which holds for any host) only VOCAB_BLOCK_ROWS bounds it."""
    low, high = VOCAB_BLOCK_ROWS
    rows = min(high, max(low, 2 ** round(math.log2(VOCAB_BLOCK_LOGITS / max(positions, 1)))))
    if row_bytes and cache_bytes:
        rows = min(rows, 2 ** math.floor(math.log2(max(cache_bytes / VOCAB_BLOCK_CACHE_SHARE / row_bytes, 1))))
    return rows


# With gradient_checkpointing a forward pass also keeps its matrix products' and attention's outputs, up to this many
# MB, for its backward not to recompute them (worker/training/checkpointing.py; the memory estimate counts them). A
# qwen2-152k QLoRA pass of MAX_TOKENS_PER_CHECKPOINTED_FORWARD tokens makes about 126 MB of them in fp32 (4 layers).
SAVED_OUTPUTS_PER_PASS_MB = 128
# simpo_gamma when a simpo job does not give it: the target reward margin TRL's CPOTrainer defaults to.
AUTO_SIMPO_GAMMA = 0.5


class ConfigConflict(ValueError):
    """Settings that contradict each other or would do nothing; `field` is the TrainingConfig field to change
    (or "validation_file", which the request carries), so the API can name the request's parameter."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


# Evaluations during training see, together, at most this share of the tokens trained (never fewer than
# MIN_EVAL_EXAMPLES examples each: a curve point needs some). An evaluated token costs about as much as a trained
# one here (bench/evals.py: the adapters' backward is cheap, evaluation computes full metrics), and 0.08 keeps the
# measured time under a tenth of the training's. The recipe sizes its sample by these, and the job default for
# n_evals (app/services/jobs.py) keeps within both.
EVAL_COST_SHARE = 0.08
MIN_EVAL_EXAMPLES = 16

# Settings that act on the validation set: without a validation_file they would silently do nothing.
NEEDS_VALIDATION_FILE = ("eval_steps", "n_evals", "early_stopping_patience", "load_best_at_end")
# Hyperparameters of supervised jobs only: a DPO job scores each pair's answers whole (never packed with other
# examples) and its loss is on the answers by definition.
SUPERVISED_ONLY_FIELDS = ("packing", "train_on_inputs")


class QuantizationConfig(BaseModel):
    """4-bit weight quantization for QLoRA (bitsandbytes)."""

    model_config = REQUEST_MODEL

    bits: Literal[4] = 4
    # nf4 fits normally distributed weights better than fp4; both cost the same memory.
    quant_type: Literal["nf4", "fp4"] = "nf4"
    # Quantizes the quantization constants too: about 0.4 bits/parameter saved, slightly slower.
    double_quant: StrictBool = True
    # dtype the dequantized weights are multiplied in; "auto" follows the job's precision.
    compute_dtype: Precision = "auto"


class AdapterConfig(BaseModel):
    """What trains: a LoRA-family adapter, or every weight ("full")."""

    model_config = REQUEST_MODEL

    type: AdapterType = "lora"
    # r: higher = more capacity, more adapter memory and a slower step.
    r: StrictInt = Field(default=16, ge=1, le=1024)
    # alpha / r scales the adapter's update (alpha / sqrt(r) with use_rslora).
    alpha: StrictFloat = Field(default=32, gt=0)
    dropout: StrictFloat = Field(default=0.05, ge=0.0, lt=1.0)
    # "all-linear" adapts every linear layer except the output head; a list names module suffixes.
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    use_rslora: StrictBool = False
    quantization: QuantizationConfig | None = None

    @model_validator(mode="after")
    def _check_combination(self) -> AdapterConfig:
        if isinstance(self.target_modules, list):
            if not self.target_modules:
                raise ValueError("target_modules must not be empty; use \"all-linear\" or name modules")
            for name in self.target_modules:
                if not name or not all(c.isalnum() or c in "._-" for c in name):
                    raise ValueError(f"target_modules entry {name!r} is not a module name")
        if self.type == "qlora" and self.quantization is None:
            # filled in, not given: model_fields_set keeps saying what the request gave (a continued job keeps its
            # parent's quantization unless it gives one: app/services/jobs.py continued_adapter)
            self.__dict__["quantization"] = QuantizationConfig()
        if self.type != "qlora" and self.quantization is not None:
            raise ValueError("quantization applies only to adapter type \"qlora\"; remove it or use qlora")
        return self


class AnswerBudget(BaseModel):
    """How much an answer report generates: a job's (EvaluationConfig) and a later one's (EvaluationCreate)."""

    model_config = REQUEST_MODEL

    # The first N examples; each costs two generations (base and tuned).
    max_examples: StrictInt = Field(default=32, ge=1, le=1000)
    # None: twice the longest reference answer's tokens plus 16, at most 512: room to finish the answer and to
    # show a model that does not stop, at a cost bounded by the references.
    max_new_tokens: StrictInt | None = Field(default=None, ge=1, le=4096)


class EvaluationConfig(AnswerBudget):
    """After training, with a validation file: the base and the tuned model answer validation conversations
    (greedy), scored against each reference answer (eval_report.json and eval_samples.jsonl)."""

    generate: StrictBool = True


class PreferenceConfig(BaseModel):
    """How a DPO job scores a pair (preferred vs non-preferred answer to the same prompt); "auto" values are
    filled per loss_type (AUTO_BETA, AUTO_SIMPO_GAMMA)."""

    model_config = REQUEST_MODEL

    # The descriptions are the OpenAPI document's (the wire's DpoHyperparameters derive from these fields).
    beta: StrictFloat = Field(default=AUTO_BETA["sigmoid"], gt=0, le=20, description=(
        "How far the tuned model may move from the reference: higher keeps it closer. For simpo, the scale of its "
        "length-normalised rewards. \"auto\": 0.1 for sigmoid and ipo, 2.0 for simpo."))
    loss_type: PreferenceLoss = Field(default="sigmoid", description=(
        "sigmoid (DPO), ipo, or simpo (reference-free: no reference model)."))
    label_smoothing: StrictFloat = Field(default=0.0, ge=0.0, lt=0.5, description=(
        "Conservative DPO: the chance that a pair's preference is wrong; 0 trusts every pair. sigmoid only."))
    rpo_alpha: StrictFloat | None = Field(default=None, ge=0.0, description=(
        "Weight of an NLL term on the preferred answer (RPO), which keeps its likelihood from falling while the "
        "margin grows; null: none."))
    simpo_gamma: StrictFloat | None = Field(default=None, ge=0.0, description=(
        f"SimPO's target margin between the rewards; simpo only (default {AUTO_SIMPO_GAMMA})."))

    @model_validator(mode="before")
    @classmethod
    def _fill_auto(cls, data: Any) -> Any:
        """beta and simpo_gamma left out take their value for the loss (one rule for the API and the worker)."""
        if isinstance(data, dict):
            loss = data.get("loss_type", "sigmoid")
            data = dict(data)
            if data.get("beta") is None and loss in AUTO_BETA:
                data["beta"] = AUTO_BETA[loss]
            if loss == "simpo" and data.get("simpo_gamma") is None:
                data["simpo_gamma"] = AUTO_SIMPO_GAMMA
        return data

    @model_validator(mode="after")
    def _check_combination(self) -> PreferenceConfig:
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ConfigConflict("label_smoothing", "label_smoothing (conservative DPO) is taken with loss_type "
                                 f"\"sigmoid\" only: remove it for {self.loss_type}, or use \"sigmoid\"")
        if self.simpo_gamma is not None and self.loss_type != "simpo":
            raise ConfigConflict("simpo_gamma", f"simpo_gamma is SimPO's target margin and loss_type is "
                                 f"{self.loss_type!r}: remove it or use loss_type \"simpo\"")
        return self


class TrainingConfig(BaseModel):
    """Every knob of one fine-tuning run (supervised or DPO), fully resolved."""

    model_config = REQUEST_MODEL

    # Configs stored before DPO have neither field: they are supervised.
    method: TrainingMethod = "supervised"
    # The preference loss of a "dpo" job; None for supervised jobs.
    preference: PreferenceConfig | None = None
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    n_epochs: StrictInt = Field(default=3, ge=1, le=50)
    batch_size: StrictInt = Field(default=4, ge=1, le=256)
    learning_rate: StrictFloat = Field(default=2e-4, gt=0, le=1.0)
    learning_rate_multiplier: StrictFloat = Field(default=1.0, gt=0)
    lr_scheduler: SchedulerName = "linear"
    warmup_ratio: StrictFloat = Field(default=0.0, ge=0.0, le=0.5)
    weight_decay: StrictFloat = Field(default=0.0, ge=0.0, le=1.0)
    max_grad_norm: StrictFloat = Field(default=1.0, ge=0.0)
    gradient_accumulation_steps: StrictInt = Field(default=1, ge=1, le=1024)
    max_seq_length: StrictInt = Field(default=1024, ge=8, le=131072)
    # Packing concatenates examples into full rows; attention never crosses example boundaries.
    packing: StrictBool = False
    # True puts prompts / user turns in the loss as well as the answers.
    train_on_inputs: StrictBool = False
    # Recomputes activations in the backward pass: far less activation memory, for the element-wise work again and
    # the products past SAVED_OUTPUTS_PER_PASS_MB (worker/training/checkpointing.py).
    gradient_checkpointing: StrictBool = False
    # "auto": bf16 where the device computes it natively (a GPU with bf16, a CPU with AVX512-BF16, AMX or Arm BF16),
    # fp16 on an older GPU, fp32 on other CPUs; the worker resolves it (worker/training/model.py).
    precision: Precision = "auto"
    eval_steps: StrictInt | None = Field(default=None, ge=1)
    n_evals: StrictInt | None = Field(default=None, ge=0, le=1000)
    early_stopping_patience: StrictInt | None = Field(default=None, ge=1)
    early_stopping_threshold: StrictFloat = Field(default=0.0, ge=0.0)
    save_steps: StrictInt | None = Field(default=None, ge=1)
    n_checkpoints: StrictInt = Field(default=1, ge=1, le=100)
    load_best_at_end: StrictBool = False
    seed: StrictInt = Field(default=42, ge=0, le=2147483647)
    # Also export merged full weights (base + adapter, safetensors shards) when training ends.
    merge: StrictBool = False
    # Data-parallel training processes for this job on one worker: one per GPU, or gloo processes on a
    # CPU. The global batch (batch_size x gradient_accumulation_steps) is the same for any count.
    processes: StrictInt = Field(default=1, ge=1, le=MAX_PROCESSES)
    # "ddp" keeps a full replica of the weights in every process; "fsdp" shards weights, gradients and
    # optimizer state across them, for models too large for one device.
    distributed: DistributedStrategy = "ddp"

    @model_validator(mode="after")
    def _check_combination(self, info: ValidationInfo) -> TrainingConfig:
        """Every setting must act: a combination where one would be ignored is refused, saying what to change.
        A new job's config is validated with context {"validation_file": bool}; a stored one (no context) is
        held only to the rules it was created under, so jobs from earlier releases still load."""
        if self.method == "dpo":
            if self.preference is None:
                self.preference = PreferenceConfig()
            for name in SUPERVISED_ONLY_FIELDS:
                if getattr(self, name):
                    raise ConfigConflict(name, f"{name} applies to supervised jobs; a DPO job scores each pair's "
                                         "answers whole, one pair a row: remove it")
        elif self.preference is not None:
            raise ConfigConflict("preference", "preference settings apply to DPO jobs: remove them or use method "
                                 "\"dpo\"")
        evaluates = self.eval_steps is not None or bool(self.n_evals)
        if self.eval_steps is not None and self.n_evals is not None:
            raise ConfigConflict("n_evals", "give eval_steps or n_evals, not both")
        if self.early_stopping_patience is not None and not evaluates:
            raise ConfigConflict("early_stopping_patience",
                                 "early_stopping_patience needs evaluation: set eval_steps or n_evals")
        if self.merge and self.adapter.type == "full":
            raise ConfigConflict("merge", "merge applies to adapters; a full fine-tune already produces full weights")
        if self.distributed == "fsdp" and self.method == "dpo":
            raise ConfigConflict("distributed", "distributed \"fsdp\" is not available for DPO jobs yet (its log-probs "
                                 "run the output layer outside the sharded forward): use \"ddp\"")
        if info.context is None:
            return self
        # n_checkpoints' default (1) stands beside save_steps in an echoed job; any other count would be ignored
        if self.save_steps is not None and self.n_checkpoints != 1:
            raise ConfigConflict("n_checkpoints", "give save_steps or n_checkpoints, not both")
        if self.early_stopping_threshold and self.early_stopping_patience is None:
            raise ConfigConflict("early_stopping_threshold",
                                 "early_stopping_threshold applies to early stopping: set early_stopping_patience "
                                 "or remove the threshold")
        if self.load_best_at_end and not evaluates:
            raise ConfigConflict("load_best_at_end", "load_best_at_end picks the best evaluated checkpoint: set "
                                 "eval_steps or n_evals")
        if self.adapter.type == "full":
            defaults = AdapterConfig()
            ignored = [name for name in ("r", "alpha", "dropout", "target_modules", "use_rslora")
                       if getattr(self.adapter, name) != getattr(defaults, name)]
            if ignored:
                raise ConfigConflict("adapter", f"{', '.join(ignored)} configure an adapter; a full fine-tune "
                                     "trains every weight and has none: remove them or choose an adapter type")
        if self.distributed == "fsdp" and self.processes == 1:
            raise ConfigConflict("distributed", "distributed \"fsdp\" shards across processes; with one process "
                                 "it does nothing: ask for more processes (or GPUs) or use \"ddp\"")
        given = [name for name in NEEDS_VALIDATION_FILE if getattr(self, name) not in (None, False, 0)]
        if self.evaluation.generate and self.evaluation != EvaluationConfig():
            given.append("evaluation")
        if given and not info.context.get("validation_file"):
            raise ConfigConflict("validation_file", f"{', '.join(given)} evaluate{'s' if len(given) == 1 else ''} "
                                 "on the validation set, and this job has none: set validation_file to a validation "
                                 f"file's id, or remove {', '.join(given)}")
        return self


# Fields of TrainingConfig a request sets outside `hyperparameters`: `method.type`, the adapter and evaluation blocks,
# the top-level `seed` and `merge`, and `resources.processes` / `resources.distributed`. Every other field is a
# hyperparameter (app/schemas/jobs.py derives the wire models from this split): HYPERPARAMETER_FIELDS under
# method.supervised.hyperparameters, DPO_HYPERPARAMETER_FIELDS under method.dpo.hyperparameters, where the
# preference block's fields sit flat beside OpenAI's beta.
JOB_LEVEL_FIELDS = ("method", "adapter", "evaluation", "seed", "merge", "processes", "distributed")
HYPERPARAMETER_FIELDS = tuple(name for name in TrainingConfig.model_fields
                              if name not in (*JOB_LEVEL_FIELDS, "preference"))
DPO_HYPERPARAMETER_FIELDS = (*(name for name in HYPERPARAMETER_FIELDS if name not in SUPERVISED_ONLY_FIELDS),
                             *PreferenceConfig.model_fields)

