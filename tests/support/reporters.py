"""A Reporter that records what a training run says, for tests and benchmarks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker.training.reporting import Control, Level


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
