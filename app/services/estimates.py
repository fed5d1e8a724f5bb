"""What a job will cost before it runs: tokens and optimizer steps from its files, and the peak accelerator
memory of one training process from the model's shape and the job's method, precision, batch and sequence
length. Calibrated against measured peaks (bench/memory.py; the error is in docs/benchmarks.md).

The memory model, per process (c = bytes per value at the compute precision):
- weights: full fine-tunes keep fp32 master weights (4 bytes/parameter, trained under autocast); LoRA/DoRA
  keep the frozen base at c; QLoRA stores the decoder's linear weights in 4 bits (0.5 byte plus its
  quantization constants) and the rest (embeddings, head, norms) at c;
- trainable parameters (all for full, r x (in + out) per adapted linear for adapters) get fp32 gradients and
  two fp32 AdamW moments: 4 + 8 bytes each;
- activations kept for the backward pass of one forward pass (the recipe runs a batch as passes of at most
  forward_tokens(gradient_checkpointing) tokens, a longer row alone), per token and decoder layer: the inputs
  and outputs of the norms, projections, rotary embedding, attention and MLP (13h + 4kv + 4i values) plus each
  adapter's dropout copy of its input and mask; on a CPU also the attention scores and probabilities (the eager
  kernel); with gradient checkpointing each layer's input, one layer recomputed at a time, and the matrix
  products' and attention's outputs a pass keeps (at most SAVED_OUTPUTS_PER_PASS_MB);
- logits: per position of one chunk of the output layer (at most LOGP_CHUNK_TOKENS; every token of a pass under
  FSDP), the vocabulary (on a CPU, a frozen output layer's block of vocab_block_rows(positions)) at c, in fp32
  for the loss, and its fp32 gradient;
- FSDP shards weights, gradients and optimizer state over the processes; on a GPU a fixed runtime allowance
  (CUDA context, kernels, allocator slack).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy.orm import Session

from app.core.config import Settings
from app.schemas.jobs import JobResources
from app.schemas.training import (
    LOGP_CHUNK_TOKENS,
    SAVED_OUTPUTS_PER_PASS_MB,
    TrainingConfig,
    forward_tokens,
    vocab_block_rows,
)

# CUDA context, cuBLAS workspaces and caching-allocator slack, measured on the lent GPU when there was one.
GPU_RUNTIME_BYTES = 0.75e9
# 4-bit weights: half a byte, plus an fp32 absmax per 64 values (double quantization stores those in 8 bits).
NF4_BYTES = {True: 0.5 + 1 / 64 + 4 / (64 * 256), False: 0.5 + 4 / 64}
GIB = float(2**30)  # the unit workers state their GPU memory in
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class MemoryEstimate:
    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    runtime: float
    trainable_parameters: int
    precision: str

    @property
    def total_bytes(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits + self.runtime

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GIB

    def summary(self) -> str:
        parts = [("weights", self.weights), ("gradients", self.gradients), ("optimizer", self.optimizer),
                 ("activations", self.activations), ("logits", self.logits), ("runtime", self.runtime)]
        return ", ".join(f"{name} {value / GIB:.2f} GiB" for name, value in parts if value)

    def as_dict(self) -> dict[str, Any]:
        return {"total_gib": round(self.total_gib, 3), "weights_gib": round(self.weights / GIB, 3),
                "gradients_gib": round(self.gradients / GIB, 3), "optimizer_gib": round(self.optimizer / GIB, 3),
                "activations_gib": round(self.activations / GIB, 3), "logits_gib": round(self.logits / GIB, 3),
                "runtime_gib": round(self.runtime / GIB, 3), "trainable_parameters": self.trainable_parameters,
                "precision": self.precision}


def _bytes_per_value(config: TrainingConfig, native_bf16: bool) -> tuple[int, str]:
    """"auto" is bf16 where the device computes bf16 natively, as the worker resolves it (worker/training/model.py;
    fp16 on an older GPU is 2 bytes too)."""
    precision = config.precision
    if precision == "auto":
        precision = "bf16" if native_bf16 else "fp32"
    return (4 if precision == "fp32" else 2), precision


def _module_shapes(h: int, kv: int, i: int) -> dict[str, tuple[int, int]]:
    return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h), "gate_proj": (h, i),
            "up_proj": (h, i), "down_proj": (i, h)}


def peak_memory(info: dict[str, Any], config: TrainingConfig, *, device: Literal["cuda", "cpu"] = "cuda",
                seq_length: int | None = None, cpu_bf16: bool = False) -> MemoryEstimate | None:
    """The peak memory of one training process; None when the model's shape is not known. `cpu_bf16`: the CPU has
    bf16 instructions (the worker's "auto" then trains in bf16 there)."""
    parameters, h, layers = info.get("parameters"), info.get("hidden_size"), info.get("layers")
    vocab = info.get("vocab_size") or 0
    if not parameters or not h or not layers:
        return None
    heads = info.get("attention_heads") or 1
    kv = (info.get("kv_heads") or heads) * (h // heads)
    i = info.get("intermediate_size") or 4 * h
    c, precision = _bytes_per_value(config, device == "cuda" or cpu_bf16)
    shapes = _module_shapes(h, kv, i)
    linear_parameters = layers * sum(a * b for a, b in shapes.values())
    adapter = config.adapter
    targets = adapter.target_modules
    # A target names a module by its end (PEFT's match): "self_attn.q_proj" adapts q_proj.
    named = set() if targets == "all-linear" else {t.rpartition(".")[2] for t in targets}
    if adapter.type == "full":
        adapted: list[str] = []
        trainable = parameters
        weights = parameters * 4.0
    else:
        adapted = list(LINEARS) if targets == "all-linear" else [m for m in LINEARS if m in named]
        trainable = layers * sum(adapter.r * (shapes[m][0] + shapes[m][1]) for m in adapted)
        if adapter.type == "dora":
            trainable += layers * sum(shapes[m][1] for m in adapted)
        if adapter.type == "qlora" and adapter.quantization is not None:
            rest = max(parameters - linear_parameters, 0)
            weights = linear_parameters * NF4_BYTES[adapter.quantization.double_quant] + rest * c
        else:
            weights = parameters * float(c)
        weights += trainable * 4.0  # the adapters' own fp32 weights
    gradients, optimizer = trainable * 4.0, trainable * 8.0
    if config.distributed == "fsdp" and config.processes > 1:
        weights, gradients, optimizer = (x / config.processes for x in (weights, gradients, optimizer))
    # A DPO pair is one row of its prompt and both answers (each answer fits max_seq_length with the prompt, so the
    # row is at most twice that), attention over the whole row (worker/training/preference.py).
    row_length = min(seq_length or config.max_seq_length, config.max_seq_length) * (2 if config.method == "dpo" else 1)
    # A batch runs as forward passes of whole rows, each within forward_tokens(...) tokens (a longer row alone):
    # activations and logits are one pass's, whatever the batch. Rows shorter than row_length fill a pass up to the
    # budget, so a pass is counted at the budget (or the batch, or one row past the budget).
    rows = math.ceil(config.batch_size / config.processes)
    tokens = min(rows * row_length, max(forward_tokens(config.gradient_checkpointing), row_length))
    # What autograd keeps per token and layer: the norms' inputs and outputs (2 x 3h), the projections' inputs
    # (h, h, i), rotary q/k and their rotations (2h + 2kv), attention's q, k, v and output (2h + 2kv), the MLP's
    # gate, activation and product (3i; a SwiGLU MLP the worker runs fused keeps gate and up instead of gate, up and
    # activation, one i less, left counted: the estimate stays an upper bound for MLPs it cannot tell apart); each
    # adapter's dropped-out input (its in-features) and down-projection (r), and the dropout mask (a byte each).
    dropped = sum(shapes[m][0] for m in adapted)
    per_token_layer = c * (13 * h + 4 * kv + 4 * i + dropped + adapter.r * len(adapted)) + dropped
    # The eager CPU kernel for masked attention keeps the scores and probabilities (heads x row length each);
    # the fused GPU kernels (flash / memory-efficient) keep neither.
    if device == "cpu":
        per_token_layer += 2 * c * heads * row_length
    if config.gradient_checkpointing:
        # Each layer's input, one layer's recomputation, and the products' outputs a pass keeps (at most all of them).
        kept = min(SAVED_OUTPUTS_PER_PASS_MB * 2**20, tokens * layers * per_token_layer)
        activations = tokens * (layers * h * c + per_token_layer) + kept
    else:
        activations = tokens * layers * per_token_layer
    # The output layer runs on LOGP_CHUNK_TOKENS labelled positions at a time (worker/training/logprobs.py), and on a
    # CPU a frozen one (adapters that leave it alone) on a block of its rows at a time, longer for fewer positions
    # (worker/training/fused_head.py): the largest block any chunk up to that many positions makes. FSDP's sharded
    # runs take the full logits of every token.
    sharded = config.distributed == "fsdp" and config.processes > 1
    frozen_head = adapter.type != "full" and "lm_head" not in named
    positions = tokens if sharded else min(tokens, LOGP_CHUNK_TOKENS)
    if device == "cpu" and frozen_head and not sharded:
        block = max(p * min(vocab, vocab_block_rows(p)) for p in range(1, positions + 1))
    else:
        block = positions * vocab
    logits = block * (c + 8.0)
    runtime = GPU_RUNTIME_BYTES if device == "cuda" else 0.0
    return MemoryEstimate(weights=weights, gradients=gradients, optimizer=optimizer, activations=float(activations),
                          logits=logits, runtime=runtime, trainable_parameters=int(trainable), precision=precision)


def plan_steps(config: TrainingConfig, *, examples: int, total_tokens: int | None,
               packed_rows: int | None = None) -> dict[str, int | None]:
    """Rows per epoch and optimizer steps, as the recipe will plan them. Packing needs the token counts: the rows
    the file's examples pack into at max_seq_length where they were counted for it (packed_rows), else the fewest
    rows its tokens could fill."""
    if config.packing and packed_rows is not None:
        rows = packed_rows
    elif config.packing and total_tokens is not None:
        rows = math.ceil(total_tokens / config.max_seq_length)
    elif config.packing:
        return {"batches_per_epoch": None, "steps": None}
    else:
        rows = examples
    batches = math.ceil(rows / config.batch_size) if rows else 0
    steps = math.ceil(batches / config.gradient_accumulation_steps) * config.n_epochs
    return {"batches_per_epoch": batches, "steps": steps}


@dataclass(frozen=True)
class WorkerFit:
    name: str
    gpus: int
    gpu_memory_gb: float | None
    # None: the worker states no GPU memory (a CPU worker), so nothing can be said.
    fits: bool | None


def worker_fits(session: Session, *, peak_gib: float, resources: JobResources, settings: Settings) -> list[WorkerFit]:
    """Each live worker, and whether one training process of the job fits one of its GPUs."""
    from app.services.workers import live_workers

    found = []
    for worker in live_workers(session, settings=settings):
        known = worker.gpus > 0 and worker.gpu_memory_gb is not None
        fits = None if not known else bool(peak_gib <= (worker.gpu_memory_gb or 0) and worker.gpus >= resources.gpus)
        found.append(WorkerFit(name=worker.name, gpus=worker.gpus, gpu_memory_gb=worker.gpu_memory_gb, fits=fits))
    return found


def plan_memory(session: Session, *, plan: Any, settings: Settings) -> MemoryEstimate | None:
    """peak_memory of a planned job (app/services/jobs.py's JobPlan), for its estimate and for creation's check
    alike: rows as long as the training file's longest example where its tokens were counted for the model (packed
    rows are max_seq_length long), else max_seq_length."""
    from app.services import base_models

    model = base_models.find(session, settings=settings, name=plan.base_model)
    if model is None:
        return None
    stats = ((plan.files[0].report or {}).get("tokens") or {}).get(plan.base_model) or {}
    longest = None if plan.config.packing else (stats.get("tokens_per_example") or {}).get("max")
    return peak_memory(model.info, plan.config, seq_length=longest)


def estimate_job(session: Session, *, project: Any, request: Any, settings: Settings) -> dict[str, Any]:
    """The estimate of a job request (the same checks as creating it): data, steps, memory, workers."""
    from app.core.storage import get_storage
    from app.services.jobs import plan_job
    from app.services.tokens import TemplateRefusal, countable_in_request, record_token_stats

    plan = plan_job(session, project=project, request=request, settings=settings)
    training = plan.files[0]
    if plan.config.packing and countable_in_request(training, settings):
        # the rows packing makes at this max_seq_length, counted once (kept in the file's report), as a DPO job's
        # prompt room is
        with contextlib.suppress(TemplateRefusal):  # uncounted, as creating the job does not count it either
            record_token_stats(session, storage=get_storage(), file=training, model=plan.base_model,
                               settings=settings, max_seq_length=plan.config.max_seq_length, param="training_file")
    report = training.report or {}
    stats = (report.get("tokens") or {}).get(plan.base_model)
    tokens = stats["total_tokens"] if stats else None
    packed_rows = ((stats or {}).get("packed_rows") or {}).get(str(plan.config.max_seq_length))
    memory = plan_memory(session, plan=plan, settings=settings)
    fits = worker_fits(session, peak_gib=memory.total_gib, resources=plan.resources, settings=settings) \
        if memory is not None else []
    return {"model": request.model, "base_model": plan.base_model, "method": plan.config.adapter.type,
            "examples": int(report.get("examples") or 0), "tokens": tokens, "n_epochs": plan.config.n_epochs,
            "batch_size": plan.config.batch_size,
            **plan_steps(plan.config, examples=int(report.get("examples") or 0), total_tokens=tokens,
                         packed_rows=packed_rows),
            "memory": memory.as_dict() if memory is not None else None,
            "workers": [f.__dict__ for f in fits]}
