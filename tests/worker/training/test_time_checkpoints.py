"""DatabaseReporter asks for a checkpoint once checkpoint_interval_seconds have passed (no database needed)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import worker.database_reporter as reporter_module
from worker.database_reporter import DatabaseReporter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_reporter(
    monkeypatch: pytest.MonkeyPatch, clock: Clock, answer: list[str], interval: float
) -> DatabaseReporter:
    monkeypatch.setattr(reporter_module.time, "monotonic", clock)
    settings: Any = SimpleNamespace(checkpoint_interval_seconds=interval, lease_seconds=30,
                                    checkpoints_kept_after_finish=3)
    reporter = DatabaseReporter(job_pk=1, job_id="ftjob-x", attempt=1, storage=None,  # type: ignore[arg-type]
                                settings=settings, scratch=Path("."))
    monkeypatch.setattr(reporter, "_guard", lambda write, **kwargs: answer[0])
    return reporter


def test_control_answers_checkpoint_after_the_interval_since_the_start(monkeypatch: pytest.MonkeyPatch) -> None:
    clock, answer = Clock(), ["continue"]
    reporter = make_reporter(monkeypatch, clock, answer, interval=600)
    clock.now += 599
    assert reporter.control() == "continue"
    clock.now += 2
    assert reporter.control() == "checkpoint"
    assert reporter.control() == "checkpoint"  # until a checkpoint is registered


def test_a_saved_checkpoint_restarts_the_interval(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clock, answer = Clock(), ["continue"]
    reporter = make_reporter(monkeypatch, clock, answer, interval=600)
    monkeypatch.setattr(reporter_module, "tar_directory", lambda source, target: target.touch() or target)
    stored = SimpleNamespace(sha256="0" * 64, bytes=0)
    reporter.storage = SimpleNamespace(write=lambda key, chunks: stored)  # type: ignore[assignment]
    reporter.scratch = tmp_path
    pruned: list[tuple[int, int | None]] = []  # retention runs after each registration; no database here
    monkeypatch.setattr(reporter_module, "session_scope", contextlib.nullcontext)
    monkeypatch.setattr(reporter_module, "prune_checkpoints",
                        lambda session, **kwargs: pruned.append((kwargs["keep"], kwargs["keep_step"])))
    # what a checkpoint's trainer state says: retention keeps the run's best step for load_best_at_end
    (tmp_path / "trainer_state.json").write_text(json.dumps({"best_step": 2, "config": {"load_best_at_end": True}}))
    clock.now += 700
    assert reporter.control() == "checkpoint"
    reporter.checkpoint_saved(step=5, path=tmp_path, metrics={"step": 5})
    assert pruned == [(3, 2)]
    clock.now += 10
    assert reporter.control() == "continue"
    clock.now += 600
    assert reporter.control() == "checkpoint"


def test_cancel_and_pause_win_over_a_due_checkpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    clock, answer = Clock(), ["cancel"]
    reporter = make_reporter(monkeypatch, clock, answer, interval=1)
    clock.now += 5
    assert reporter.control() == "cancel"
    answer[0] = "pause"
    clock.now += 5
    assert reporter.control() == "pause"
