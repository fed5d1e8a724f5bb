"""Training benchmark: tuneforge's train() against the seed recipe, HF Trainer and TRL, side by side in one run.

    python -m bench.train            # the figures in docs/benchmarks.md (~25M Llama-shape model, ~6 min on 2 cores)
    python -m bench.train --quick    # CI smoke run on the tests' tiny model (< 60 s; no timing assertion)

Every variant trains the same locally built model on the same token ids (tuneforge's tokenisation of a
generated, long-tailed text set), one epoch, the same LoRA (r=16, alpha=32, dropout 0.05 on q_proj/v_proj),
AdamW (lr 1e-3, linear decay, no warmup, clip 1.0), batch 8 examples per optimizer step (the packed TRL run
takes as many packed rows per step as gives the same number of steps), and precision fp32 on CPU (bf16 on
CUDA). Variants:

- seed: the recipe tuneforge grew from: the whole dataset tokenised with padding=True to the longest
  example, HF Trainer, labels = input_ids *including the padding* (its "train loss" partly measures
  predicting pad tokens; the masked column is the same loss over real tokens only);
- hf-dynamic: HF Trainer with per-batch padding (DataCollatorForSeq2Seq, padding masked in the labels);
- trl / trl-packing: TRL's SFTTrainer with its defaults, and with packing=True (its default "bfd" strategy);
- tuneforge: worker.training.recipe.train with length-grouped batches (its default);
- QLoRA: seed and tuneforge again with a 4-bit NF4 base (the seed as such recipes do it:
  prepare_model_for_kbit_training, which turns on gradient checkpointing; tuneforge-qlora then sets
  gradient_checkpointing too, so both save activation memory the same way).

Throughput is real (non-padding) tokens per second of the training loop (model load, tokenisation and
evaluation excluded, for every variant alike). Memory is each variant's peak RSS (its own spawned process;
with --in-process, the one process's running peak) or CUDA peak allocation. Validation loss is computed
the same way for every variant (worker.training.evaluate on held-out examples, padding masked).

MFU = achieved model FLOP/s / measured matmul peak (a 2048^3 torch.matmul at the training precision, timed
in this run). Model FLOPs per real token for LoRA training: 2*N (forward) + 2*N (backward through the
frozen weights, activation gradients only; frozen weights get no weight gradient) + 6*N_lora, where N counts
the matmul weights (all parameters but the input embedding). Attention-score FLOPs are left out (the same
convention as 6*N for full training).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import math
import multiprocessing
import platform
import random
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BATCH = 8
LEARNING_RATE = 1e-3
LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}


@dataclass(frozen=True)
class Setup:
    """What one benchmark mode trains: model size and data shape."""

    model: dict[str, Any]  # make_tiny_model keyword arguments
    n_train: int
    n_valid: int
    median_tokens: int
    max_tokens: int
    qlora_train: int  # QLoRA runs use the first this-many training examples (they are slower on CPU)


# initializer_range 0.04: the tiny model's 0.1 makes a 512-wide random head's logits so peaked that the
# starting loss is ~9.5 (above ln(vocab)); 0.04 starts near ln(vocab) with room to learn.
FULL = Setup(model={"hidden": 512, "layers": 8, "heads": 8, "kv_heads": 4, "intermediate": 1536,
                    "initializer_range": 0.04},
             n_train=96, n_valid=16, median_tokens=96, max_tokens=1024, qlora_train=16)
QUICK = Setup(model={}, n_train=16, n_valid=8, median_tokens=24, max_tokens=128, qlora_train=16)


# ---------------------------------------------------------------- data
def generate_texts(n: int, *, median_tokens: int, max_tokens: int, seed: int) -> list[str]:
    """Deterministic Markov-chain "English" with lognormal lengths (16..max_tokens words ~ tokens), long-tailed."""
    from worker.training.tiny_model import _WORDS

    rng = random.Random(seed)
    table = random.Random(1234)  # one fixed language for every split
    successors = {w: [table.choice(_WORDS) for _ in range(4)] for w in _WORDS}
    texts = []
    for _ in range(n):
        length = min(max_tokens, max(16, round(rng.lognormvariate(math.log(median_tokens), 1.0))))
        word = rng.choice(_WORDS)
        words = [word]
        for _ in range(length - 3):  # BOS + EOS; about one token per word
            word = rng.choice(successors[word]) if rng.random() < 0.9 else rng.choice(_WORDS)
            words.append(word)
        texts.append(" ".join(words))
    return texts


def write_data(root: Path, setup: Setup) -> tuple[Path, Path]:
    train = root / "train.jsonl"
    valid = root / "valid.jsonl"
    for path, n, seed in ((train, setup.n_train, 1), (valid, setup.n_valid, 2)):
        texts = generate_texts(n, median_tokens=setup.median_tokens, max_tokens=setup.max_tokens, seed=seed)
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return train, valid


def load_token_ids(path: Path, model_dir: Path, max_seq_length: int, limit: int | None = None) -> list[Any]:
    """tuneforge's own tokenisation, so every variant trains on identical token ids."""
    from transformers import AutoTokenizer

    from tests.support.reporters import RecordingReporter
    from worker.training.data import load_examples

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = load_examples(path, tokenizer, max_seq_length=max_seq_length, train_on_inputs=True,
                             reporter=RecordingReporter())
    return examples[:limit] if limit else examples


# ---------------------------------------------------------------- measurement helpers
def matmul_peak(dtype_name: str, device: str) -> float:
    """Best-of-5 FLOP/s of a 2048^3 matmul at `dtype_name` on `device`."""
    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(2048, 2048, device=device, dtype=dtype)
    b = torch.randn(2048, 2048, device=device, dtype=dtype)
    best = math.inf
    for _ in range(5):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * 2048**3 / best


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def flops_per_token(model: Any) -> float:
    """2N + 2N (frozen backward, activation grads only) + 6 N_lora; N = weights of the frozen linear layers.

    Counted from the layers' shapes, so a 4-bit base (two weights per stored byte) counts the same.
    """
    import torch

    frozen = sum(m.in_features * m.out_features for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and "lora_" not in name)
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return 4 * frozen + 6 * lora


def validation_loss(model: Any, valid: list[Any], pad_id: int) -> float:
    import contextlib

    import torch

    from worker.training.evaluate import evaluate

    device = next(model.parameters()).device
    order = sorted(range(len(valid)), key=lambda i: len(valid[i].input_ids))
    plan = [[[i] for i in order[k : k + BATCH]] for k in range(0, len(order), BATCH)]
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" \
        else contextlib.nullcontext
    return evaluate(model, plan, valid, pad_id=pad_id, device=device, autocast=autocast)["loss"]


# ---------------------------------------------------------------- variants
def run_tuneforge(model_dir: Path, train_file: Path, valid: list[Any], work: Path, *, qlora: bool,
                  limit: int | None) -> dict[str, Any]:
    import torch

    from app.schemas.training import TrainingConfig
    from tests.support.reporters import RecordingReporter
    from worker.training.recipe import train

    if limit:
        lines = train_file.read_text().splitlines()[:limit]
        train_file = work / "train-subset.jsonl"
        train_file.write_text("\n".join(lines) + "\n")
    precision = "bf16" if torch.cuda.is_available() else "fp32"
    config = TrainingConfig.model_validate({
        "adapter": {"type": "qlora" if qlora else "lora", **LORA}, "n_epochs": 1, "batch_size": BATCH,
        "learning_rate": LEARNING_RATE, "lr_scheduler": "linear", "max_seq_length": 1024, "precision": precision,
        "seed": 42, "train_on_inputs": True,
        # The seed's QLoRA recipe checkpoints activations (prepare_model_for_kbit_training): the same here.
        "gradient_checkpointing": qlora,
    })

    class TimedReporter(RecordingReporter):
        """Clock from the "training ..." event (the loop starts right after) to the last step's metrics."""

        started: float = 0.0
        finished: float = 0.0
        cpu_started: float = 0.0
        cpu_finished: float = 0.0

        def event(self, message: str, **kwargs: Any) -> None:
            super().event(message, **kwargs)
            if message.startswith("training "):
                self.started, self.cpu_started = time.perf_counter(), time.process_time()

        def metrics(self, data: dict[str, Any]) -> None:
            super().metrics(data)
            self.finished, self.cpu_finished = time.perf_counter(), time.process_time()

    reporter = TimedReporter()
    result = train(config, model_path=model_dir, train_file=train_file, validation_file=None,
                   output_dir=work / "tuneforge", reporter=reporter)
    peak_mb = peak_memory_mb()  # before the evaluation below loads the model again
    # Reload the trained adapter for the shared validation pass (train() returns paths, not the model).
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, result.final_dir).to("cuda" if torch.cuda.is_available() else "cpu")
    losses = reporter.losses()
    return {"seconds": reporter.finished - reporter.started,
            "cpu_seconds": reporter.cpu_finished - reporter.cpu_started, "steps": result.steps,
            "real_tokens": result.trained_tokens, "train_loss": sum(losses[-2:]) / len(losses[-2:]),
            "masked_loss": None, "model_for_eval": model, "flops_per_token": _tuneforge_flops(model_dir, qlora),
            "peak_mb": peak_mb}


def _tuneforge_flops(model_dir: Path, qlora: bool) -> float:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"],
                                             target_modules=LORA["target_modules"]))
    return flops_per_token(model)


def _hf_model(model_dir: Path, *, qlora: bool) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cuda = torch.cuda.is_available()
    kwargs: dict[str, Any] = {"dtype": torch.bfloat16 if cuda else torch.float32}
    if qlora:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True,
                                                           bnb_4bit_compute_dtype=kwargs["dtype"])
        kwargs["device_map"] = {"": "cuda" if cuda else "cpu"}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if qlora:
        model = prepare_model_for_kbit_training(model)
    elif cuda:
        model.to("cuda")
    return get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                            target_modules=LORA["target_modules"], task_type="CAUSAL_LM"))


def _training_args(work: Path, name: str, batch: int) -> dict[str, Any]:
    import torch

    return dict(output_dir=str(work / name), per_device_train_batch_size=batch, num_train_epochs=1,
                learning_rate=LEARNING_RATE, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
                max_grad_norm=1.0, optim="adamw_torch", logging_steps=1, save_strategy="no", report_to=[],
                seed=42, data_seed=42, bf16=torch.cuda.is_available(), dataloader_num_workers=0,
                disable_tqdm=True, remove_unused_columns=False)


def run_hf(model_dir: Path, train: list[Any], valid: list[Any], work: Path, *, kind: str, qlora: bool = False
           ) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments, default_data_collator

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = _hf_model(model_dir, qlora=qlora)
    ids = [e.input_ids for e in train]
    masked: list[float] = []
    if kind == "seed":
        # The seed recipe: pad the whole dataset to its longest example; labels are a copy of input_ids.
        padded = tokenizer.pad({"input_ids": ids}, padding=True)
        dataset = Dataset.from_dict({"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"],
                                     "labels": padded["input_ids"]})
        collator = default_data_collator
    else:
        dataset = Dataset.from_dict({"input_ids": ids, "labels": ids})
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)

    class SeedTrainer(Trainer):
        """Also records the loss over real tokens only (no gradient), to set beside the naive loss."""

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
            with torch.no_grad():
                labels = inputs["labels"].masked_fill(inputs["attention_mask"] == 0, -100)[:, 1:]
                logits = outputs.logits[:, :-1].float()
                masked.append(float(torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100)))
            return (loss, outputs) if return_outputs else loss

    trainer_class = SeedTrainer if kind == "seed" else Trainer
    trainer = trainer_class(model=model, args=TrainingArguments(**_training_args(work, kind, BATCH)),
                            train_dataset=dataset, data_collator=collator)
    cpu_started = time.process_time()
    output = trainer.train()
    cpu_seconds = time.process_time() - cpu_started
    peak_mb = peak_memory_mb()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"seconds": output.metrics["train_runtime"], "cpu_seconds": cpu_seconds, "steps": trainer.state.global_step,
            "real_tokens": sum(len(x) for x in ids), "train_loss": sum(losses[-2:]) / len(losses[-2:]),
            "masked_loss": sum(masked[-2:]) / len(masked[-2:]) if masked else None,
            "model_for_eval": trainer.model, "flops_per_token": flops_per_token(trainer.model), "peak_mb": peak_mb}


def run_trl(model_dir: Path, train: list[Any], valid: list[Any], work: Path, *, packing: bool) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = _hf_model(model_dir, qlora=False)
    ids = [e.input_ids for e in train]
    real = sum(len(x) for x in ids)
    steps = math.ceil(len(ids) / BATCH)
    # Packed rows are up to 1024 tokens: take as many per step as gives the unpacked run's step count.
    rows = math.ceil(real / 1024)
    batch = max(1, math.ceil(rows / steps)) if packing else BATCH
    args = SFTConfig(**_training_args(work, "trl-packing" if packing else "trl", batch), packing=packing,
                     max_length=1024)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids}),
                         processing_class=tokenizer)
    cpu_started = time.process_time()
    output = trainer.train()
    cpu_seconds = time.process_time() - cpu_started
    peak_mb = peak_memory_mb()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"seconds": output.metrics["train_runtime"], "cpu_seconds": cpu_seconds,
            "steps": trainer.state.global_step, "real_tokens": real,
            "train_loss": sum(losses[-2:]) / len(losses[-2:]), "masked_loss": None,
            "model_for_eval": trainer.model, "flops_per_token": flops_per_token(trainer.model), "peak_mb": peak_mb}


def run_variant(name: str, model_dir: str, train_file: str, valid_file: str, work: str, qlora_limit: int) -> dict:
    """Run one variant (in its own process unless --in-process) and measure it."""
    import torch

    from tests.support.reporters import RecordingReporter  # noqa: F401  (import cost outside the timing)

    model_path, root = Path(model_dir), Path(work)
    torch.manual_seed(42)
    qlora = name.endswith("qlora")
    limit = qlora_limit if qlora else None
    train = load_token_ids(Path(train_file), model_path, 1024, limit=limit)
    valid = load_token_ids(Path(valid_file), model_path, 1024)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    if name.startswith("tuneforge"):
        out = run_tuneforge(model_path, Path(train_file), valid, root, qlora=qlora, limit=limit)
    elif name.startswith("seed"):
        out = run_hf(model_path, train, valid, root, kind="seed", qlora=qlora)
    elif name == "hf-dynamic":
        out = run_hf(model_path, train, valid, root, kind="dynamic")
    else:
        out = run_trl(model_path, train, valid, root, packing=name == "trl-packing")
    from transformers import AutoTokenizer

    pad_id = AutoTokenizer.from_pretrained(model_path).pad_token_id
    out["valid_loss"] = validation_loss(out.pop("model_for_eval"), valid, pad_id)
    return out


# ---------------------------------------------------------------- main
def trl_version() -> str | None:
    try:
        import trl

        return str(trl.__version__)
    except ImportError:
        return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="tuneforge training throughput / memory / MFU benchmark.")
    parser.add_argument("--quick", action="store_true", help="CI smoke run on the tiny model (< 60 s)")
    parser.add_argument("--in-process", action="store_true",
                        help="run every variant in this process (faster start; peak RSS is then cumulative)")
    parser.add_argument("--dir", type=Path, default=None, help="scratch directory (default: a temp dir, removed)")
    parser.add_argument("--examples", type=int, default=None,
                        help="training examples (full mode: 96; the issue's setup has 384, a long run on a CPU)")
    args = parser.parse_args(argv)
    setup = QUICK if args.quick else FULL
    if args.examples:
        setup = dataclasses.replace(setup, n_train=args.examples)
    in_process = args.in_process or args.quick

    import peft
    import torch
    import transformers

    from worker.training.tiny_model import make_tiny_model

    root = Path(tempfile.mkdtemp(prefix="bench-train-", dir=args.dir))
    try:
        model_dir = make_tiny_model(root / "model", seed=0, **setup.model)
        train_file, valid_file = write_data(root, setup)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        precision = "bfloat16" if device == "cuda" else "float32"
        peak = matmul_peak(precision, device)
        variants = ["seed", "hf-dynamic"] + (["trl", "trl-packing"] if trl_version() else []) + \
            ["tuneforge", "seed-qlora", "tuneforge-qlora"]
        lengths = [len(e.input_ids) for e in load_token_ids(train_file, model_dir, 1024)]
        print(f"device: {device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads); "
              f"precision {precision}; torch {torch.__version__}, transformers {transformers.__version__}, "
              f"peft {peft.__version__}, trl {trl_version() or 'not installed (TRL rows skipped)'}")
        print(f"model: {_count(model_dir):,} parameters; data: {len(lengths)} train examples "
              f"({sum(lengths):,} tokens, lengths {min(lengths)}..{max(lengths)}, median "
              f"{sorted(lengths)[len(lengths) // 2]}), {setup.n_valid} validation; QLoRA rows use the first "
              f"{min(setup.qlora_train, len(lengths))} train examples")
        print(f"matmul peak ({precision}, 2048^3): {peak / 1e9:.1f} GFLOP/s", flush=True)
        results: dict[str, dict[str, Any]] = {}
        for name in variants:
            call = (name, str(model_dir), str(train_file), str(valid_file), str(root), setup.qlora_train)
            if in_process:
                results[name] = run_variant(*call)
            else:
                context = multiprocessing.get_context("spawn")
                with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                    results[name] = pool.submit(run_variant, *call).result()
            r = results[name]
            print(f"  ran {name}: {r['steps']} steps in {r['seconds']:.1f} s", flush=True)
        print_table(results, peak)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _count(model_dir: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118


def print_table(results: dict[str, dict[str, Any]], peak: float) -> None:
    header = (f"{'variant':<16}{'steps':>6}{'real tok':>10}{'real tok/s':>12}{'tf x':>7}{'tok/cpu-s':>10}{'tf x':>7}"
              f"{'peak MB':>9}"
              f"{'mem/seed':>9}{'train loss':>11}{'masked':>8}{'valid loss':>11}{'MFU %':>7}")
    print(header)
    print("-" * len(header))
    for r in results.values():
        r["tokens_per_second"] = r["real_tokens"] / r["seconds"]
        r["tokens_per_cpu_second"] = r["real_tokens"] / r["cpu_seconds"]
    for name, r in results.items():
        tf = results["tuneforge-qlora" if name.endswith("qlora") else "tuneforge"]
        seed = results["seed-qlora" if name.endswith("qlora") else "seed"]
        mfu = r["tokens_per_second"] * r["flops_per_token"] / peak * 100
        masked = f"{r['masked_loss']:.3f}" if r["masked_loss"] is not None else "="
        print(f"{name:<16}{r['steps']:>6}{r['real_tokens']:>10,}{r['tokens_per_second']:>12.1f}"
              f"{tf['tokens_per_second'] / r['tokens_per_second']:>7.2f}{r['tokens_per_cpu_second']:>10.1f}"
              f"{tf['tokens_per_cpu_second'] / r['tokens_per_cpu_second']:>7.2f}{r['peak_mb']:>9.0f}"
              f"{r['peak_mb'] / seed['peak_mb']:>9.2f}{r['train_loss']:>11.3f}{masked:>8}{r['valid_loss']:>11.3f}"
              f"{mfu:>7.2f}")
    tf, seed = results["tuneforge"], results["seed"]
    peers = {n: r for n, r in results.items() if n in ("hf-dynamic", "trl", "trl-packing")}
    best = max(peers, key=lambda n: peers[n]["tokens_per_second"])
    best_cpu = max(peers, key=lambda n: peers[n]["tokens_per_cpu_second"])
    print(f"targets: tuneforge/seed tokens/s = {tf['tokens_per_second'] / seed['tokens_per_second']:.2f} (>= 5; "
          f"per CPU-second {tf['tokens_per_cpu_second'] / seed['tokens_per_cpu_second']:.2f}); "
          f"tuneforge/best peer ({best}) = {tf['tokens_per_second'] / peers[best]['tokens_per_second']:.2f} (>= 2; "
          f"per CPU-second vs {best_cpu} "
          f"{tf['tokens_per_cpu_second'] / peers[best_cpu]['tokens_per_cpu_second']:.2f}); "
          f"peak memory tuneforge/seed = {tf['peak_mb'] / seed['peak_mb']:.2f} (<= 0.6); "
          f"valid loss tuneforge {tf['valid_loss']:.3f} vs hf-dynamic {results['hf-dynamic']['valid_loss']:.3f} "
          "(no worse)")
    q_tf, q_seed = results["tuneforge-qlora"], results["seed-qlora"]
    print(f"QLoRA: tuneforge/seed tokens/s = {q_tf['tokens_per_second'] / q_seed['tokens_per_second']:.2f} "
          f"(per CPU-second {q_tf['tokens_per_cpu_second'] / q_seed['tokens_per_cpu_second']:.2f}); "
          f"peak memory tuneforge/seed = {q_tf['peak_mb'] / q_seed['peak_mb']:.2f}")


if __name__ == "__main__":
    main()
