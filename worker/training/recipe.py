"""Supervised fine-tuning recipe: load model, prepare data, train, evaluate, save.

Reads top to bottom like torchtune's recipes and nanoGPT's train.py: a plain PyTorch loop with
gradient accumulation, a per-step report to the caller, checkpoints that resume exactly, evaluation
with early stopping, and a final adapter (or full model) in a directory ready to serve.
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
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.schemas.training import TrainingConfig
from worker.training import checkpoint as ckpt
from worker.training import distributed, stopping
from worker.training.data import (
    IGNORE_INDEX,
    MAX_TOKENS_PER_FORWARD,
    EpochPlan,
    batch_to_device,
    collate,
    load_examples,
    plan_epoch,
    split_by_tokens,
)
from worker.training.evaluate import evaluate, forward_logits, token_loss_sum
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
CSV_COLUMNS = [
    "step", "total_steps", "epoch", "train_loss", "train_mean_token_accuracy", "learning_rate",
    "tokens_per_second", "trained_tokens", "valid_loss", "valid_perplexity", "valid_mean_token_accuracy",
    "full_valid_loss", "full_valid_perplexity", "full_valid_mean_token_accuracy",
]  # fmt: skip
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


def make_optimizer(model: Any, config: TrainingConfig) -> Any:
    """AdamW; weight decay only on matrices, not on biases and norm scales (nanoGPT's split)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.learning_rate)


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
    # ---- processes, hardware and precision, before any weights load ----
    procs = distributed.from_environment()
    if config.processes != procs.world_size:
        raise ValueError(
            f"the job asks for {config.processes} training process(es) but this run has {procs.world_size}; "
            f"start it with torchrun --nproc-per-node {config.processes} (the worker does this itself)"
        )
    strategy = config.distributed
    if strategy == "fsdp" and config.adapter.type == "qlora":
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
    resume_state = ckpt.load_checkpoint(resume_from) if resume_from else None

    import torch
    from transformers import AutoTokenizer, get_scheduler

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(config.seed)
    distributed.start(procs, device)
    full = config.adapter.type == "full"

    def autocast() -> AbstractContextManager[Any]:
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    # ---- data: tokenise once, plan every epoch's batch order from the seed ----
    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True, trust_remote_code=trust_remote_code)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_examples = load_examples(
        Path(train_file), tokenizer, max_seq_length=config.max_seq_length,
        train_on_inputs=config.train_on_inputs, reporter=reporter,
    )  # fmt: skip
    valid_examples = []
    if validation_file is not None:
        valid_examples = load_examples(
            Path(validation_file), tokenizer, max_seq_length=config.max_seq_length,
            train_on_inputs=config.train_on_inputs, reporter=reporter,
        )  # fmt: skip
    lengths = [len(e.input_ids) for e in train_examples]
    plans = [
        plan_epoch(lengths, batch_size=config.batch_size, max_seq_length=config.max_seq_length,
                   packing=config.packing, seed=config.seed + epoch)
        for epoch in range(config.n_epochs)
    ]  # fmt: skip
    accum = config.gradient_accumulation_steps
    steps_per_epoch = [math.ceil(len(plan) / accum) for plan in plans]
    total_steps = sum(steps_per_epoch)

    def eval_plan(n_examples: int) -> EpochPlan:
        order = sorted(range(n_examples), key=lambda i: len(valid_examples[i].input_ids))
        return [[[i] for i in order[k : k + config.batch_size]] for k in range(0, n_examples, config.batch_size)]

    subset_plan = eval_plan(min(len(valid_examples), VALID_SUBSET_EXAMPLES))
    full_plan = eval_plan(len(valid_examples))
    eval_at = evaluation_steps(config, total_steps) if valid_examples else set()
    save_at = ckpt.checkpoint_steps(total_steps, save_steps=config.save_steps, n_checkpoints=config.n_checkpoints)

    # ---- model, optimizer, schedule ----
    model = load_model(config, Path(model_path), device=device, dtype=dtype, init_adapter=init_adapter,
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
    if resume_state is not None:  # before wrapping: FSDP shards the weights it finds
        ckpt.load_weights(model, Path(resume_from), full=full)  # type: ignore[arg-type]
    # What the training step calls: the model itself, DDP around it, or (FSDP) the model sharded in place.
    wrapped = distributed.wrap(model, group=procs, strategy=strategy, device=device)
    sharded = procs.enabled and strategy == "fsdp"
    optimizer = make_optimizer(model, config)
    scheduler = get_scheduler(
        SCHEDULERS[config.lr_scheduler],
        optimizer,
        num_warmup_steps=math.ceil(config.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    # fp16 needs loss scaling so small gradients do not underflow; bf16 and fp32 do not.
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    on = f"{procs.world_size} {device.type} processes ({strategy})" if procs.enabled else device.type
    reporter.event(
        f"training {config.adapter.type} on {on} in {str(dtype).removeprefix('torch.')}: "
        f"{len(train_examples)} train / {len(valid_examples)} validation examples, {total_steps} steps, "
        f"{trainable:,} of {total:,} parameters trainable",
        data={"total_steps": total_steps, "trainable_parameters": trainable, "parameters": total,
              "processes": procs.world_size},
    )

    # ---- state, restored from a checkpoint when resuming ----
    state: dict[str, Any] = {
        "step": 0, "epoch": 0, "next_batch": 0, "trained_tokens": 0, "valid_loss": None,
        "best_valid_loss": None, "best_step": None, "evals_without_improvement": 0, "log_history": [],
    }  # fmt: skip
    resumed_plan: EpochPlan | None = None
    if resume_state is not None:
        assert resume_from is not None
        distributed.load_optimizer_state(model, optimizer, resume_state["optimizer"], group=procs, strategy=strategy)
        scheduler.load_state_dict(resume_state["scheduler"])
        saved = resume_state["trainer_state"]
        if saved["total_steps"] != total_steps:
            raise ValueError(
                f"checkpoint was made for a run of {saved['total_steps']} steps, this one has {total_steps}; "
                "resume with the same config and data"
            )
        state.update({k: saved[k] for k in state})
        if saved.get("grad_scaler") and scaler.is_enabled():
            scaler.load_state_dict(saved["grad_scaler"])
        resumed_plan = saved["batch_order"]
        rank_rng = [resume_state["rng"], *resume_state["rank_rng"]]
        if procs.rank < len(rank_rng):
            ckpt.restore_rng_state(rank_rng[procs.rank])
        else:  # a checkpoint from a run with fewer processes: this one's dropout stream starts afresh
            torch.manual_seed(config.seed + procs.rank)
        reporter.event(f"resumed from checkpoint at step {state['step']}", data={"step": state["step"]})
    elif procs.rank > 0:
        torch.manual_seed(config.seed + procs.rank)  # same weights everywhere, but each its own dropout

    metrics_csv = output_dir / "metrics.csv"
    # Only rank 0 writes files: the processes of one run share output_dir.
    csv_file = open(metrics_csv, "w", newline="") if procs.is_main else io.StringIO()  # noqa: SIM115 - closed below
    csv_writer = csv.DictWriter(csv_file, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    csv_writer.writeheader()
    csv_writer.writerows(state["log_history"])
    wandb_run = _start_wandb(wandb, config, reporter) if wandb and procs.is_main else None  # None if it failed

    def save(step: int, plan: EpochPlan | None) -> Path:
        """Write a checkpoint (rank 0 writes; under FSDP every process first hands over its shards)."""
        trainer_state = {**state, "total_steps": total_steps, "batch_order": plan, "config": config.model_dump(),
                         "grad_scaler": scaler.state_dict()}  # fp16's loss scale ({} when unused)
        weights = distributed.full_state_dict(model, group=procs, strategy=strategy) if sharded else None
        optimizer_state = distributed.optimizer_state(model, optimizer, group=procs, strategy=strategy)
        rank_rng = distributed.all_gather(procs, ckpt.capture_rng_state())[1:]
        path = output_dir / "checkpoints" / f"step-{step}"
        if procs.is_main:
            path = ckpt.save_checkpoint(
                output_dir, step=step, model=model, full=full, optimizer=optimizer, scheduler=scheduler,
                trainer_state=trainer_state, weights=weights, optimizer_state=optimizer_state, rank_rng=rank_rng,
            )  # fmt: skip
            # The best step is kept by number too: its valid_loss may tie a later, not-better-enough one.
            ckpt.prune_checkpoints(output_dir, keep_steps={state["best_step"]} if state["best_step"] else set())
            reporter.checkpoint_saved(step=step, path=path, metrics=state["log_history"][-1])
        distributed.barrier(procs)  # the directory is complete before any process reads it
        return path

    def evaluate_shared(plan: EpochPlan) -> dict[str, float]:
        """Each process evaluates its share of the batches; torchmetrics sums the shares across processes."""
        mine = plan[procs.rank :: procs.world_size]
        # Under FSDP every forward pass gathers weights from all processes: all run the same number.
        passes = distributed.all_max(procs, len(mine)) if sharded else None
        return evaluate(model, mine, valid_examples, pad_id=pad_id, device=device, autocast=autocast,
                        forward_passes=passes, filler=plan[0])  # fmt: skip

    # ---- train ----
    model.train()
    metrics: dict[str, Any] = {}
    stop_reason: str | None = None
    try:
        while state["step"] < total_steps and stop_reason is None:
            epoch = state["epoch"]
            plan = resumed_plan if resumed_plan is not None else plans[epoch]
            resumed_plan = None
            batch_index = state["next_batch"]
            group = plan[batch_index : batch_index + accum]
            started = time.perf_counter()
            # Each process takes every world_size-th row of each batch (all of it when alone).
            micro_batches = [
                batch_to_device(collate(part, train_examples, pad_id=pad_id, packing=config.packing), device)
                for b in group
                for part in split_by_tokens(b[procs.rank :: procs.world_size], lengths,
                                            max_tokens=MAX_TOKENS_PER_FORWARD)
            ]  # fmt: skip
            # Gradients cross processes in every process's last backward, so all run the same number:
            # one with fewer micro-batches runs weightless repeats of the step's first row.
            n_passes = distributed.all_max(procs, len(micro_batches))
            filler = group[0][:1]
            # Normalise by the labelled tokens of the whole accumulated step (over all processes), so the
            # step's loss is the true token mean whatever the micro-batch split, padding or process count.
            local_tokens = sum(int((mb["labels"][:, 1:] != IGNORE_INDEX).sum()) for mb in micro_batches)
            step_tokens = int(distributed.all_sum(procs, [local_tokens])[0])
            loss_total, correct = 0.0, 0
            for k in range(n_passes):
                real = k < len(micro_batches)
                mb = micro_batches[k] if real else batch_to_device(
                    collate(filler, train_examples, pad_id=pad_id, packing=config.packing), device)
                with distributed.accumulate(wrapped, group=procs, strategy=strategy, sync=k == n_passes - 1):
                    with autocast():
                        logits = forward_logits(wrapped, mb)
                    loss_sum, _, n_correct = token_loss_sum(logits, mb["labels"])
                    # DDP and FSDP average gradients over processes; scaling by their count makes that a sum.
                    loss = loss_sum / step_tokens * procs.world_size if real else loss_sum * 0.0
                    scaler.scale(loss).backward()
                if real:
                    loss_total += (loss_sum / step_tokens).item()
                    correct += n_correct
            loss_total, summed_correct, summed_tokens = distributed.all_sum(
                procs, [loss_total, correct, sum(mb["n_tokens"] for mb in micro_batches)])
            correct, real_tokens = int(summed_correct), int(summed_tokens)
            state["step"] += 1
            step = state["step"]
            if not math.isfinite(loss_total):
                raise TrainingDiverged(
                    f"the training loss became {loss_total} at step {step}; lower learning_rate "
                    f"(now {config.learning_rate:g}) or use a more stable precision (bf16 or fp32)"
                )
            scaler.unscale_(optimizer)
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            learning_rate = scheduler.get_last_lr()[0]
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["trained_tokens"] += real_tokens
            elapsed = time.perf_counter() - started

            # Advance the data position first: a checkpoint saved below resumes at the next batch.
            state["next_batch"] = batch_index + len(group)
            if state["next_batch"] >= len(plan):
                state["epoch"], state["next_batch"] = epoch + 1, 0
            metrics = {
                "step": step,
                "total_steps": total_steps,
                "epoch": round(epoch + min(batch_index + len(group), len(plan)) / len(plan), 4),
                "train_loss": loss_total,
                "train_mean_token_accuracy": correct / step_tokens,
                "learning_rate": learning_rate,
                "tokens_per_second": real_tokens / elapsed,
                "trained_tokens": state["trained_tokens"],
            }

            new_best = False
            state["valid_loss"] = None  # the valid_loss of these weights, if evaluated this step
            if step in eval_at:
                valid = evaluate_shared(subset_plan)
                metrics.update({"valid_loss": valid["loss"], "valid_perplexity": valid["perplexity"],
                                "valid_mean_token_accuracy": valid["mean_token_accuracy"]})  # fmt: skip
                state["valid_loss"] = valid["loss"]
                best = state["best_valid_loss"]
                if best is None or best - valid["loss"] > config.early_stopping_threshold:
                    state.update(best_valid_loss=valid["loss"], best_step=step, evals_without_improvement=0)
                    new_best = True
                else:
                    state["evals_without_improvement"] += 1
                patience = config.early_stopping_patience
                if patience is not None and state["evals_without_improvement"] >= patience:
                    stop_reason = (
                        f"early stopping at step {step}: valid_loss has not improved by more than "
                        f"{config.early_stopping_threshold:g} for {patience} evaluation(s); best "
                        f"{state['best_valid_loss']:.4f} at step {state['best_step']}"
                    )
            last = step == total_steps or stop_reason is not None
            if last and valid_examples:
                valid = evaluate_shared(full_plan)
                metrics.update({"full_valid_loss": valid["loss"], "full_valid_perplexity": valid["perplexity"],
                                "full_valid_mean_token_accuracy": valid["mean_token_accuracy"]})  # fmt: skip
            state["log_history"].append(metrics)
            reporter.metrics(metrics)
            csv_writer.writerow(metrics)
            csv_file.flush()
            if wandb_run is not None:
                wandb_run = _log_to_wandb(wandb_run, metrics, step=step, reporter=reporter)
            if stop_reason is not None:
                reporter.event(stop_reason, data={"step": step, "best_step": state["best_step"]})

            next_plan = (
                plan if state["epoch"] == epoch else (plans[state["epoch"]] if state["epoch"] < len(plans) else None)
            )
            saved_now = step in save_at or last or (config.load_best_at_end and new_best)
            if saved_now:
                save(step, next_plan)
            command = next_command(procs, reporter.control())  # rank 0 asks; every process obeys
            if command == "cancel":
                raise TrainingCancelled(f"training cancelled at step {step}")
            if command in ("pause", "release"):
                path = output_dir / "checkpoints" / f"step-{step}" if saved_now else save(step, next_plan)
                raise TrainingPaused(path) if command == "pause" else TrainingReleased(path)
            if command == "checkpoint" and not saved_now:
                save(step, next_plan)
    finally:
        csv_file.close()
        if wandb_run is not None:
            with contextlib.suppress(Exception):  # the run is over; W&B's own troubles must not fail it
                wandb_run.finish()

    # ---- save the final adapter / model (rank 0 writes) ----
    if config.load_best_at_end and state["best_step"] is not None:
        best_dir = output_dir / "checkpoints" / f"step-{state['best_step']}"
        if sharded:  # every process loads its shard of the best weights
            best = ckpt.read_weights(best_dir, full=full, model_keys=list(model.state_dict()))
            distributed.load_full_state_dict(model, best, group=procs, strategy=strategy)
        elif procs.is_main:
            ckpt.load_weights(model, best_dir, full=full)
        reporter.event(
            f"loaded the best checkpoint (step {state['best_step']}, valid_loss "
            f"{state['best_valid_loss']:.4f}) as the final weights",
            data={"step": state["best_step"], "valid_loss": state["best_valid_loss"]},
        )
    final_dir = output_dir / "final"
    weights = distributed.full_state_dict(model, group=procs, strategy=strategy) if sharded else None
    if procs.is_main:
        if weights is None:
            model.save_pretrained(str(final_dir), safe_serialization=True)
        else:
            model.save_pretrained(str(final_dir), safe_serialization=True, state_dict=weights)
        tokenizer.save_pretrained(final_dir)
        (final_dir / "training_config.json").write_text(json.dumps(config.model_dump(), indent=2))
    # The directory stays out of the event: events reach clients, and the server's paths are not theirs.
    reporter.event(f"saved the final {'model' if full else 'adapter'} after {state['step']} steps",
                   data={"step": state["step"]})
    distributed.barrier(procs)
    distributed.stop(procs)
    return TrainingResult(
        final_dir=final_dir,
        steps=state["step"],
        total_steps=total_steps,
        trained_tokens=state["trained_tokens"],
        final_metrics=metrics or (state["log_history"][-1] if state["log_history"] else {}),
        metrics_csv=metrics_csv,
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
