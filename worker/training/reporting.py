"""How a training run talks to whoever runs it: events, per-step metrics, checkpoints, control.

The recipe only calls a `Reporter`; the worker passes one that writes to Postgres
(worker/database_reporter.py), the command line passes `PrintReporter`, tests and benchmarks pass
`RecordingReporter` (tests/support/reporters.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal, Protocol

# What a reporter raises when the attempt lost its lease; the recipe lets it propagate.
from app.core.leases import StaleAttempt as StaleAttempt

Level = Literal["info", "warn", "error"]
# "checkpoint" asks for a checkpoint at the current step and then continues: the caller's way to bound
# the work a crash loses (e.g. one every 10 minutes), whatever save_steps / n_checkpoints say.
Control = Literal["continue", "cancel", "pause", "checkpoint"]


class TrainingCancelled(Exception):
    """The run was cancelled at the user's request."""


class TrainingPaused(Exception):
    """The run was paused at the user's request after saving `checkpoint`."""

    def __init__(self, checkpoint: Path) -> None:
        super().__init__(f"training paused; resume from {checkpoint}")
        self.checkpoint = checkpoint


class TrainingReleased(TrainingPaused):
    """The run stopped after saving `checkpoint` because its process was asked to stop (SIGTERM/SIGINT);
    the job goes on elsewhere from that checkpoint."""


class TrainingDiverged(ValueError):
    """The loss became NaN or infinite."""


class Reporter(Protocol):
    """What the recipe needs from its caller."""

    def event(self, message: str, *, level: Level = "info", data: dict[str, Any] | None = None) -> None:
        """Record a human-readable event."""

    def metrics(self, data: dict[str, Any]) -> None:
        """Record one optimizer step's metrics."""

    def checkpoint_saved(self, *, step: int, path: Path, metrics: dict[str, Any]) -> None:
        """Called after a checkpoint directory was atomically written."""

    def control(self) -> Control:
        """Return whether to continue, cancel, pause or checkpoint and continue; polled every step."""


class PrintReporter:
    """Prints one JSON line per call, for standalone runs."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stdout

    def _print(self, kind: str, payload: dict[str, Any]) -> None:
        print(json.dumps({"type": kind, **payload}, default=str), file=self.stream, flush=True)

    def event(self, message: str, *, level: Level = "info", data: dict[str, Any] | None = None) -> None:
        """Print an event line."""
        self._print("event", {"level": level, "message": message, "data": data or {}})

    def metrics(self, data: dict[str, Any]) -> None:
        """Print a metrics line."""
        self._print("metrics", data)

    def checkpoint_saved(self, *, step: int, path: Path, metrics: dict[str, Any]) -> None:
        """Print a checkpoint line."""
        self._print("checkpoint", {"step": step, "path": str(path), "metrics": metrics})

    def control(self) -> Control:
        """Always continue: a terminal run is stopped with Ctrl-C."""
        return "continue"


class SilentReporter:
    """Says nothing and always continues: the other processes of a multi-process run (rank 0 reports)."""

    def event(self, message: str, *, level: Level = "info", data: dict[str, Any] | None = None) -> None:
        """Drop the event."""

    def metrics(self, data: dict[str, Any]) -> None:
        """Drop the metrics."""

    def checkpoint_saved(self, *, step: int, path: Path, metrics: dict[str, Any]) -> None:
        """Drop the checkpoint notice."""

    def control(self) -> Control:
        """Continue; rank 0's answer is what counts."""
        return "continue"
