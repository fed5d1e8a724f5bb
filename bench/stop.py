"""How long a stop takes: SIGTERM to a training process until it has saved its checkpoint and let go (the
grace period an orchestrator must allow, docs/operators.md "Stopping and restarting").

    python -m bench.stop            # the benchmark model (bench/train.py), LoRA, QLoRA and full fine-tuning
    python -m bench.stop --quick    # CI smoke run on the tiny model

The process signals itself right after a step's metrics are reported, so what is timed is the stop itself:
saving the checkpoint and archiving it as the worker does before upload. A signal landing mid-step waits for
that step first: the grace period is one step (printed too) plus the stop.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.train import BATCH, LEARNING_RATE, LLAMA_1K, LORA, QUICK, write_data


def measure(model_dir: Path, train_file: Path, work: Path, adapter: str) -> dict[str, float]:
    from app.schemas.training import TrainingConfig
    from tests.support.reporters import RecordingReporter
    from worker.archive import tar_directory
    from worker.training import stopping
    from worker.training.recipe import train
    from worker.training.reporting import TrainingReleased

    config = TrainingConfig.model_validate({
        "adapter": {"type": adapter, **({} if adapter == "full" else LORA)}, "n_epochs": 2, "batch_size": BATCH,
        "learning_rate": LEARNING_RATE, "max_seq_length": 1024, "precision": "fp32", "seed": 42,
        "gradient_checkpointing": adapter == "qlora", "save_steps": 10_000})

    class SignalAtStep3(RecordingReporter):
        step_started = signalled = saved = 0.0
        step_seconds: list[float] = []  # noqa: RUF012 - one instance

        def metrics(self, data: dict[str, Any]) -> None:
            super().metrics(data)
            now = time.perf_counter()
            if self.step_started:
                self.step_seconds.append(now - self.step_started)
            self.step_started = now
            if data["step"] == 3:
                self.signalled = time.perf_counter()
                os.kill(os.getpid(), signal.SIGTERM)

        def checkpoint_saved(self, *, step: int, path: Path, metrics: dict[str, Any]) -> None:
            super().checkpoint_saved(step=step, path=path, metrics=metrics)
            tar_directory(path, work / f"checkpoint-{adapter}.tar")  # what the worker uploads
            self.saved = time.perf_counter()

    reporter = SignalAtStep3()
    stopping.clear()
    try:
        train(config, model_path=model_dir, train_file=train_file, validation_file=None,
              output_dir=work / adapter, reporter=reporter)
        raise RuntimeError("training was not released")
    except TrainingReleased:
        released = time.perf_counter()
    return {"step": statistics.median(reporter.step_seconds), "stop": released - reporter.signalled,
            "checkpoint_mb": (work / f"checkpoint-{adapter}.tar").stat().st_size / 2**20}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI smoke run on the tiny model")
    args = parser.parse_args(argv)
    setup = QUICK["llama-1k"] if args.quick else LLAMA_1K

    from worker.training import stopping
    from worker.training.tiny_model import make_tiny_model

    saved = {signum: signal.getsignal(signum) for signum in stopping.STOP_SIGNALS}
    stopping.install_handlers()
    root = Path(tempfile.mkdtemp(prefix="bench-stop-"))
    try:
        model_dir = make_tiny_model(root / "model", seed=0, **setup.model)
        train_file, _ = write_data(root, setup)
        print(f"{'adapter':8s} {'step s':>8s} {'stop s':>8s} {'checkpoint MB':>14s}   grace needed = step + stop")
        for adapter in ("lora", "qlora", "full"):
            row = measure(model_dir, train_file, root, adapter)
            print(f"{adapter:8s} {row['step']:8.2f} {row['stop']:8.2f} {row['checkpoint_mb']:14.1f}   "
                  f"{row['step'] + row['stop']:.1f} s")
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
        stopping.clear()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
