"""Fine-tuning recipe, supervised or DPO on preference pairs (worker/training/dpo.py): set up, load data, load the
model, resume, train step by step (evaluating and checkpointing), save.

Reads top to bottom like torchtune's recipes and nanoGPT's train.py: `train()` at the end calls the phases in
order. What crosses phases lives in two small objects: `Run` (what was set up: processes, device, data, model,
optimizer; fixed for the run) and `TrainState` (what changes each step and what a checkpoint saves to resume
exactly). A DPO run swaps in its data, loss and evaluation (`step_loss`, `evaluate_on`); other loops reuse the
phases: `setup_run`, `setup_data`, `setup_model`,
`resume`, `save_checkpoint`, `evaluate_on`, `save_final`.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import random
import tempfile
import time
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from app.schemas.training import EVAL_COST_SHARE, MIN_EVAL_EXAMPLES, TrainingConfig, forward_tokens
from worker.training import checkpoint as ckpt
from worker.training import distributed, dpo, preference, stopping
from worker.training.data import (
    IGNORE_INDEX,
    EpochPlan,
    batch_to_device,
    collate,
    load_examples,
    plan_epoch,
    split_by_tokens,
)
from worker.training.distributed import ProcessGroup
from worker.training.evaluate import evaluate, forward_logits, split_for_evaluation, token_loss_sum
from worker.training.host import PASS_RELEASE_GROWTH_MB, release_freed_memory
from worker.training.logprobs import token_loss
from worker.training.model import (
    adapter_differences,
    check_quantization_support,
    count_parameters,
    linear_module_names,
    load_model,
    pick_device,
    resolve_precision,
)
from worker.training.reporting import (
    PrintReporter,
    Reporter,
    SilentReporter,
    TrainingCancelled,
    TrainingDiverged,
    TrainingPaused,
    TrainingReleased,
)

# Evaluations during training use at most this many validation examples so that a big validation
# set does not dominate the run; the final evaluation uses all of them.
VALID_SUBSET_EXAMPLES = 256
# ...and together about EVAL_COST_SHARE of the training's time (app/schemas/training.py).
CSV_COLUMNS = [
    "step", "total_steps", "epoch", "train_loss", "train_mean_token_accuracy", "learning_rate",
    "tokens_per_second", "trained_tokens", "valid_loss", "valid_perplexity", "valid_mean_token_accuracy",
    "full_valid_loss", "full_valid_perplexity", "full_valid_mean_token_accuracy",
    *dpo.TRAIN_METRICS, *(f"valid_{name}" for name in dpo.VALID_METRICS),
    *(f"full_valid_{name}" for name in dpo.VALID_METRICS),
]
SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


@dataclass
class TrainingResult:
    """What a finished run produced."""

    final_dir: Path
    steps: int
    total_steps: int
    trained_tokens: int
    final_metrics: dict[str, Any]
    metrics_csv: Path
    # The step whose weights are the final ones: the last, or the best evaluated with load_best_at_end.
    weights_step: int = 0


@dataclass
class TrainState:
    """What changes as the run goes, saved in every checkpoint (trainer_state.json) so a resume continues exactly."""

    step: int = 0
    epoch: int = 0
    next_batch: int = 0  # the data position: the next batch of `epoch`'s plan
    trained_tokens: int = 0
    valid_loss: float | None = None  # of the current weights, when evaluated at this step
    best_valid_loss: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    log_history: list[dict[str, Any]] = field(default_factory=list)
    # dpo: the best evaluation's valid_loss, which decides between evaluations of an equal preference accuracy
    best_tie_loss: float | None = None

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any]) -> TrainState:
        return cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})  # older ones lack a field


@dataclass
class Run:
    """What one run set up, fixed from the first step to the last; the phases read it."""

    config: TrainingConfig
    reporter: Reporter
    procs: ProcessGroup
    device: Any  # torch.device
    dtype: Any  # torch.dtype
    output_dir: Path
    # setup_data
    # The tokenizer as save_pretrained writes it (relative path -> bytes), for the final folder: the tokenizer itself
    # is dropped once the data is tokenised (a 151,936-token one held 117 MB for the whole run).
    tokenizer_files: dict[str, bytes] = field(default_factory=dict)
    pad_id: int = 0
    # Examples (supervised) or PreferenceExample pairs (dpo).
    train_examples: list[Any] = field(default_factory=list)
    valid_examples: list[Any] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    plans: list[EpochPlan] = field(default_factory=list)  # each epoch's batch order, from the seed
    total_steps: int = 0
    eval_at: set[int] = field(default_factory=set)
    save_at: set[int] = field(default_factory=set)
    subset_plan: EpochPlan = field(default_factory=list)  # evaluations during training
    full_plan: EpochPlan = field(default_factory=list)  # the final evaluation
    # setup_model
    model: Any = None
    wrapped: Any = None  # what the step calls: the model, DDP around it, or (FSDP) the model sharded in place
    optimizer: Any = None
    scheduler: Any = None
    scaler: Any = None  # fp16's loss scaling (disabled otherwise)
    # dpo.setup_reference: {"train", "valid"} reference log-probs of each pair; None when not dpo (or simpo).
    reference: dict[str, Any] | None = None
    # setup_model: whether the model takes a pair as one packed row (preference.packs_pairs), which tokens() counts.
    packed_pairs: bool = True

    @property
    def full(self) -> bool:
        return self.config.adapter.type == "full"

    @property
    def preference(self) -> bool:
        return self.config.method == "dpo"

    def tokens(self, example: Any) -> int:
        """What an example (or a pair) puts through a forward pass."""
        return dpo.pair_tokens(example, packed=self.packed_pairs) if self.preference else len(example.input_ids)

    def collate(self, rows: list[list[int]], examples: list[Any], *, packing: bool) -> dict[str, Any]:
        """One batch of `rows` (lists of example indexes), on the run's device."""
        if self.preference:
            batch = dpo.collate([i for row in rows for i in row], examples, pad_id=self.pad_id)
        else:
            batch = collate(rows, examples, pad_id=self.pad_id, packing=packing)
        return batch_to_device(batch, self.device)

    @property
    def sharded(self) -> bool:
        return self.procs.enabled and self.config.distributed == "fsdp"

    def autocast(self) -> AbstractContextManager[Any]:
        import torch

        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) so a run is reproducible."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def evaluation_steps(config: TrainingConfig, total_steps: int) -> set[int]:
    """Steps after which to evaluate: every eval_steps, or n_evals spread evenly over the run."""
    if config.eval_steps:
        return set(range(config.eval_steps, total_steps + 1, config.eval_steps))
    if config.n_evals:
        n = min(config.n_evals, total_steps)
        return {round(total_steps * (k + 1) / n) for k in range(n)}
    return set()


def make_optimizer(model: Any, config: TrainingConfig) -> Any:
    """AdamW; weight decay only on matrices, not on biases and norm scales (nanoGPT's split)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.learning_rate)


def next_command(procs: distributed.ProcessGroup, answer: str) -> str:
    """What every process does after a step: rank 0's answer to Reporter.control(), or "release" (checkpoint,
    then stop so the job continues elsewhere) when any process of the run was signalled to stop. A user's
    cancel or pause wins over a release."""
    if procs.enabled:
        answers = distributed.all_gather(procs, (answer, stopping.requested()))
        answer, stop = answers[0][0], any(signalled for _, signalled in answers)
    else:
        stop = stopping.requested()
    return "release" if stop and answer in ("continue", "checkpoint") else answer


# ---------------------------------------------------------------- set-up phases
def setup_run(config: TrainingConfig, *, reporter: Reporter, output_dir: Path, init_adapter: Path | None) -> Run:
    """Processes, hardware and precision, checked before any weights load (a wrong setting fails in seconds
    with its remedy); then seeding, and joining the other processes."""
    procs = distributed.from_environment()
    if config.processes != procs.world_size:
        raise ValueError(
            f"the job asks for {config.processes} training process(es) but this run has {procs.world_size}; "
            f"start it with torchrun --nproc-per-node {config.processes} (the worker does this itself)"
        )
    if config.distributed == "fsdp" and config.adapter.type == "qlora":
        raise ValueError('distributed "fsdp" does not shard 4-bit (QLoRA) weights here; use "ddp" with qlora')
    if not procs.is_main:
        reporter = SilentReporter()  # rank 0 speaks for the run; the others follow its decisions
    device = pick_device(procs.local_rank)
    dtype = resolve_precision(config.precision, device)
    if config.adapter.type == "qlora":
        check_quantization_support()
        quantization = config.adapter.quantization
        if quantization is not None and quantization.compute_dtype != "auto":
            resolve_precision(quantization.compute_dtype, device)
    if init_adapter is not None:
        if config.adapter.type == "full":
            raise ValueError("continued training from an adapter needs an adapter type (lora, qlora or dora), not full")
        if not (Path(init_adapter) / "adapter_config.json").is_file():
            raise ValueError(f"{init_adapter} holds no PEFT adapter (adapter_config.json is missing)")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(config.seed)
    distributed.start(procs, device)
    return Run(config=config, reporter=reporter, procs=procs, device=device, dtype=dtype, output_dir=output_dir)


def setup_data(run: Run, *, model_path: Path, train_file: Path, validation_file: Path | None,
               trust_remote_code: bool) -> None:
    """Tokenise once; plan every epoch's batch order from the seed; decide when to evaluate and checkpoint."""
    from transformers import AutoTokenizer

    config = run.config
    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True, trust_remote_code=trust_remote_code)
    run.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    def load(path: Path, tokenizer: Any) -> list[Any]:
        if run.preference:
            return dpo.load_pairs(path, tokenizer, max_seq_length=config.max_seq_length, reporter=run.reporter)
        return load_examples(path, tokenizer, max_seq_length=config.max_seq_length,
                             train_on_inputs=config.train_on_inputs, reporter=run.reporter)

    run.train_examples = load(Path(train_file), tokenizer)
    if validation_file is not None:
        run.valid_examples = load(Path(validation_file), tokenizer)
    run.tokenizer_files = saved_files(tokenizer)
    del tokenizer
    release_freed_memory()  # before the model loads into the process
    run.lengths = [run.tokens(e) for e in run.train_examples]
    run.plans = [plan_epoch(run.lengths, batch_size=config.batch_size, max_seq_length=config.max_seq_length,
                            packing=config.packing, seed=config.seed + epoch) for epoch in range(config.n_epochs)]
    run.total_steps = sum(math.ceil(len(plan) / config.gradient_accumulation_steps) for plan in run.plans)

    def eval_plan(n_examples: int) -> EpochPlan:
        order = sorted(range(n_examples), key=lambda i: run.tokens(run.valid_examples[i]))
        return [[[i] for i in order[k : k + config.batch_size]] for k in range(0, n_examples, config.batch_size)]

    run.eval_at = evaluation_steps(config, run.total_steps) if run.valid_examples else set()
    run.subset_plan = eval_plan(_eval_sample_size(run))
    run.full_plan = eval_plan(len(run.valid_examples))
    run.save_at = ckpt.checkpoint_steps(run.total_steps, save_steps=config.save_steps,
                                        n_checkpoints=config.n_checkpoints)


def saved_files(saveable: Any) -> dict[str, bytes]:
    """What `saveable.save_pretrained` writes (a tokenizer's few files), as relative path -> bytes."""
    with tempfile.TemporaryDirectory() as folder:
        saveable.save_pretrained(folder)
        return {str(path.relative_to(folder)): path.read_bytes()
                for path in sorted(Path(folder).rglob("*")) if path.is_file()}


def setup_model(run: Run, *, model_path: Path, init_adapter: Path | None, trust_remote_code: bool,
                resume_from: Path | None) -> None:
    """The model (with a resumed run's weights, loaded before wrapping: FSDP shards the weights it finds), wrapped
    for the processes, and its optimizer, schedule and loss scaler."""
    import torch
    from transformers import get_scheduler

    config, reporter, procs = run.config, run.reporter, run.procs
    model = load_model(config, Path(model_path), device=run.device, dtype=run.dtype, init_adapter=init_adapter,
                       trust_remote_code=trust_remote_code)
    if init_adapter is not None:
        saved_adapter = json.loads((Path(init_adapter) / "adapter_config.json").read_text())
        differences = adapter_differences(config.adapter, saved_adapter, all_linear=linear_module_names(model))
        reporter.event(
            "continuing training from an existing adapter"
            + (f"; its own settings are used where the job's differ ({', '.join(differences)})" if differences else ""),
            level="warn" if differences else "info",
            data={"differences": differences},
        )
    trainable, total = count_parameters(model)
    if resume_from is not None:
        ckpt.load_weights(model, Path(resume_from), full=run.full)
    run.model = model
    if run.preference and not preference.packs_pairs(model):
        # Each pair runs as two rows of its prompt and an answer: measured so, forward passes keep within the budget
        # (the batches planned from the packed lengths stay: a pair's batch is the same whatever its length).
        run.packed_pairs = False
        run.lengths = [run.tokens(e) for e in run.train_examples]
    run.wrapped = distributed.wrap(model, group=procs, strategy=config.distributed, device=run.device)
    run.optimizer = make_optimizer(model, config)
    run.scheduler = get_scheduler(SCHEDULERS[config.lr_scheduler], run.optimizer,
                                  num_warmup_steps=math.ceil(config.warmup_ratio * run.total_steps),
                                  num_training_steps=run.total_steps)
    # fp16 needs loss scaling so small gradients do not underflow; bf16 and fp32 do not.
    run.scaler = torch.amp.GradScaler(run.device.type, enabled=run.dtype == torch.float16)
    on = f"{procs.world_size} {run.device.type} processes ({config.distributed})" if procs.enabled else run.device.type
    reporter.event(
        f"training {config.adapter.type} on {on} in {str(run.dtype).removeprefix('torch.')}: "
        f"{len(run.train_examples)} train / {len(run.valid_examples)} validation examples, {run.total_steps} steps, "
        f"{trainable:,} of {total:,} parameters trainable",
        data={"total_steps": run.total_steps, "trainable_parameters": trainable, "parameters": total,
              "processes": procs.world_size},
    )
    if run.eval_at:
        sample = sum(len(batch) for batch in run.subset_plan)
        times = "once" if len(run.eval_at) == 1 else f"{len(run.eval_at)} times"
        reporter.event(f"evaluating {times} during training on {sample} of "
                       f"{len(run.valid_examples)} validation examples, and on all of them at the end",
                       data={"evaluations": len(run.eval_at), "eval_examples": sample})


def _eval_sample_size(run: Run) -> int:
    """How many validation examples (in file order) each evaluation during training takes: up to a share of the
    tokens trained spread over the evaluations, at least MIN_EVAL_EXAMPLES, at most VALID_SUBSET_EXAMPLES."""
    budget = EVAL_COST_SHARE * sum(run.lengths) * run.config.n_epochs / max(len(run.eval_at), 1)
    count, tokens = 0, 0
    for example in run.valid_examples[:VALID_SUBSET_EXAMPLES]:
        if count >= MIN_EVAL_EXAMPLES and tokens + run.tokens(example) > budget:
            break
        count, tokens = count + 1, tokens + run.tokens(example)
    return count


def resume(run: Run, saved: dict[str, Any] | None) -> tuple[TrainState, EpochPlan | None]:
    """The state to start from: a checkpoint's (optimizer, schedule, scaler, step, data position and every process's
    RNG stream restored), or a fresh one; and the saved epoch's batch order when resuming mid-epoch."""
    import torch

    procs, config = run.procs, run.config
    if saved is None:
        if procs.rank > 0:
            torch.manual_seed(config.seed + procs.rank)  # same weights everywhere, but each its own dropout
        return TrainState(), None
    distributed.load_optimizer_state(run.model, run.optimizer, saved["optimizer"], group=procs,
                                     strategy=config.distributed)
    run.scheduler.load_state_dict(saved["scheduler"])
    trainer_state = saved["trainer_state"]
    if trainer_state["total_steps"] != run.total_steps:
        raise ValueError(
            f"checkpoint was made for a run of {trainer_state['total_steps']} steps, this one has {run.total_steps}; "
            "resume with the same config and data"
        )
    state = TrainState.from_checkpoint(trainer_state)
    if trainer_state.get("grad_scaler") and run.scaler.is_enabled():
        run.scaler.load_state_dict(trainer_state["grad_scaler"])
    rank_rng = [saved["rng"], *saved["rank_rng"]]
    if procs.rank < len(rank_rng):
        ckpt.restore_rng_state(rank_rng[procs.rank])
    else:  # a checkpoint from a run with fewer processes: this one's dropout stream starts afresh
        torch.manual_seed(config.seed + procs.rank)
    run.reporter.event(f"resumed from checkpoint at step {state.step}", data={"step": state.step})
    return state, trainer_state["batch_order"]


# ---------------------------------------------------------------- the loop's phases
def train_step(run: Run, state: TrainState, plan: EpochPlan) -> dict[str, Any]:
    """One optimizer step over the next `gradient_accumulation_steps` batches of `plan`; advances the state (step,
    data position, tokens) and returns the step's metrics."""
    import torch

    config, procs = run.config, run.procs
    epoch, batch_index = state.epoch, state.next_batch
    group = plan[batch_index : batch_index + config.gradient_accumulation_steps]
    started = time.perf_counter()
    max_tokens = forward_tokens(config.gradient_checkpointing)
    # Each process takes every world_size-th row of each batch (all of it when alone).
    micro_batches = [
        run.collate(part, run.train_examples, packing=config.packing)
        for b in group
        for part in split_by_tokens(b[procs.rank :: procs.world_size], run.lengths, max_tokens=max_tokens)
    ]
    # Gradients cross processes in every process's last backward, so all run the same number:
    # one with fewer micro-batches runs weightless repeats of the step's first row.
    n_passes = distributed.all_max(procs, len(micro_batches))
    filler = group[0][:1]
    # Normalise by the units of the whole accumulated step (over all processes): labelled tokens, or pairs, so the
    # step's loss is the true mean whatever the micro-batch split, padding or process count.
    step_units = int(distributed.all_sum(procs, [sum(loss_units(run, mb) for mb in micro_batches)])[0])
    loss_total, sums = 0.0, {"correct": 0.0, "chosen": 0.0, "rejected": 0.0}
    for k in range(n_passes):
        real = k < len(micro_batches)
        mb = micro_batches[k] if real else run.collate(filler, run.train_examples, packing=config.packing)
        # A step's forward passes differ in shape, so glibc's freed chunks from one rarely fit the next and the
        # heap grows pass after pass (qwen2-152k QLoRA in bf16: 1,192 -> 1,335 MB at the starts of a step's four
        # passes). Handed back before a pass once it grew (docs/benchmarks.md, issue 18, stop 30), with gradient
        # checkpointing only: without it a pass's activations live until its backward, the heap grew only about 60 MB
        # over a step's passes, and faulting the handed-back pages in again cost bf16 LoRA 5-10% of its speed
        # (stop 45). Each step still ends with a release.
        if config.gradient_checkpointing:
            release_freed_memory(min_growth_mb=PASS_RELEASE_GROWTH_MB)
        with distributed.accumulate(run.wrapped, group=procs, strategy=config.distributed, sync=k == n_passes - 1):
            loss_sum, stats = step_loss(run, mb)
            # DDP and FSDP average gradients over processes; scaling by their count makes that a sum.
            loss = loss_sum / step_units * procs.world_size if real else loss_sum * 0.0
            if config.gradient_checkpointing:
                # A checkpointed forward keeps each layer's input and the outputs within its budget
                # (worker/training/checkpointing.py): everything else it made is freed heap by now, which the
                # backward's recomputation rarely fits (qwen2-152k QLoRA in fp32 peaked at
                # 1,521-1,680 MB, 1,508-1,516 with this; docs/benchmarks.md, issue 18, stop 31). Without
                # checkpointing the forward's activations are alive until the backward and there is little to hand back.
                release_freed_memory(min_growth_mb=PASS_RELEASE_GROWTH_MB)
            run.scaler.scale(loss).backward()
        if real:
            loss_total += (loss_sum / step_units).item()
            for key in sums:
                sums[key] += stats.get(key, 0.0)
    loss_total, correct, chosen, rejected, summed_tokens = distributed.all_sum(
        procs, [loss_total, sums["correct"], sums["chosen"], sums["rejected"],
                sum(mb["n_tokens"] for mb in micro_batches)])
    real_tokens = int(summed_tokens)
    state.step += 1
    if not math.isfinite(loss_total):
        raise TrainingDiverged(
            f"the training loss became {loss_total} at step {state.step}; lower learning_rate "
            f"(now {config.learning_rate:g}) or use a more stable precision (bf16 or fp32)"
        )
    run.scaler.unscale_(run.optimizer)
    if config.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), config.max_grad_norm)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    learning_rate = run.scheduler.get_last_lr()[0]
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    state.trained_tokens += real_tokens
    elapsed = time.perf_counter() - started
    # Advance the data position first: a checkpoint saved after this step resumes at the next batch.
    state.next_batch = batch_index + len(group)
    if state.next_batch >= len(plan):
        state.epoch, state.next_batch = epoch + 1, 0
    quality = (dpo.step_metrics({"correct": correct, "chosen": chosen, "rejected": rejected}, step_units)
               if run.preference else {"train_mean_token_accuracy": correct / step_units})
    return {
        "step": state.step,
        "total_steps": run.total_steps,
        "epoch": round(epoch + min(batch_index + len(group), len(plan)) / len(plan), 4),
        "train_loss": loss_total,
        **quality,
        "learning_rate": learning_rate,
        "tokens_per_second": real_tokens / elapsed,
        "trained_tokens": state.trained_tokens,
    }


def loss_units(run: Run, batch: dict[str, Any]) -> int:
    """What a step's loss is a mean over: labelled tokens (supervised) or pairs (dpo)."""
    if run.preference:
        return len(batch["index"])
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def step_loss(run: Run, batch: dict[str, Any]) -> tuple[Any, dict[str, float]]:
    """The loss of one micro-batch, summed over its units (for train_step to normalise), and the sums its metrics
    need: correct tokens (supervised), or pairs ranked right and their rewards (dpo)."""
    if run.preference:
        return dpo.pair_loss(run, run.wrapped, batch, split="train")
    if run.sharded:  # FSDP's output layer is sharded outside its forward: scored from the full logits
        with run.autocast():
            logits = forward_logits(run.wrapped, batch)
        loss_sum, _, n_correct = token_loss_sum(logits, batch["labels"])
    else:  # only the labelled positions reach the output layer, a chunk at a time
        with run.autocast():
            loss_sum, _, n_correct = token_loss(run.wrapped, batch)
    return loss_sum, {"correct": float(n_correct)}


def evaluate_on(run: Run, plan: EpochPlan) -> dict[str, float]:
    """Loss, perplexity and token accuracy on the validation batches of `plan`: each process evaluates its share and
    torchmetrics sums the shares."""
    lengths = [run.tokens(e) for e in run.valid_examples]
    mine = split_for_evaluation(plan[run.procs.rank :: run.procs.world_size], lengths)
    if run.preference:
        return dpo.evaluate_pairs(run, mine)
    # Under FSDP every forward pass gathers weights from all processes: all run the same number.
    passes = distributed.all_max(run.procs, len(mine)) if run.sharded else None
    return evaluate(run.model, mine, run.valid_examples, pad_id=run.pad_id, device=run.device, autocast=run.autocast,
                    forward_passes=passes, filler=split_for_evaluation(plan[:1], lengths)[0])


def patience_spent(config: TrainingConfig, state: TrainState) -> bool:
    """Whether early stopping ended the run at state's step: also true of the state a checkpoint saved at that step,
    so a run paused or handed off there ends where it would have (its final evaluation was made before the save)."""
    patience = config.early_stopping_patience
    return patience is not None and state.evals_without_improvement >= patience


def evaluate_step(run: Run, state: TrainState, metrics: dict[str, Any]) -> tuple[bool, str | None]:
    """Evaluate when this step is due (and on the whole validation set at the last step); tracks the best loss and
    early stopping. Returns (new best, the reason to stop early or None); adds the figures to `metrics`."""
    config, step = run.config, state.step
    new_best, stop_reason = False, None
    state.valid_loss = None  # the valid_loss of these weights, if evaluated this step
    tracked = tracked_metric(run)
    if step in run.eval_at:
        valid = evaluate_on(run, run.subset_plan)
        metrics.update(validation_metrics(run, valid, prefix="valid_"))
        state.valid_loss = valid["loss"]
        # Lower is better: the loss (supervised), or the share of pairs ranked wrong (dpo).
        score = 1.0 - valid["preference_accuracy"] if run.preference else valid["loss"]
        threshold = config.early_stopping_threshold
        better = state.best_valid_loss is None or state.best_valid_loss - score > threshold
        # A preference accuracy saturates (every pair ranked right) while the loss still falls: at an equal accuracy,
        # the lower valid_loss is the better step.
        if run.preference and not better and score == state.best_valid_loss and state.best_tie_loss is not None:
            better = state.best_tie_loss - valid["loss"] > threshold
        if better:
            state.best_valid_loss, state.best_step, state.evals_without_improvement = score, step, 0
            state.best_tie_loss = valid["loss"] if run.preference else None
            new_best = True
        else:
            state.evals_without_improvement += 1
        patience = config.early_stopping_patience
        if patience_spent(config, state):
            stop_reason = (
                f"early stopping at step {step}: {tracked} has not improved by more than "
                f"{config.early_stopping_threshold:g} for {patience} evaluation(s); best "
                f"{describe_best(run, state)} at step {state.best_step}"
            )
    if (step == run.total_steps or stop_reason is not None) and run.valid_examples:
        valid = evaluate_on(run, run.full_plan)
        metrics.update(validation_metrics(run, valid, prefix="full_valid_"))
    return new_best, stop_reason


def tracked_metric(run: Run) -> str:
    """What picks the best step and stops early: valid_loss, or (dpo) valid_preference_accuracy."""
    return "valid_preference_accuracy" if run.preference else "valid_loss"


def best_value(run: Run, state: TrainState) -> float:
    """The best evaluation's figure as its metric reads (state keeps lower-is-better scores)."""
    assert state.best_valid_loss is not None
    return 1.0 - state.best_valid_loss if run.preference else state.best_valid_loss


def describe_best(run: Run, state: TrainState) -> str:
    return f"{best_value(run, state):.4f}"


def validation_metrics(run: Run, valid: dict[str, float], *, prefix: str) -> dict[str, float]:
    if run.preference:
        return {f"{prefix}loss": valid["loss"], **{f"{prefix}{name}": valid[name] for name in dpo.VALID_METRICS}}
    return {f"{prefix}loss": valid["loss"], f"{prefix}perplexity": valid["perplexity"],
            f"{prefix}mean_token_accuracy": valid["mean_token_accuracy"]}


def save_checkpoint(run: Run, state: TrainState, plan: EpochPlan | None) -> Path:
    """Write a checkpoint of the current step (rank 0 writes; under FSDP every process first hands over its shards);
    `plan` is the batch order the next step continues in."""
    procs, config = run.procs, run.config
    trainer_state = {**asdict(state), "total_steps": run.total_steps, "batch_order": plan,
                     "config": config.model_dump(), "grad_scaler": run.scaler.state_dict()}  # fp16's loss scale
    weights = distributed.full_state_dict(run.model, group=procs, strategy=config.distributed) if run.sharded else None
    optimizer_state = distributed.optimizer_state(run.model, run.optimizer, group=procs, strategy=config.distributed)
    rank_rng = distributed.all_gather(procs, ckpt.capture_rng_state())[1:]
    path = checkpoint_dir(run.output_dir, state.step)
    if procs.is_main:
        path = ckpt.save_checkpoint(run.output_dir, step=state.step, model=run.model, full=run.full,
                                    optimizer=run.optimizer, scheduler=run.scheduler, trainer_state=trainer_state,
                                    weights=weights, optimizer_state=optimizer_state, rank_rng=rank_rng)
        dpo.save_reference(run, path)
        # The best step is kept by number too: its valid_loss may tie a later, not-better-enough one.
        ckpt.prune_checkpoints(run.output_dir, keep_steps={state.best_step} if state.best_step else set())
        run.reporter.checkpoint_saved(step=state.step, path=path, metrics=state.log_history[-1])
    distributed.barrier(procs)  # the directory is complete before any process reads it
    return path


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    """Where the checkpoint of `step` is written (checkpoint.save_checkpoint's layout)."""
    return output_dir / "checkpoints" / f"step-{step}"


def save_final(run: Run, state: TrainState) -> Path:
    """The final adapter (or model), with its tokenizer and config, ready to serve; the best checkpoint's weights
    first when load_best_at_end."""
    procs, config = run.procs, run.config
    if config.load_best_at_end and state.best_step is not None \
            and not (checkpoint_dir(run.output_dir, state.best_step) / ckpt.TRAINER_STATE).is_file():
        # A run resumed across an upgrade, whose best checkpoint the earlier retention pruned: nothing to load
        run.reporter.event(f"the best checkpoint (step {state.best_step}) is no longer stored; the final weights are "
                           f"the last step's ({state.step})", level="warn", data={"best_step": state.best_step})
        state.best_step = None
    if config.load_best_at_end and state.best_step is not None:
        best_dir = checkpoint_dir(run.output_dir, state.best_step)
        if run.sharded:  # every process loads its shard of the best weights
            best = ckpt.read_weights(best_dir, full=run.full, model_keys=list(run.model.state_dict()))
            distributed.load_full_state_dict(run.model, best, group=procs, strategy=config.distributed)
        elif procs.is_main:
            ckpt.load_weights(run.model, best_dir, full=run.full)
        run.reporter.event(
            f"loaded the best checkpoint (step {state.best_step}, {tracked_metric(run)} {describe_best(run, state)}) "
            "as the final weights",
            data={"step": state.best_step, tracked_metric(run): best_value(run, state)})
    final_dir = run.output_dir / "final"
    weights = distributed.full_state_dict(run.model, group=procs, strategy=config.distributed) if run.sharded else None
    if procs.is_main:
        if weights is None:
            run.model.save_pretrained(str(final_dir), safe_serialization=True)
        else:
            run.model.save_pretrained(str(final_dir), safe_serialization=True, state_dict=weights)
        for name, data in run.tokenizer_files.items():
            (final_dir / name).parent.mkdir(parents=True, exist_ok=True)
            (final_dir / name).write_bytes(data)
        (final_dir / "training_config.json").write_text(json.dumps(config.model_dump(), indent=2))
    # The directory stays out of the event: events reach clients, and the server's paths are not theirs.
    run.reporter.event(f"saved the final {'model' if run.full else 'adapter'} after {state.step} steps",
                       data={"step": state.step})
    return final_dir


# ---------------------------------------------------------------- the recipe
def train(
    config: TrainingConfig,
    *,
    model_path: Path,
    train_file: Path,
    validation_file: Path | None,
    output_dir: Path,
    reporter: Reporter,
    resume_from: Path | None = None,
    wandb: dict[str, Any] | None = None,
    init_adapter: Path | None = None,
    trust_remote_code: bool = False,
) -> TrainingResult:
    """Fine-tune the model at `model_path` on `train_file` and save the result under `output_dir`.

    `init_adapter`: a PEFT adapter directory to continue training from (adapter types only).
    `trust_remote_code`: the catalogue entry's switch; off unless the operator vouches for the model.
    """
    run = setup_run(config, reporter=reporter, output_dir=output_dir, init_adapter=init_adapter)
    saved = ckpt.load_checkpoint(resume_from) if resume_from else None
    setup_data(run, model_path=model_path, train_file=train_file, validation_file=validation_file,
               trust_remote_code=trust_remote_code)
    setup_model(run, model_path=model_path, init_adapter=init_adapter, trust_remote_code=trust_remote_code,
                resume_from=resume_from)
    if run.preference:
        dpo.setup_reference(run, resume_from=resume_from, continued=init_adapter is not None)
    state, resumed_plan = resume(run, saved)
    reporter, procs = run.reporter, run.procs

    metrics_csv = run.output_dir / "metrics.csv"
    # Only rank 0 writes files: the processes of one run share output_dir.
    csv_file = open(metrics_csv, "w", newline="") if procs.is_main else io.StringIO()  # noqa: SIM115 - closed below
    csv_writer = csv.DictWriter(csv_file, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    csv_writer.writeheader()
    csv_writer.writerows(state.log_history)
    wandb_run = _start_wandb(wandb, config, reporter) if wandb and procs.is_main else None  # None if it failed

    release_freed_memory()  # what loading the model (and a preference run's reference pass) left freed
    run.model.train()
    metrics: dict[str, Any] = {}
    stop_reason: str | None = None
    try:
        while state.step < run.total_steps and stop_reason is None and not patience_spent(config, state):
            epoch = state.epoch
            plan = resumed_plan if resumed_plan is not None else run.plans[epoch]
            resumed_plan = None
            metrics = train_step(run, state, plan)
            new_best, stop_reason = evaluate_step(run, state, metrics)
            release_freed_memory()
            state.log_history.append(metrics)
            reporter.metrics(metrics)
            csv_writer.writerow(metrics)
            csv_file.flush()
            if wandb_run is not None:
                wandb_run = _log_to_wandb(wandb_run, metrics, step=state.step, reporter=reporter)
            if stop_reason is not None:
                reporter.event(stop_reason, data={"step": state.step, "best_step": state.best_step})

            next_plan = plan if state.epoch == epoch else (
                run.plans[state.epoch] if state.epoch < len(run.plans) else None)
            last = state.step == run.total_steps or stop_reason is not None
            saved_now = state.step in run.save_at or last or (config.load_best_at_end and new_best)
            if saved_now:
                save_checkpoint(run, state, next_plan)
            command = next_command(procs, reporter.control())  # rank 0 asks; every process obeys
            if command == "cancel":
                raise TrainingCancelled(f"training cancelled at step {state.step}")
            if command in ("pause", "release"):
                path = checkpoint_dir(run.output_dir, state.step) if saved_now else \
                    save_checkpoint(run, state, next_plan)
                raise TrainingPaused(path) if command == "pause" else TrainingReleased(path)
            if command == "checkpoint" and not saved_now:
                save_checkpoint(run, state, next_plan)
    finally:
        csv_file.close()
        if wandb_run is not None:
            with contextlib.suppress(Exception):  # the run is over; W&B's own troubles must not fail it
                wandb_run.finish()

    final_dir = save_final(run, state)
    distributed.barrier(procs)
    distributed.stop(procs)
    return TrainingResult(
        final_dir=final_dir,
        steps=state.step,
        total_steps=run.total_steps,
        trained_tokens=state.trained_tokens,
        final_metrics=metrics or (state.log_history[-1] if state.log_history else {}),
        metrics_csv=metrics_csv,
        weights_step=state.best_step if run.config.load_best_at_end and state.best_step is not None else state.step,
    )


def _start_wandb(options: dict[str, Any], config: TrainingConfig, reporter: Reporter) -> Any:
    """Start a W&B run and say where it logs (WANDB_MODE / WANDB_DIR / WANDB_API_KEY come from the environment);
    None, with a warning event, when W&B cannot start: logging is never a reason to stop training."""
    try:
        import wandb as wandb_module  # optional dependency, only needed when a job asks for it

        run = wandb_module.init(
            project=options["project"],
            name=options.get("name"),
            entity=options.get("entity"),
            tags=options.get("tags"),
            config=config.model_dump(),
            dir=os.environ.get("WANDB_DIR"),
        )
    except Exception as exc:  # no key, no network, a W&B outage, the package missing
        reporter.event(f"W&B logging could not start ({type(exc).__name__}: {str(exc)[:300]}); training goes on "
                       "without it", level="warn", data={"integration": "wandb"})
        return None
    message, data = _describe_wandb_run(run)
    reporter.event(message, data=data)
    return run


def _describe_wandb_run(run: Any) -> tuple[str, dict[str, Any]]:
    """Where a W&B run logs: online runs have a page to open; offline ones a log to `wandb sync` later, named
    relative to the worker's W&B directory (server paths stay out of events)."""
    mode = run.settings.mode
    sync_path = Path(run.settings.sync_file)
    root = Path(run.settings.root_dir)
    sync_file = str(sync_path.relative_to(root) if sync_path.is_relative_to(root) else sync_path.name)
    where = run.url if run.url else f"{sync_file} under the worker's W&B directory"
    return f"W&B run {run.id} ({mode}) logging to {where}", {
        "run_id": run.id, "project": run.project, "mode": mode, "url": run.url, "sync_file": sync_file,
        "tags": list(run.tags or ())}


def _log_to_wandb(run: Any, metrics: dict[str, Any], *, step: int, reporter: Reporter) -> Any:
    """Log one step to W&B; on failure warn once and carry on without W&B (returns None)."""
    try:
        run.log(metrics, step=step)
        return run
    except Exception as exc:
        reporter.event(f"W&B logging failed at step {step} ({type(exc).__name__}: {str(exc)[:300]}); training goes "
                       "on without it", level="warn", data={"integration": "wandb", "step": step})
        with contextlib.suppress(Exception):
            run.finish(exit_code=1)
        return None


def main(argv: list[str] | None = None) -> None:
    """Command line: run one training job with a PrintReporter."""
    parser = argparse.ArgumentParser(description="Fine-tune a local model (tuneforge training recipe).")
    parser.add_argument("--config", type=Path, required=True, help="TrainingConfig as JSON")
    parser.add_argument("--model", type=Path, required=True, help="local model directory")
    parser.add_argument("--train", type=Path, required=True, help="training JSONL")
    parser.add_argument("--validation", type=Path, default=None, help="validation JSONL")
    parser.add_argument("--output", type=Path, required=True, help="output directory")
    parser.add_argument("--resume", type=Path, default=None, help="checkpoint directory to resume from")
    args = parser.parse_args(argv)
    config = TrainingConfig.model_validate_json(args.config.read_text())
    result = train(
        config,
        model_path=args.model,
        train_file=args.train,
        validation_file=args.validation,
        output_dir=args.output,
        reporter=PrintReporter(),
        resume_from=args.resume,
    )
    if not distributed.from_environment().is_main:
        return  # under torchrun, rank 0 prints the result
    print(
        json.dumps(
            {
                "type": "result",
                "final_dir": str(result.final_dir),
                "steps": result.steps,
                "trained_tokens": result.trained_tokens,
                "metrics_csv": str(result.metrics_csv),
            }
        )
    )


if __name__ == "__main__":
    main()
