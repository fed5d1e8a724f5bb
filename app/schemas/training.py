"""The resolved, per-job training configuration.

The API validates a job request into this model (no "auto" left), stores it on the job row and
echoes it back; the worker's training code reads the same model. It imports no torch so that both
sides share one definition.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

AdapterType = Literal["lora", "qlora", "dora", "full"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]
SchedulerName = Literal["linear", "cosine", "constant"]


class QuantizationConfig(BaseModel):
    """4-bit weight quantization for QLoRA (bitsandbytes)."""

    model_config = ConfigDict(extra="forbid")

    bits: Literal[4] = 4
    # nf4 fits normally distributed weights better than fp4; both cost the same memory.
    quant_type: Literal["nf4", "fp4"] = "nf4"
    # Quantizes the quantization constants too: about 0.4 bits/parameter saved, slightly slower.
    double_quant: bool = True
    # dtype the dequantized weights are multiplied in; "auto" follows the job's precision.
    compute_dtype: Precision = "auto"


class AdapterConfig(BaseModel):
    """What trains: a LoRA-family adapter, or every weight ("full")."""

    model_config = ConfigDict(extra="forbid")

    type: AdapterType = "lora"
    # r: higher = more capacity, more adapter memory and a slower step.
    r: int = Field(default=16, ge=1, le=1024)
    # alpha / r scales the adapter's update (alpha / sqrt(r) with use_rslora).
    alpha: float = Field(default=32, gt=0)
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    # "all-linear" adapts every linear layer except the output head; a list names module suffixes.
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    use_rslora: bool = False
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
            self.quantization = QuantizationConfig()
        if self.type != "qlora" and self.quantization is not None:
            raise ValueError("quantization applies only to adapter type \"qlora\"; remove it or use qlora")
        return self


class TrainingConfig(BaseModel):
    """Every knob of one supervised fine-tuning run, fully resolved."""

    model_config = ConfigDict(extra="forbid")

    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    n_epochs: int = Field(default=3, ge=1, le=50)
    batch_size: int = Field(default=4, ge=1, le=256)
    learning_rate: float = Field(default=2e-4, gt=0, le=1.0)
    learning_rate_multiplier: float = Field(default=1.0, gt=0)
    lr_scheduler: SchedulerName = "linear"
    warmup_ratio: float = Field(default=0.0, ge=0.0, le=0.5)
    weight_decay: float = Field(default=0.0, ge=0.0, le=1.0)
    max_grad_norm: float = Field(default=1.0, ge=0.0)
    gradient_accumulation_steps: int = Field(default=1, ge=1, le=1024)
    max_seq_length: int = Field(default=1024, ge=8, le=131072)
    # Packing concatenates examples into full rows; attention never crosses example boundaries.
    packing: bool = False
    # True puts prompts / user turns in the loss as well as the answers.
    train_on_inputs: bool = False
    # Recomputes activations in the backward pass: about 30% slower, far less activation memory.
    gradient_checkpointing: bool = False
    precision: Precision = "auto"
    eval_steps: int | None = Field(default=None, ge=1)
    n_evals: int | None = Field(default=None, ge=0, le=1000)
    early_stopping_patience: int | None = Field(default=None, ge=1)
    early_stopping_threshold: float = Field(default=0.0, ge=0.0)
    save_steps: int | None = Field(default=None, ge=1)
    n_checkpoints: int = Field(default=1, ge=1, le=100)
    load_best_at_end: bool = False
    seed: int = Field(default=42, ge=0, le=2147483647)
    # Also export merged full weights (base + adapter, safetensors shards) when training ends.
    merge: bool = False
    # Data-parallel training processes for this job on one worker: one per GPU, or gloo processes on a
    # CPU. The global batch (batch_size x gradient_accumulation_steps) is the same for any count.
    processes: int = Field(default=1, ge=1, le=64)
    # "ddp" keeps a full replica of the weights in every process; "fsdp" shards weights, gradients and
    # optimizer state across them, for models too large for one device.
    distributed: Literal["ddp", "fsdp"] = "ddp"

    @model_validator(mode="after")
    def _check_combination(self) -> TrainingConfig:
        if self.eval_steps is not None and self.n_evals is not None:
            raise ValueError("give eval_steps or n_evals, not both")
        if self.early_stopping_patience is not None and self.eval_steps is None and not self.n_evals:
            raise ValueError("early_stopping_patience needs evaluation: set eval_steps or n_evals")
        if self.merge and self.adapter.type == "full":
            raise ValueError("merge applies to adapters; a full fine-tune already produces full weights")
        return self
