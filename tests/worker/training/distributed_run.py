"""Run train() in every process of a torchrun launch and write what rank 0 saw to OUTPUT/report.json.

`python -m torch.distributed.run --standalone --nproc-per-node 2 -m tests.worker.training.distributed_run
--config C --model M --train T --validation V --output O [--resume DIR] [--pause-at STEP]`
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from app.schemas.training import TrainingConfig
from worker.training import distributed
from worker.training.recipe import train
from worker.training.reporting import RecordingReporter, TrainingPaused


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("--config", "--model", "--train", "--output"):
        parser.add_argument(name, type=Path, required=True)
    parser.add_argument("--validation", type=Path, default=None)
    parser.add_argument("--resume", type=Path, default=None)
    parser.add_argument("--pause-at", type=int, default=None)
    args = parser.parse_args()
    reporter = RecordingReporter(commands={args.pause_at: "pause"} if args.pause_at else {})
    paused = None
    try:
        train(TrainingConfig.model_validate_json(args.config.read_text()), model_path=args.model,
              train_file=args.train, validation_file=args.validation, output_dir=args.output, reporter=reporter,
              resume_from=args.resume)
    except TrainingPaused as stop:
        paused = str(stop.checkpoint)
    if distributed.from_environment().is_main:
        report = {"steps": reporter.steps, "events": reporter.events, "paused": paused,
                  "checkpoints": [{"step": c["step"], "path": str(c["path"])} for c in reporter.checkpoints]}
        (args.output / "report.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
