"""Calibration of the job estimate's memory model (app/services/estimates.py) against measured peaks.

    python -m bench.memory            # the tiny model and the training benchmark's model, LoRA / QLoRA / full
    python -m bench.memory --quick    # the tiny model only (CI smoke run)

Each case trains in a process of its own (spawned: nothing shared) on rows of exactly max_seq_length tokens,
so every batch has the shape the estimate assumes. Measured: on CUDA, torch.cuda.max_memory_allocated() (the
estimate's runtime allowance left out of the comparison); on a CPU, the highest RSS sampled every 2 ms while
train() runs, minus the RSS just before it, after importing everything it imports (what training added:
weights, optimizer, activations, plus the allocator's and the tokenizer's own overheads, which the model does
not count). Printed: both figures and estimate / measured.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import shutil
import tempfile
from pathlib import Path
from typing import Any

CASES = ("lora", "qlora", "full")
BATCH, SEQ, ROWS = 4, 256, 8


def _rows(path: Path, model_dir: Path) -> None:
    """ROWS text examples of exactly SEQ tokens for this tokenizer (one epoch = ROWS / BATCH steps)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    words = [w for w in tokenizer.get_vocab() if w.isalpha()][:200] or ["a"]
    with path.open("w") as f:
        for i in range(ROWS):
            ids: list[int] = []
            text = ""
            k = i
            while len(ids) < SEQ:
                text += f" {words[k % len(words)]}"
                k += 7
                ids = tokenizer(text)["input_ids"]
            f.write(json.dumps({"text": text}) + "\n")


class _PeakRss:
    """The process's highest RSS while running, sampled every 2 ms on a thread."""

    def __init__(self) -> None:
        import threading

        import psutil

        self._process, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_case(adapter: str, model_dir: str, train_file: str, work: str) -> dict[str, Any]:
    import gc

    # bitsandbytes, peft, modeling_llama: what train() imports lazily, imported before the baseline.
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import psutil
    import torch
    from transformers.models.llama import modeling_llama  # noqa: F401

    from app.schemas.training import TrainingConfig
    from tests.support.reporters import RecordingReporter
    from worker.training.recipe import train

    cuda = torch.cuda.is_available()
    config = TrainingConfig.model_validate({
        "adapter": {"type": adapter}, "n_epochs": 1, "batch_size": BATCH, "max_seq_length": SEQ,
        "precision": "bf16" if cuda else "fp32", "seed": 1, "train_on_inputs": True})
    gc.collect()
    baseline = psutil.Process().memory_info().rss
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with _PeakRss() as rss:
        train(config, model_path=Path(model_dir), train_file=Path(train_file), validation_file=None,
              output_dir=Path(work) / adapter, reporter=RecordingReporter())
    measured = float(torch.cuda.max_memory_allocated()) if cuda else float(rss.peak - baseline)
    return {"measured": measured, "config": config.model_dump(mode="json"), "device": "cuda" if cuda else "cpu"}


def shape(model_dir: Path) -> dict[str, Any]:
    """What the registry reads from a model folder (the estimate's input)."""
    from app.services.base_models import describe, folder_tensors

    config = json.loads((model_dir / "config.json").read_text())
    return describe(config, tokenizer={}, files=[], tensors=folder_tensors(model_dir), parameters=None, license_=None)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description="the estimate's memory model against measured peaks")
    parser.add_argument("--quick", action="store_true", help="the tiny model only")
    args = parser.parse_args(argv)

    from app.schemas.training import TrainingConfig
    from app.services.estimates import peak_memory
    from bench.train import LLAMA_1K
    from worker.training.tiny_model import make_tiny_model

    root = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    rows: list[dict[str, Any]] = []
    try:
        models = {"tiny": make_tiny_model(root / "tiny", seed=0)}
        if not args.quick:
            models["benchmark"] = make_tiny_model(root / "benchmark", seed=0, **LLAMA_1K.model)
        print(f"{'model':<10} {'params':>11} {'method':<6} {'measured MiB':>13} {'estimate MiB':>13} {'ratio':>6}")
        for name, model_dir in models.items():
            train_file = root / f"{name}.jsonl"
            _rows(train_file, model_dir)
            info = shape(model_dir)
            for adapter in CASES:
                context = multiprocessing.get_context("spawn")
                with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                    found = pool.submit(run_case, adapter, str(model_dir), str(train_file), str(root)).result()
                config = TrainingConfig.model_validate(found["config"])
                estimate = peak_memory(info, config, device=found["device"])
                assert estimate is not None
                predicted = estimate.total_bytes - estimate.runtime
                row = {"model": name, "parameters": info["parameters"], "method": adapter,
                       "measured": found["measured"], "estimate": predicted,
                       "ratio": predicted / found["measured"] if found["measured"] > 0 else float("nan")}
                rows.append(row)
                print(f"{name:<10} {info['parameters']:>11,} {adapter:<6} {row['measured'] / 2**20:>13.1f} "
                      f"{predicted / 2**20:>13.1f} {row['ratio']:>6.2f}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return rows


if __name__ == "__main__":
    main()
