"""Training benchmark: tuneforge's train() against the seed recipe, HF Trainer and TRL, side by side in one run.

    python -m bench.train            # the figures in docs/benchmarks.md (both shapes, ~27-32 min on 2 cores)
    python -m bench.train --shapes qwen2-152k          # one shape
    python -m bench.train --precision bf16             # every row in bf16 (MFU against the bf16 matmul peak)
    python -m bench.train --quick    # CI smoke run on tiny versions of both shapes (no timing assertion)

Two shapes (bench/train_data.py builds them locally; no download):

- llama-1k: the 26.2M-parameter Llama shape with a 1,024-token vocabulary, 96 generated long-tailed texts, every
  token in the loss;
- qwen2-152k: a Qwen2 model with Qwen2-0.5B's 151,936-token vocabulary and layer shape (hidden 896, 14 heads,
  2 KV heads, intermediate 4864, tied embeddings) but 4 layers, 32 generated chats whose prompts are long (median
  ~390 tokens) and answers short (~25 words), loss on the answers only (8% of the tokens) for every row.

Within a shape every row trains the same model on the same token ids and loss mask (tuneforge's tokenisation; the
peers receive those ids and labels, and the run checks that TRL keeps them), one epoch, the same LoRA (r=16,
alpha=32, dropout 0.05 on q_proj/v_proj), AdamW (lr 1e-3, linear decay, no warmup, weight decay 0, clip 1.0), 8
examples per optimizer step (the packed TRL row takes as many packed rows per step as gives the same number of
steps), no gradient checkpointing for LoRA rows (stated for TRL, whose default is on) and gradient checkpointing
for QLoRA rows (NF4 with double quantisation; prepare_model_for_kbit_training for the peers; tuneforge's is
selective, worker/training/checkpointing.py), fp32 on CPU (bf16
on CUDA; --precision bf16 for every row: frozen weights in bf16, adapters in fp32, bf16 autocast). QLoRA rows
train on the first `qlora_train` examples. Rows (bench/train_rows.py): seed (the recipe tuneforge grew from:
dataset padded to its longest example, labels include the padding), hf-dynamic, hf-grouped (HF Trainer,
group_by_length), trl, trl-padding-free, trl-packing (SFTTrainer), trl-liger (SFTTrainer padding-free with Liger's
Triton kernels, use_liger_kernel=True: on a CUDA device with liger-kernel installed, else skipped), tuneforge.

Throughput is real (non-padding) tokens per second of the training loop (model load, tokenisation and evaluation
excluded, for every row alike). Every row runs with the CPU math libraries' settings a worker process has
(worker/training/host.py: ideep's kernel cache capped, MKL's buffer pools off), which this process sets by importing
the worker package and its spawned rows inherit. Each row runs in its own spawned process (--in-process: all in
this one) under a memory limit and a time limit; a row that exceeds one is reported as such. Memory: the process's
peak RSS ("peak MB"), and the peak RSS during the training loop alone ("loop MB": the high-water mark is reset when the
loop starts, so model loading's transient copies are left out but everything held is in), or CUDA's peak
allocation. Validation loss is computed the same way for every row (worker.training.evaluate on the held-out
examples' labelled tokens). "best peer" is the HF/TRL row with the most real tokens/s; "leanest peer" the one with
the lowest peak memory; every ratio is tuneforge / that row. Each tuneforge row runs twice, before and after the
other rows of its adapter type (run_order): its time in the table is the mean of the two, its memory the higher
peak, so a drift of the machine's speed over those minutes falls on it as on its peers (the two runs' times are
printed).

MFU = achieved model FLOP/s / measured matmul peak (a 2048^3 torch.matmul at the training precision, timed in
this run: before a shape's rows, after them, and in each row's process after its row; the highest of them). On a
Zen 4 one run measured 208 before and 218 GFLOP/s after its rows, where the product alone measured 367-417, and
printed an MFU over 100%: a single reading can fall in a slow moment, so each row's process adds one. Model FLOPs per
real token (bench.train_rows.flops_per_token): 2N + 2N for the frozen decoder body (forward; backward computes
activation gradients only), the same for the output layer at labelled positions only, 6 N_lora for the adapters;
attention scores not counted. The same figure for every row of a shape.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.metadata
import math
import multiprocessing
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.train_data import generate_texts, make_qwen2_model, write_chats, write_texts
from bench.train_rows import (
    BATCH,
    LEARNING_RATE,
    LORA,
    Row,
    load_token_ids,
    matmul_peak,
    peak_memory_mb,
    run_row,
    run_row_process,
    tokenizer_for,
)

# The other benchmarks (dpo, evals, stop, memory, inference) train on the llama-1k shape with these settings.
__all__ = ["BATCH", "LEARNING_RATE", "LLAMA_1K", "LORA", "QUICK", "generate_texts", "main", "peak_memory_mb",
           "runnable_rows", "trl_version", "write_data"]

LLAMA_ROWS = ("seed", "hf-dynamic", "hf-grouped", "trl", "trl-padding-free", "trl-packing", "tuneforge",
              "seed-qlora", "tuneforge-qlora")
# No seed rows (the seed recipe has no prompt masking) and no packing row (it changes the number of steps) here.
# The Liger rows (TRL padding-free with Liger's Triton kernels, issue 18's GPU peer) run only on a CUDA device.
QWEN2_ROWS = ("hf-dynamic", "hf-grouped", "trl", "trl-padding-free", "trl-liger", "tuneforge",
              "hf-dynamic-qlora", "hf-grouped-qlora", "trl-qlora", "trl-padding-free-qlora", "trl-liger-qlora",
              "tuneforge-qlora")


@dataclass(frozen=True)
class Shape:
    """One benchmark model and its data."""

    name: str
    model: dict[str, Any]  # make_tiny_model or make_qwen2_model keyword arguments
    chat: bool  # chats with the loss on the answers only; else plain text, every token in the loss
    n_train: int
    n_valid: int
    data: dict[str, Any]  # write_texts or write_chats keyword arguments
    qlora_train: int  # QLoRA rows train on the first this-many examples (4-bit matmuls are slow on a CPU)
    rows: tuple[str, ...]
    targets: dict[str, float] = field(default_factory=dict)  # speed (x best peer), memory (x leanest), loss (%)


# initializer_range 0.04: the tiny model's 0.1 makes a 512-wide random head's logits so peaked that the
# starting loss is ~9.5 (above ln(vocab)); 0.04 starts near ln(vocab) with room to learn.
LLAMA_1K = Shape("llama-1k", model={"hidden": 512, "layers": 8, "heads": 8, "kv_heads": 4, "intermediate": 1536,
                                    "initializer_range": 0.04},
                 chat=False, n_train=96, n_valid=16, data={"median_tokens": 96, "max_tokens": 1024}, qlora_train=16,
                 rows=LLAMA_ROWS, targets={"speed": 2.0})  # issue 10's target against the best peer
QWEN2_152K = Shape("qwen2-152k", model={}, chat=True, n_train=32, n_valid=16,
                   data={"prompt_words": 256, "answer_words": 24, "max_prompt_words": 900}, qlora_train=16,
                   rows=QWEN2_ROWS, targets={"speed": 3.0, "memory": 0.3, "loss": 1.0})  # issue 18's targets
QUICK = {
    "llama-1k": dataclasses.replace(LLAMA_1K, model={}, n_train=16, n_valid=8,
                                    data={"median_tokens": 24, "max_tokens": 128}),
    # A 4,096-token vocabulary: at 151,936 the peers' output layers alone take CI a minute, whatever the width.
    "qwen2-152k": dataclasses.replace(QWEN2_152K, model={"vocab_size": 4096, "hidden": 64, "layers": 1, "heads": 4,
                                                         "kv_heads": 2, "intermediate": 128},
                                      n_train=16, n_valid=8, data={"vocab_size": 4096, "prompt_words": 32,
                                                                   "answer_words": 4, "max_prompt_words": 96}),
}
FULL = {"llama-1k": LLAMA_1K, "qwen2-152k": QWEN2_152K}


def write_data(root: Path, shape: Shape) -> tuple[Path, Path]:
    """A plain-text shape's train and validation files under `root`."""
    assert not shape.chat, f"{shape.name} is a chat shape"
    return write_texts(root, n_train=shape.n_train, n_valid=shape.n_valid, **shape.data)


def prepare(shape: Shape, root: Path) -> tuple[Path, Path, Path]:
    """Build the shape's model and write its train and validation files under `root`."""
    from worker.training.tiny_model import make_tiny_model

    root.mkdir(parents=True, exist_ok=True)
    if shape.chat:
        model_dir = make_qwen2_model(root / "model", seed=0, **shape.model)
        train, valid = write_chats(root, n_train=shape.n_train, n_valid=shape.n_valid, **shape.data)
    else:
        model_dir = make_tiny_model(root / "model", seed=0, **shape.model)
        train, valid = write_data(root, shape)
    return model_dir, train, valid


# ---------------------------------------------------------------- measurement helpers
def memory_available() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes (None where there is no /proc)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def run_isolated(kwargs: dict[str, Any], *, memory_limit: int | None, timeout: float) -> dict[str, Any]:
    """run_row in a spawned process of its own (its peak memory is its own), stopped at `timeout` seconds."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=run_row_process, args=(sender, kwargs, memory_limit))
    process.start()
    sender.close()
    started = time.perf_counter()
    result: dict[str, Any] | None = None
    if receiver.poll(timeout):
        try:
            result = receiver.recv()
        except EOFError:  # it died without a word: killed (the kernel's OOM killer) or crashed
            result = None
    else:
        process.kill()
        result = {"status": f"out of time (over {timeout:.0f} s)"}
    process.join()
    if result is None:
        result = {"status": f"died (exit code {process.exitcode}) after {time.perf_counter() - started:.0f} s"}
    return result


# ---------------------------------------------------------------- main
def trl_version() -> str | None:
    try:
        import trl

        return str(trl.__version__)
    except ImportError:
        return None


def liger_version() -> str | None:
    """liger-kernel's version where its kernels can run (installed, and a CUDA device for its Triton kernels)."""
    import torch

    if not torch.cuda.is_available():
        return None
    try:
        import liger_kernel.transformers  # noqa: F401 - the check: its kernels import triton (the package alone not)

        return importlib.metadata.version("liger-kernel")
    except (ImportError, RuntimeError, OSError):
        return None


def runnable_rows(rows: tuple[str, ...] | list[str], *, in_process: bool) -> list[str]:
    """The rows whose stack this machine has: TRL rows need trl, the Liger rows liger-kernel and a CUDA device, and
    a process of their own (Liger patches the model's classes for the whole process: every later row would run its
    kernels)."""
    return [r for r in rows if (trl_version() or Row(r).stack != "trl")
            and (Row(r).setting != "liger" or (liger_version() and not in_process))]


def run_shape(shape: Shape, root: Path, *, rows: list[str], in_process: bool, memory_limit: int | None,
              timeout: float, peak: Callable[[], float], bf16: bool) -> dict[str, dict[str, Any]]:
    """Run `rows` of `shape` and print their table. `peak` measures the matmul peak before the rows and after them,
    and each row's process measures it once more after its row; MFU is against the highest (a shared machine's speed
    moves: the highest peak gives the lowest MFU)."""
    before = peak()
    started = time.perf_counter()
    model_dir, train_file, valid_file = prepare(shape, root / shape.name)
    train = load_token_ids(train_file, model_dir, train_on_inputs=not shape.chat)
    valid = load_token_ids(valid_file, model_dir, train_on_inputs=not shape.chat)
    pad_id = tokenizer_for(model_dir).pad_token_id
    lengths = [len(e.input_ids) for e in train]
    labelled = sum(1 for e in train for label in e.labels[1:] if label != -100)
    print(f"\n== {shape.name}: {_count(model_dir):,} parameters ({_describe_model(model_dir)}); "
          f"{len(lengths)} train examples ({sum(lengths):,} tokens, {labelled:,} of them labelled "
          f"({labelled / sum(lengths):.1%}), lengths {min(lengths)}..{max(lengths)}, median "
          f"{sorted(lengths)[len(lengths) // 2]}), {shape.n_valid} validation; QLoRA rows train on the first "
          f"{min(shape.qlora_train, len(lengths))} examples; built in {time.perf_counter() - started:.0f} s",
          flush=True)
    results: dict[str, dict[str, Any]] = {}
    in_rows: list[float] = []  # the matmul peak each row's process measured after its row
    for name in run_order(rows):
        if name in results and results[name]["status"] != "ok":
            continue  # tuneforge's first run did not finish: the row stands as that
        kwargs = {"name": name, "model_dir": str(model_dir), "train_file": str(train_file),
                  "work": str(root / shape.name), "train": train, "valid": valid, "pad_id": pad_id,
                  "train_on_inputs": not shape.chat, "qlora_limit": shape.qlora_train, "bf16": bf16}
        load = os.getloadavg()[0]
        began = time.perf_counter()
        r = run_row(**kwargs) if in_process else run_isolated(kwargs, memory_limit=memory_limit, timeout=timeout)
        done = f"{r['steps']} steps, training loop {r['seconds']:.1f} s" if r["status"] == "ok" else r["status"]
        print(f"  ran {name}{' again' if name in results else ''}: {done} ({time.perf_counter() - began:.0f} s in "
              f"all; load average {load:.1f} at its start)", flush=True)
        in_rows += [r["matmul_peak"]] if r["status"] == "ok" else []
        results[name] = bracket(results[name], r) if name in results else r
    results = {name: results[name] for name in rows}  # the table in the rows' order
    after = peak()
    spread = f"{min(in_rows) / 1e9:.1f}-{max(in_rows) / 1e9:.1f}" if in_rows else "none"
    print(f"matmul peak before the rows {before / 1e9:.1f} GFLOP/s, after {after / 1e9:.1f}, after each of the "
          f"{len(in_rows)} row runs {spread}: MFU against {max(before, after, *in_rows) / 1e9:.1f}", flush=True)
    print_table(shape, results, max(before, after, *in_rows))
    return results


def run_order(rows: list[str]) -> list[str]:
    """`rows` with each tuneforge row also run before the other rows of its adapter type (LoRA or QLoRA), where
    there are others: it then runs first and last of them."""
    order = []
    for qlora in (False, True):
        group = [r for r in rows if Row(r).qlora == qlora]
        ours = [r for r in group if Row(r).stack == "tuneforge"]
        others = [r for r in group if Row(r).stack != "tuneforge"]
        order += ours + others + ours if ours and others else group
    return order


def bracket(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """One tuneforge row from its runs before and after its peers: the mean of their times (wall and CPU), the
    higher of their memory peaks (both kept, as are both times), the rest from the later run; a run that did not
    finish stands for the row."""
    if before["status"] != "ok" or after["status"] != "ok":
        return before if before["status"] != "ok" else after
    loop = [r["loop_mb"] for r in (before, after)]
    return {**after, "seconds": (before["seconds"] + after["seconds"]) / 2,
            "cpu_seconds": (before["cpu_seconds"] + after["cpu_seconds"]) / 2,
            "peak_mb": max(before["peak_mb"], after["peak_mb"]), "loop_mb": max(loop) if all(loop) else None,
            "runs_seconds": (before["seconds"], after["seconds"]),
            "runs_peak_mb": (before["peak_mb"], after["peak_mb"])}


def main(argv: list[str] | None = None) -> dict[str, dict[str, dict[str, Any]]]:
    parser = argparse.ArgumentParser(description="tuneforge training throughput / memory / MFU benchmark.")
    parser.add_argument("--quick", action="store_true", help="CI smoke run on tiny versions of both shapes")
    parser.add_argument("--in-process", action="store_true",
                        help="run every row in this process (faster start; no limits; memory is then cumulative)")
    parser.add_argument("--dir", type=Path, default=None, help="scratch directory (default: a temp dir, removed)")
    parser.add_argument("--shapes", default="llama-1k,qwen2-152k", help="comma-separated: llama-1k, qwen2-152k")
    parser.add_argument("--rows", default=None, help="comma-separated subset of rows (default: every row)")
    parser.add_argument("--examples", type=int, default=None, help="llama-1k training examples (default 96)")
    parser.add_argument("--memory-limit-gb", type=float, default=None,
                        help="per-row limit on private memory (default: 16 GiB or 85%% of MemAvailable, the lower)")
    parser.add_argument("--row-timeout", type=float, default=1200, help="seconds a row may take in all")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                        help="every row's compute precision (default: bf16 on CUDA, fp32 on a CPU); bf16 keeps the "
                             "frozen base in bf16 and the adapters in fp32, under bf16 autocast")
    args = parser.parse_args(argv)
    shapes = [(QUICK if args.quick else FULL)[name] for name in args.shapes.split(",")]
    if args.examples:
        shapes = [dataclasses.replace(s, n_train=args.examples) if s.name == "llama-1k" else s for s in shapes]
    in_process = args.in_process or args.quick
    available = memory_available()
    if args.memory_limit_gb:
        memory_limit: int | None = int(args.memory_limit_gb * 2**30)
    else:
        memory_limit = min(16 * 2**30, int(0.85 * available)) if available else None

    import peft
    import torch
    import transformers

    from worker.training.model import cpu_bf16

    if args.precision == "bf16" and not torch.cuda.is_available() and cpu_bf16() == "none":
        parser.error("--precision bf16: this CPU has no bf16 instructions (tuneforge refuses bf16 on it); use fp32")
    root = Path(tempfile.mkdtemp(prefix="bench-train-", dir=args.dir))
    try:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not args.memory_limit_gb:
            memory_limit = None  # the rows' tensors are in the GPU's memory, and CUDA maps far more than it uses
        bf16 = args.precision == "bf16" if args.precision else device == "cuda"
        precision = "bfloat16" if bf16 else "float32"
        memory = "no memory limit" if memory_limit is None else (
            f"{memory_limit / 2**30:.1f} GiB private memory (MemAvailable at start {(available or 0) / 2**30:.1f} GiB)")
        limits = "none (in-process)" if in_process else f"{memory}, {args.row_timeout:.0f} s per row"
        print(f"device: {device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads); "
              f"precision {precision}; torch {torch.__version__}, transformers {transformers.__version__}, "
              f"peft {peft.__version__}, trl {trl_version() or 'not installed (TRL rows skipped)'}, liger-kernel "
              f"{liger_version() or 'not here (needs it installed and a CUDA device: Liger rows skipped)'}"
              f"{' (rows skipped in-process)' if in_process and liger_version() else ''}")
        print(f"load average at start {_load()}; row limits: {limits}")
        print(f"matmul peak: {precision}, 2048^3, best of 5, measured before and after each shape's rows and in each "
              "row's process after its row", flush=True)
        results = {}
        for shape in shapes:
            rows = [r for r in runnable_rows(shape.rows, in_process=in_process)
                    if args.rows is None or r in args.rows.split(",")]
            results[shape.name] = run_shape(shape, root, rows=rows, in_process=in_process, memory_limit=memory_limit,
                                            timeout=args.row_timeout,
                                            peak=functools.partial(matmul_peak, precision, device), bf16=bf16)
        print(f"\nload average at the end {_load()}")
        return results
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _load() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1 / 5 / 15 min)"


def _count(model_dir: Path) -> int:
    """Parameters stored in the model's safetensors (a tied output layer counts once)."""
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118


def _describe_model(model_dir: Path) -> str:
    import json

    c = json.loads((model_dir / "config.json").read_text())
    tied = ", tied embeddings" if c.get("tie_word_embeddings") else ""
    return (f"{c['model_type']}, vocabulary {c['vocab_size']:,}, hidden {c['hidden_size']}, {c['num_hidden_layers']} "
            f"layers, {c['num_attention_heads']}/{c['num_key_value_heads']} heads, intermediate "
            f"{c['intermediate_size']}{tied}")


# ---------------------------------------------------------------- the table and the ratios
def print_table(shape: Shape, results: dict[str, dict[str, Any]], peak: float) -> None:
    header = (f"{'row':<24}{'steps':>6}{'real tok':>10}{'real tok/s':>12}{'tf x':>7}{'tok/cpu-s':>10}{'tf x':>7}"
              f"{'peak MB':>9}{'tf x':>7}{'loop MB':>9}{'tf x':>7}{'train loss':>11}{'masked':>8}{'valid loss':>11}"
              f"{'MFU %':>7}")
    print(header)
    print("-" * len(header))
    ok = {n: r for n, r in results.items() if r["status"] == "ok"}
    for r in ok.values():
        r["tokens_per_second"] = r["real_tokens"] / r["seconds"]
        r["tokens_per_cpu_second"] = r["real_tokens"] / r["cpu_seconds"]
    for name, r in results.items():
        if r["status"] != "ok":
            print(f"{name:<24}{r['status']}")
            continue
        tf = ok.get("tuneforge-qlora" if Row(name).qlora else "tuneforge")

        def x(key: str, tf: dict[str, Any] | None = tf, r: dict[str, Any] = r) -> str:
            """tuneforge's figure over this row's ("-" when either is missing)."""
            return f"{tf[key] / r[key]:.2f}" if tf and tf.get(key) and r.get(key) else "-"

        mfu = r["tokens_per_second"] * r["flops_per_token"] / peak * 100
        masked = f"{r['masked_loss']:.3f}" if r["masked_loss"] is not None else "="
        loop = f"{r['loop_mb']:.0f}" if r["loop_mb"] else "-"
        print(f"{name:<24}{r['steps']:>6}{r['real_tokens']:>10,}{r['tokens_per_second']:>12.1f}"
              f"{x('tokens_per_second'):>7}{r['tokens_per_cpu_second']:>10.1f}{x('tokens_per_cpu_second'):>7}"
              f"{r['peak_mb']:>9.0f}{x('peak_mb'):>7}{loop:>9}{x('loop_mb'):>7}{r['train_loss']:>11.3f}{masked:>8}"
              f"{r['valid_loss']:>11.3f}{mfu:>7.2f}")
    for name, r in ok.items():
        if "runs_seconds" in r:
            (first, last), (first_mb, last_mb) = r["runs_seconds"], r["runs_peak_mb"]
            print(f"{name}: training loop {first:.1f} s before its peers, {last:.1f} s after; the table has the mean;"
                  f" peak memory {first_mb:,.0f} MB before, {last_mb:,.0f} MB after; the table has the higher")
    for qlora in (False, True):
        print_ratios(shape, results, qlora=qlora)


def print_ratios(shape: Shape, results: dict[str, dict[str, Any]], *, qlora: bool) -> None:
    """tuneforge against the best peer (most real tokens/s) and the leanest peer (lowest peak memory) of one
    adapter type, and against the seed recipe where it ran."""
    label = f"{shape.name} {'QLoRA' if qlora else 'LoRA'}"
    tf = results.get("tuneforge-qlora" if qlora else "tuneforge")
    if tf is None or tf["status"] != "ok":
        print(f"{label}: tuneforge did not finish ({tf['status'] if tf else 'not run'})")
        return
    group = {n: r for n, r in results.items() if Row(n).qlora == qlora}
    peers = {n: r for n, r in group.items() if Row(n).is_peer and r["status"] == "ok"}
    failed = [f"{n} ({r['status']})" for n, r in group.items() if Row(n).is_peer and r["status"] != "ok"]
    targets = shape.targets
    if peers:
        fast = max(peers, key=lambda n: peers[n]["tokens_per_second"])
        fast_cpu = max(peers, key=lambda n: peers[n]["tokens_per_cpu_second"])
        lean = min(peers, key=lambda n: peers[n]["peak_mb"])
        parts = [
            f"tokens/s tuneforge/best peer ({fast}, {peers[fast]['tokens_per_second']:.1f}) = "
            f"{tf['tokens_per_second'] / peers[fast]['tokens_per_second']:.2f}{_target('>=', targets.get('speed'))}, "
            f"per CPU-second vs {fast_cpu} "
            f"{tf['tokens_per_cpu_second'] / peers[fast_cpu]['tokens_per_cpu_second']:.2f}",
            f"peak memory tuneforge/leanest peer ({lean}, {peers[lean]['peak_mb']:.0f} MB) = "
            f"{tf['peak_mb'] / peers[lean]['peak_mb']:.2f}{_target('<=', targets.get('memory'))}",
        ]
        looped = {n: r for n, r in peers.items() if r["loop_mb"]}
        if looped and tf["loop_mb"]:
            lean_loop = min(looped, key=lambda n: looped[n]["loop_mb"])
            parts.append(f"training-loop memory tuneforge/leanest peer ({lean_loop}, "
                         f"{looped[lean_loop]['loop_mb']:.0f} MB) = {tf['loop_mb'] / looped[lean_loop]['loop_mb']:.2f}")
        losses = ", ".join(f"{n} {peers[n]['valid_loss']:.4f} ({_relative(tf['valid_loss'], peers[n]['valid_loss'])})"
                           for n in dict.fromkeys([fast, lean]))
        parts.append(f"valid loss tuneforge {tf['valid_loss']:.4f} vs {losses}"
                     + (f" (target: within {targets['loss']:g}%)" if "loss" in targets else ""))
        print(f"{label}: " + "; ".join(parts) + (f"; did not finish: {', '.join(failed)}" if failed else ""))
    elif failed:
        print(f"{label}: no peer finished ({', '.join(failed)})")
    seed = results.get("seed-qlora" if qlora else "seed")
    if seed and seed["status"] == "ok":
        print(f"{label}: tuneforge/seed tokens/s = {tf['tokens_per_second'] / seed['tokens_per_second']:.2f} "
              f"(per CPU-second {tf['tokens_per_cpu_second'] / seed['tokens_per_cpu_second']:.2f}); peak memory "
              f"tuneforge/seed = {tf['peak_mb'] / seed['peak_mb']:.2f}; valid loss tuneforge {tf['valid_loss']:.4f} "
              f"vs seed {seed['valid_loss']:.4f}")


def _target(sign: str, value: float | None) -> str:
    return f" (target {sign} {value:g})" if value else ""


def _relative(ours: float, theirs: float) -> str:
    return f"tuneforge {100 * (ours - theirs) / theirs:+.2f}%"


if __name__ == "__main__":
    main()
