"""Run train() in every process of a torchrun launch and write what rank 0 saw to OUTPUT/report.json.

`python -m torch.distributed.run --standalone --nproc-per-node 2 -m tests.worker.training.distributed_run
--config C --model M --train T --validation V --output O [--resume DIR] [--pause-at STEP]
[--sigterm-rank R --sigterm-at STEP]`: with --sigterm-*, rank R sends itself SIGTERM after STEP steps, as a
service manager's stop would, and the run must checkpoint and release.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path

from app.schemas.training import TrainingConfig
from tests.support.reporters import RecordingReporter
from worker.training import distributed, stopping
from worker.training.recipe import train
from worker.training.reporting import TrainingPaused, TrainingReleased


def sigterm_after(steps: int) -> None:
    """Make this process SIGTERM itself when the recipe asks for the stop flag the `steps`-th time (once a step)."""
    asked = {"count": 0}
    requested = stopping.requested

    def counting() -> bool:
        asked["count"] += 1
        if asked["count"] == steps:
            os.kill(os.getpid(), signal.SIGTERM)
            deadline = time.monotonic() + 5
            while not requested() and time.monotonic() < deadline:  # the handler runs between bytecodes
                time.sleep(0.01)
        return requested()

    stopping.requested = counting  # type: ignore[assignment]


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("--config", "--model", "--train", "--output"):
        parser.add_argument(name, type=Path, required=True)
    parser.add_argument("--validation", type=Path, default=None)
    parser.add_argument("--resume", type=Path, default=None)
    parser.add_argument("--pause-at", type=int, default=None)
    parser.add_argument("--sigterm-rank", type=int, default=None)
    parser.add_argument("--sigterm-at", type=int, default=None)
    args = parser.parse_args()
    stopping.install_handlers()
    if args.sigterm_at and distributed.from_environment().rank == args.sigterm_rank:
        sigterm_after(args.sigterm_at)
    reporter = RecordingReporter(commands={args.pause_at: "pause"} if args.pause_at else {})
    paused, released = None, False
    try:
        train(TrainingConfig.model_validate_json(args.config.read_text()), model_path=args.model,
              train_file=args.train, validation_file=args.validation, output_dir=args.output, reporter=reporter,
              resume_from=args.resume)
    except TrainingPaused as stop:
        paused, released = str(stop.checkpoint), isinstance(stop, TrainingReleased)
    if distributed.from_environment().is_main:
        report = {"steps": reporter.steps, "events": reporter.events, "paused": paused, "released": released,
                  "checkpoints": [{"step": c["step"], "path": str(c["path"])} for c in reporter.checkpoints]}
        (args.output / "report.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
