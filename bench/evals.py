"""What the default validation curve costs: the time train() spends in periodic evaluations against the time it
spends in training steps, in one run on the training benchmark's model.

    python -m bench.evals                  # 384 training / 256 validation examples, 2 epochs
    python -m bench.evals --examples 96    # shorter

The job defaults apply (LoRA r=16 on every linear, batch 8 as a 384-example job resolves it, n_evals as a job
with a validation file resolves it: 3 for 384 examples x 2 epochs); the recipe picks the evaluation sample
(at most 256 examples, together at most 8% of the tokens trained). Both clocks wrap the recipe's own phases
(`train_step`, and `evaluate_on` for the periodic evaluations; the final full evaluation is reported apart).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description="the cost of periodic evaluations at the defaults")
    parser.add_argument("--examples", type=int, default=384)
    parser.add_argument("--validation", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args(argv)

    import torch

    from app.schemas.training import TrainingConfig
    from app.services.jobs import default_n_evals
    from bench.train import LLAMA_1K, write_data
    from tests.support.reporters import RecordingReporter
    from worker.training import recipe
    from worker.training.tiny_model import make_tiny_model

    root = Path(tempfile.mkdtemp(prefix="bench-evals-"))
    clocks = {"train": 0.0, "periodic": 0.0, "final": 0.0}
    steps_plan: dict[str, Any] = {}
    original_step, original_eval = recipe.train_step, recipe.evaluate_on

    def timed_step(run: Any, state: Any, plan: Any) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            return original_step(run, state, plan)
        finally:
            clocks["train"] += time.perf_counter() - started

    def timed_eval(run: Any, plan: Any) -> dict[str, float]:
        started = time.perf_counter()
        try:
            return original_eval(run, plan)
        finally:
            clocks["periodic" if plan is run.subset_plan else "final"] += time.perf_counter() - started
            steps_plan["sample"] = sum(len(b) for b in run.subset_plan)

    recipe.train_step, recipe.evaluate_on = timed_step, timed_eval  # type: ignore[assignment]
    try:
        setup = dataclasses.replace(LLAMA_1K, n_train=args.examples, n_valid=args.validation)
        model_dir = make_tiny_model(root / "model", seed=0, **setup.model)
        train_file, valid_file = write_data(root, setup)
        config = TrainingConfig.model_validate({
            "n_epochs": args.epochs, "batch_size": 8,
            "n_evals": default_n_evals(n_examples=args.examples, n_epochs=args.epochs), "max_seq_length": 1024,
            "precision": "bf16" if torch.cuda.is_available() else "fp32", "seed": 42})
        reporter = RecordingReporter()
        result = recipe.train(config, model_path=model_dir, train_file=train_file, validation_file=valid_file,
                              output_dir=root / "out", reporter=reporter)
    finally:
        recipe.train_step, recipe.evaluate_on = original_step, original_eval  # type: ignore[assignment]
        shutil.rmtree(root, ignore_errors=True)
    evaluations = len([s for s in reporter.steps if "valid_loss" in s])
    share = clocks["periodic"] / clocks["train"]
    print(f"{args.examples} examples x {args.epochs} epochs, {result.steps} steps; {evaluations} evaluations on "
          f"{steps_plan.get('sample')} of {args.validation} validation examples")
    print(f"training steps {clocks['train']:.1f} s, periodic evaluations {clocks['periodic']:.1f} s "
          f"({share:.1%} of the training steps), final full evaluation {clocks['final']:.1f} s")
    return {"share": share, **clocks}


if __name__ == "__main__":
    main()
