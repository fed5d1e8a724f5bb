"""How a training run talks to whoever runs it: events, per-step metrics, checkpoints, control.

The recipe only calls a `Reporter`; the Celery task passes one that writes to Postgres, the command
line passes `PrintReporter`, tests pass `RecordingReporter`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

Level = Literal["info", "warn", "error"]
# "checkpoint" asks for a checkpoint at the current step and then continues: the caller's way to bound
# the work a crash loses (e.g. one every 10 minutes), whatever save_steps / n_checkpoints say.
Control = Literal["continue", "cancel", "pause", "checkpoint"]


class StaleAttempt(Exception):
    """Raised by a reporter when this attempt lost its lease; the recipe lets it propagate."""


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


@dataclass
class RecordingReporter:
    """Keeps everything in lists; `commands` maps a step number to the control answer to give then."""

    events: list[dict[str, Any]] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    commands: dict[int, Control] = field(default_factory=dict)

    def event(self, message: str, *, level: Level = "info", data: dict[str, Any] | None = None) -> None:
        """Record an event."""
        self.events.append({"message": message, "level": level, "data": data or {}})

    def metrics(self, data: dict[str, Any]) -> None:
        """Record a step's metrics."""
        self.steps.append(dict(data))

    def checkpoint_saved(self, *, step: int, path: Path, metrics: dict[str, Any]) -> None:
        """Record a saved checkpoint."""
        self.checkpoints.append({"step": step, "path": path, "metrics": dict(metrics)})

    def control(self) -> Control:
        """Answer what `commands` says for the step just reported, else continue."""
        step = self.steps[-1]["step"] if self.steps else 0
        return self.commands.get(step, "continue")

    def losses(self) -> list[float]:
        """The train_loss of every reported step, in order."""
        return [s["train_loss"] for s in self.steps]

    def warnings(self) -> list[str]:
        """The messages of warn-level events."""
        return [e["message"] for e in self.events if e["level"] == "warn"]
