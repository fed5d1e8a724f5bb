"""DPO benchmark: tuneforge's DPO training against TRL's DPOTrainer, side by side in one run.

    python -m bench.dpo            # the figures in docs/benchmarks.md (~25M Llama-shape model, many minutes on 2 cores)
    python -m bench.dpo --quick    # CI smoke run on the tests' tiny model (no timing assertion)

Every row trains the same locally built model on the same preference pairs (a chat whose prompt is longer than
its answers; the preferred answer starts with "ok", the non-preferred one with "no", the rest is the same), with
the same token ids (tuneforge tokenises; TRL tokenises the same records with the same chat template, and the run
checks that its ids are identical), the same LoRA (r=16, alpha 32, dropout 0, on every linear layer of the decoder
by name), AdamW (lr 5e-4, linear decay, no warmup, weight decay 0, clip 1.0), 8 pairs per optimizer step, 2 epochs
(1 in --quick), the sigmoid (DPO) loss with beta 0.1, no validation during training; on CUDA every row is bf16.
Rows (a row's name says its departures from the like-for-like settings, see Row):

- tuneforge: worker.training.recipe.train with method "dpo": the reference log-probs computed once before
  training with the adapter disabled, each prompt run once for both its answers (one row per pair: the prompt,
  then both answers, each masked to see the prompt and itself), length-grouped batches split into
  forward passes of at most MAX_TOKENS_PER_FORWARD tokens (MAX_TOKENS_PER_CHECKPOINTED_FORWARD in the rows that
  checkpoint), the output layer on the answer positions only; fp32 on
  a CPU (its default);
- trl: DPOTrainer with the settings that were fastest and leanest here: precompute_ref_log_probs=True (one
  reference pass before training, kept with the data, as tuneforge; the default re-scores the base model in every
  step), train_sampling_strategy="group_by_length" (length-grouped batches, as tuneforge; the default samples at
  random), gradient_checkpointing=False (TRL's default is True: ~30% slower for less activation memory; off as in
  tuneforge), its default fused AdamW, max_length 1024 (nothing is cut); padding_free is not available in TRL
  1.16's DPOTrainer (it warns and pads), liger kernels and torch.compile are off (no CUDA; compiling for every
  batch shape costs more than these short runs). fp32, as tuneforge's row;
- tuneforge-bf16 / trl-bf16: the same in bf16 (base weights in bf16, bf16 autocast, adapters in fp32): TRL's own
  default precision, and this CPU's bf16 matmuls are ~2.7x its fp32 ones (AVX-512 BF16);
- trl-bf16-inline: trl-bf16 with TRL's default reference handling (the base model scored in every step, adapter
  disabled), which measured as fast as precomputing in the exploration runs, so it is kept as a peer;
- on request (--rows): -gc rows (gradient checkpointing on both), trl-inline, trl-random, trl-bf16-random.

Pairs per second = training pairs processed (pairs x epochs) / wall time of training, model load and
tokenisation excluded, the reference pass included for every row (tuneforge: from its "training ..." event,
which comes right before the reference pass, to the last step's metrics; TRL: its precompute pass plus
trainer.train()). Peak memory is each row's peak RSS in its own spawned process (every row imports the same
libraries first, so their import footprint, printed as "imports MB", is the same), or the CUDA peak allocation.
Validation preference accuracy is computed identically for every row after training, from its saved adapter:
the share of held-out pairs whose chosen reward beta * (log pi(chosen) - log ref(chosen)) beats the rejected
one, with tuneforge's scoring functions (worker.training.preference) and the base model as the reference.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import platform
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.train import _count, generate_texts, peak_memory_mb, trl_version
from bench.train_rows import TimedReporter

BATCH = 8
BETA = 0.1
LEARNING_RATE = 5e-4
MAX_SEQ_LENGTH = 1024
LORA = {"r": 16, "alpha": 32, "dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
SYSTEM_PROMPT = ("You are a helpful assistant for a data team. Answer the user's question in one short paragraph, "
                 "and start every answer with the word ok.")
# A row's name says what it runs: "tuneforge" or "trl", then its departures from the like-for-like settings:
# -bf16 (bf16 weights and autocast on a CPU too), -gc (gradient checkpointing), -inline (TRL's default reference:
# the base model scored again in every step), -random (TRL without length-grouped batches).
ROWS = ("tuneforge", "trl", "tuneforge-bf16", "trl-bf16", "trl-bf16-inline")
EXTRA_ROWS = ("tuneforge-gc", "trl-gc", "tuneforge-bf16-gc", "trl-bf16-gc", "trl-inline", "trl-random",
              "trl-bf16-random")
TRL_ONLY_FLAGS = ("inline", "random")


@dataclass(frozen=True)
class Row:
    """One row's settings, read from its name."""

    name: str

    @property
    def system(self) -> str:
        return self.name.split("-")[0]

    def has(self, flag: str) -> bool:
        return flag in self.name.split("-")[1:]

    def bf16(self) -> bool:
        import torch

        return self.has("bf16") or torch.cuda.is_available()

    def peers(self, other: Row) -> bool:
        """A tuneforge row and a TRL row at the same settings (TRL's own reference and sampling options aside)."""
        flags = {f for f in other.name.split("-")[1:] if f not in TRL_ONLY_FLAGS}
        return self.system == "tuneforge" and other.system == "trl" and set(self.name.split("-")[1:]) == flags


@dataclass(frozen=True)
class Setup:
    """What one benchmark mode trains: model size, data shape and epochs."""

    model: dict[str, Any]  # make_tiny_model keyword arguments
    n_train: int
    n_valid: int
    prompt_words: int  # median user-message length (lognormal)
    answer_words: int  # median answer length (lognormal)
    epochs: int


FULL = Setup(model={"hidden": 512, "layers": 8, "heads": 8, "kv_heads": 4, "intermediate": 1536,
                    "initializer_range": 0.04},
             n_train=64, n_valid=64, prompt_words=96, answer_words=24, epochs=2)
QUICK = Setup(model={}, n_train=16, n_valid=8, prompt_words=24, answer_words=6, epochs=1)


# ---------------------------------------------------------------- data
def preference_records(n: int, setup: Setup, *, seed: int) -> list[dict[str, Any]]:
    """OpenAI DPO records: a system prompt and a long user message; answers "ok ..." (preferred) and "no ..."."""
    prompts = generate_texts(n, median_tokens=setup.prompt_words, max_tokens=4 * setup.prompt_words, seed=seed)
    bodies = generate_texts(n, median_tokens=setup.answer_words, max_tokens=4 * setup.answer_words, seed=seed + 100)
    rng = random.Random(seed)
    records = []
    for prompt, body in zip(prompts, bodies, strict=True):
        if rng.random() < 0.5:  # some conversations carry an earlier exchange
            history = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "ok hello"}]
        else:
            history = []
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, *history, {"role": "user", "content": prompt}]
        records.append({"input": {"messages": messages},
                        "preferred_output": [{"role": "assistant", "content": f"ok {body}"}],
                        "non_preferred_output": [{"role": "assistant", "content": f"no {body}"}]})
    return records


def write_pairs(root: Path, setup: Setup) -> tuple[Path, Path]:
    train, valid = root / "train.jsonl", root / "valid.jsonl"
    for path, n, seed in ((train, setup.n_train, 1), (valid, setup.n_valid, 2)):
        path.write_text("".join(json.dumps(r) + "\n" for r in preference_records(n, setup, seed=seed)))
    return train, valid


def tokenized_pairs(path: Path, model_dir: Path) -> list[Any]:
    """tuneforge's own tokenisation of a preference file (the ids every row must train on)."""
    from transformers import AutoTokenizer

    from tests.support.reporters import RecordingReporter
    from worker.training.dpo import load_pairs

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return load_pairs(path, tokenizer, max_seq_length=MAX_SEQ_LENGTH, reporter=RecordingReporter())


# ---------------------------------------------------------------- rows
def run_tuneforge(model_dir: Path, train_file: Path, work: Path, *, setup: Setup, row: Row) -> dict[str, Any]:
    from app.schemas.training import TrainingConfig
    from worker.training.recipe import train

    config = TrainingConfig.model_validate({
        "method": "dpo", "preference": {"beta": BETA, "loss_type": "sigmoid"},
        "adapter": {"type": "lora", **LORA}, "n_epochs": setup.epochs, "batch_size": BATCH,
        "learning_rate": LEARNING_RATE, "lr_scheduler": "linear", "warmup_ratio": 0.0, "weight_decay": 0.0,
        "max_grad_norm": 1.0, "max_seq_length": MAX_SEQ_LENGTH,
        "precision": "bf16" if row.bf16() else "fp32", "seed": 42, "gradient_checkpointing": row.has("gc"),
    })

    reporter = TimedReporter()
    result = train(config, model_path=model_dir, train_file=train_file, validation_file=None,
                   output_dir=work / row.name, reporter=reporter)
    losses = reporter.losses()
    return {"seconds": reporter.finished - reporter.started,
            "cpu_seconds": reporter.cpu_finished - reporter.cpu_started,
            "reference_seconds": next((t for message, t in reporter.since_start.items()
                                       if message.startswith("computed the reference")), 0.0),
            "steps": result.steps,
            "train_loss": sum(losses[-2:]) / len(losses[-2:]),
            "train_accuracy": reporter.steps[-1]["train_preference_accuracy"],
            "adapter_dir": str(result.final_dir), "peak_mb": peak_memory_mb()}


def run_trl(model_dir: Path, train_file: Path, work: Path, *, setup: Setup, row: Row, expected: list[Any]
            ) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from trl import DPOConfig, DPOTrainer

    cuda = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # As tuneforge's LoRA runs: the frozen base in the compute dtype (PEFT keeps the adapter in fp32).
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if row.bf16() else torch.float32)
    if cuda:
        model.to("cuda")
    records = [json.loads(line) for line in train_file.read_text().splitlines() if line.strip()]
    dataset = Dataset.from_list([{"prompt": r["input"]["messages"], "chosen": r["preferred_output"],
                                  "rejected": r["non_preferred_output"]} for r in records])
    args = DPOConfig(
        output_dir=str(work / row.name), per_device_train_batch_size=BATCH, num_train_epochs=setup.epochs,
        learning_rate=LEARNING_RATE, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        beta=BETA, loss_type=["sigmoid"], max_length=MAX_SEQ_LENGTH, precompute_ref_log_probs=not row.has("inline"),
        train_sampling_strategy="random" if row.has("random") else "group_by_length",
        gradient_checkpointing=row.has("gc"), bf16=row.bf16(), dataloader_pin_memory=cuda,
        use_cpu=not cuda,  # transformers refuses bf16 on a CPU unless told it is one
        logging_steps=1, save_strategy="no", report_to=[], seed=42, data_seed=42, dataloader_num_workers=0,
        disable_tqdm=True,
        # Kept so the sampler sees the "length" column added below (TRL's own columns are all the collator reads).
        remove_unused_columns=False,
    )
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                             target_modules=LORA["target_modules"], task_type="CAUSAL_LM")

    class TimedDPOTrainer(DPOTrainer):
        """Times the reference pass, which DPOTrainer runs inside __init__ when precompute_ref_log_probs is on."""

        reference_seconds = 0.0
        reference_cpu_seconds = 0.0

        def _precompute_ref_logps(self, *a: Any, **k: Any) -> Any:
            started, cpu_started = time.perf_counter(), time.process_time()
            try:
                return super()._precompute_ref_logps(*a, **k)
            finally:
                TimedDPOTrainer.reference_seconds += time.perf_counter() - started
                TimedDPOTrainer.reference_cpu_seconds += time.process_time() - cpu_started

    trainer = TimedDPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                              peft_config=peft_config)
    trainer.remove_callback(PrinterCallback)  # the per-step log dicts on stdout
    _check_same_ids(trainer.train_dataset, expected)
    # group_by_length reads each pair's length from a "length" column (DPO rows have no "input_ids" to measure).
    prepared = trainer.train_dataset.remove_columns(["prompt", "chosen", "rejected"])
    trainer.train_dataset = prepared.add_column("length", [2 * len(row["prompt_ids"]) + len(row["chosen_ids"]) +
                                                           len(row["rejected_ids"]) for row in prepared])
    started, cpu_started = time.perf_counter(), time.process_time()
    trainer.train()
    seconds = time.perf_counter() - started + TimedDPOTrainer.reference_seconds
    cpu_seconds = time.process_time() - cpu_started + TimedDPOTrainer.reference_cpu_seconds
    adapter_dir = work / row.name / "final"
    trainer.save_model(str(adapter_dir))
    peak_mb = peak_memory_mb()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "reference_seconds": TimedDPOTrainer.reference_seconds,
            "steps": trainer.state.global_step, "train_loss": sum(h["loss"] for h in logs[-2:]) / len(logs[-2:]),
            "train_accuracy": logs[-1]["rewards/accuracies"], "adapter_dir": str(adapter_dir), "peak_mb": peak_mb}


def _check_same_ids(dataset: Any, expected: list[Any]) -> None:
    """TRL's tokenisation of the records must give tuneforge's ids, pair by pair (else the rows are not comparable)."""
    if len(dataset) != len(expected):
        raise AssertionError(f"TRL kept {len(dataset)} pairs, tuneforge {len(expected)}")
    for i, (row, pair) in enumerate(zip(dataset, expected, strict=True)):
        if (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) != \
                (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids):
            raise AssertionError(f"pair {i}: TRL's token ids differ from tuneforge's")


def valid_accuracy(model_dir: Path, adapter_dir: Path, valid: list[Any]) -> dict[str, float]:
    """Preference accuracy and mean reward margin of a saved adapter on the validation pairs (tuneforge's formulas;
    the reference is the base model, the adapter disabled)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from worker.training.preference import collate_pairs, preference_loss, reference_logps, sequence_logps

    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).to(device).eval()
    pad_id = base.config.pad_token_id or 0
    correct, margin = 0, 0.0
    for start in range(0, len(valid), BATCH):
        batch = {k: v.to(device) if hasattr(v, "to") else v
                 for k, v in collate_pairs(valid[start : start + BATCH], pad_id=pad_id).items()}
        with torch.no_grad():
            policy, counts = sequence_logps(model, batch)
        reference, _ = reference_logps(model, batch)
        k = policy.size(0) // 2
        _, chosen, rejected = preference_loss(policy[:k], policy[k:], reference[:k], reference[k:],
                                              loss_type="sigmoid", beta=BETA, chosen_lengths=counts[:k],
                                              rejected_lengths=counts[k:])
        correct += int((chosen > rejected).sum())
        margin += float((chosen - rejected).sum())
    return {"valid_accuracy": correct / len(valid), "valid_margin": margin / len(valid)}


def run_row(name: str, model_dir: str, train_file: str, valid_file: str, work: str, setup: Setup) -> dict[str, Any]:
    """Train one row (in its own process unless in-process) and measure it."""
    # Every row imports the same libraries before anything else, so their peaks share one import footprint.
    import warnings

    os.environ["TQDM_DISABLE"] = "1"  # TRL's reference pass reads it
    # transformers 5's renames (gradient_checkpointing -> activation_checkpointing), said once per row otherwise.
    warnings.filterwarnings("ignore", category=FutureWarning)
    import datasets
    import peft  # noqa: F401
    import torch
    import transformers
    import trl  # noqa: F401

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()

    import worker.training.recipe  # noqa: F401
    from tests.support.reporters import RecordingReporter  # noqa: F401

    # This process's own high-water mark (VmHWM): a spawned child's ru_maxrss starts at its parent's RSS, which
    # carries over the fork and exec; the CUDA peak allocation (nothing yet) on a GPU, as peak_mb is measured.
    imports_mb = peak_memory_mb()
    model_path, root = Path(model_dir), Path(work)
    torch.manual_seed(42)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    row = Row(name)
    if row.system == "tuneforge":
        out = run_tuneforge(model_path, Path(train_file), root, setup=setup, row=row)
    else:
        out = run_trl(model_path, Path(train_file), root, setup=setup, row=row,
                      expected=tokenized_pairs(Path(train_file), model_path))
    out["imports_mb"] = imports_mb
    out.update(valid_accuracy(model_path, Path(out.pop("adapter_dir")), tokenized_pairs(Path(valid_file), model_path)))
    return out


# ---------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    parser = argparse.ArgumentParser(description="tuneforge DPO against TRL's DPOTrainer: pairs/s, memory, accuracy.")
    parser.add_argument("--quick", action="store_true", help="CI smoke run on the tiny model")
    parser.add_argument("--in-process", action="store_true",
                        help="run every row in this process (faster start; peak RSS is then cumulative)")
    parser.add_argument("--dir", type=Path, default=None, help="scratch directory (default: a temp dir, removed)")
    parser.add_argument("--rows", default=",".join(ROWS),
                        help=f"comma-separated rows, in order (default: all of them; also: {','.join(EXTRA_ROWS)})")
    parser.add_argument("--pairs", type=int, default=None, help="training pairs (full mode: 128)")
    args = parser.parse_args(argv)
    setup = QUICK if args.quick else FULL
    if args.pairs:
        setup = dataclasses.replace(setup, n_train=args.pairs)
    rows = args.rows.split(",")
    unknown = set(rows) - set(ROWS) - set(EXTRA_ROWS)
    if unknown:
        parser.error(f"unknown rows: {', '.join(sorted(unknown))}")
    if not trl_version():
        raise SystemExit("bench.dpo compares against TRL: install trl")
    in_process = args.in_process or args.quick

    import peft
    import torch
    import transformers

    from worker.training.dpo import pair_tokens
    from worker.training.tiny_model import make_tiny_model

    rows = runnable_rows(rows)
    root = Path(tempfile.mkdtemp(prefix="bench-dpo-", dir=args.dir))
    try:
        model_dir = make_tiny_model(root / "model", seed=0, **setup.model)
        train_file, valid_file = write_pairs(root, setup)
        pairs = tokenized_pairs(train_file, model_dir)
        prompts = sorted(len(p.prompt_ids) for p in pairs)
        answers = sorted(len(a) for p in pairs for a in (p.chosen_ids, p.rejected_ids))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        print(f"device: {device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads); "
              f"precision {'bfloat16' if device == 'cuda' else 'float32 (bfloat16 in -bf16 rows)'}; "
              f"torch {torch.__version__}, "
              f"transformers {transformers.__version__}, peft {peft.__version__}, trl {trl_version()}")
        print(f"model: {_count(model_dir):,} parameters; data: {len(pairs)} train pairs x {setup.epochs} epoch(s), "
              f"{setup.n_valid} validation pairs; prompt tokens {prompts[0]}..{prompts[-1]} (median "
              f"{prompts[len(prompts) // 2]}), answer tokens {answers[0]}..{answers[-1]} (median "
              f"{answers[len(answers) // 2]}); {sum(pair_tokens(p) for p in pairs):,} tokens per epoch "
              f"(each prompt once, each answer once)", flush=True)
        results: dict[str, dict[str, Any]] = {}
        for name in rows:
            load = os.getloadavg()[0]
            call = (name, str(model_dir), str(train_file), str(valid_file), str(root), setup)
            if in_process:
                results[name] = run_row(*call)
            else:
                context = multiprocessing.get_context("spawn")
                with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                    results[name] = pool.submit(run_row, *call).result()
            r = results[name]
            r["pairs"] = len(pairs) * setup.epochs
            r["load"] = load
            r["pairs_per_second"] = r["pairs"] / r["seconds"]
            r["pairs_per_cpu_second"] = r["pairs"] / r["cpu_seconds"]
            # Each row's figures as soon as it ends, so a run cut short still says what it measured.
            print(f"  ran {name}: {r['steps']} steps, {r['seconds']:.1f} s ({r['cpu_seconds']:.1f} CPU-s, "
                  f"reference pass {r['reference_seconds']:.1f} s), {r['pairs_per_second']:.3f} pairs/s, "
                  f"peak {r['peak_mb']:.0f} MB (imports {r['imports_mb']:.0f}), valid accuracy "
                  f"{r['valid_accuracy']:.3f}, margin {r['valid_margin']:.3f}; load average {load:.1f} at its start",
                  flush=True)
        print_table(results)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return results


def runnable_rows(rows: list[str]) -> list[str]:
    """`rows` without the -bf16 ones on a CPU that has no bf16 instructions (tuneforge refuses bf16 there: such a
    CPU runs bf16 products hundreds of times slower than fp32), saying which were left out."""
    import torch

    from worker.training.model import cpu_bf16

    if torch.cuda.is_available() or cpu_bf16() != "none":
        return rows
    left_out = [name for name in rows if Row(name).has("bf16")]
    if left_out:
        print(f"left out {', '.join(left_out)}: this CPU has no bf16 instructions", flush=True)
    return [name for name in rows if name not in left_out]


def print_table(results: dict[str, dict[str, Any]]) -> None:
    header = (f"{'row':<14}{'steps':>6}{'pairs':>6}{'ref s':>7}{'train s':>9}{'pairs/s':>9}{'pairs/cpu-s':>12}"
              f"{'peak MB':>9}{'imports MB':>11}{'train loss':>11}{'train acc':>10}{'valid acc':>10}"
              f"{'valid margin':>13}")
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        print(f"{name:<14}{r['steps']:>6}{r['pairs']:>6}{r['reference_seconds']:>7.1f}{r['seconds']:>9.1f}"
              f"{r['pairs_per_second']:>9.2f}{r['pairs_per_cpu_second']:>12.2f}{r['peak_mb']:>9.0f}"
              f"{r['imports_mb']:>11.0f}{r['train_loss']:>11.4f}{r['train_accuracy']:>10.3f}"
              f"{r['valid_accuracy']:>10.3f}{r['valid_margin']:>13.4f}")
    pairs = [(ours, theirs) for ours in results for theirs in results if Row(ours).peers(Row(theirs))]
    for ours, theirs in pairs:
        a, b = results[ours], results[theirs]
        above = (a["peak_mb"] - a["imports_mb"]) / max(b["peak_mb"] - b["imports_mb"], 1.0)
        print(f"{ours}/{theirs}: pairs/s {a['pairs_per_second'] / b['pairs_per_second']:.2f}x (target >= 2; "
              f"per CPU-second {a['pairs_per_cpu_second'] / b['pairs_per_cpu_second']:.2f}x), "
              f"peak memory {a['peak_mb'] / b['peak_mb']:.2f}x (target <= 0.6; above imports {above:.2f}x), "
              f"valid accuracy {a['valid_accuracy']:.3f} vs {b['valid_accuracy']:.3f} (target: no lower)")


if __name__ == "__main__":
    main()
