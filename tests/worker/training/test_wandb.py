from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.reporters import RecordingReporter
from tests.worker.training.factories import code_mapping, make_config, write_jsonl
from worker.training.recipe import train


def test_wandb_logs_every_step_offline(tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb-dir").mkdir()
    reporter = RecordingReporter()
    train(
        make_config(),
        model_path=tiny_model,
        train_file=write_jsonl(tmp_path / "t.jsonl", code_mapping(8)),
        validation_file=None,
        output_dir=tmp_path / "out",
        reporter=reporter,
        wandb={"project": "tuneforge-test", "name": "tiny", "tags": ["test"]},
    )
    runs = list((tmp_path / "wandb-dir" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # Offline runs keep their history in the binary .wandb log (synced later with `wandb sync`).
    logs = list(runs[0].glob("*.wandb"))
    assert len(logs) == 1 and b"train_loss" in logs[0].read_bytes()
    started = [e["data"] for e in reporter.events if e["message"].startswith("W&B run ")]
    assert len(started) == 1 and tmp_path / "wandb-dir" / started[0]["sync_file"] == logs[0]


@pytest.mark.parametrize("fails_at", ["init", "log"])
def test_a_wandb_failure_is_a_warning_and_training_goes_on(tmp_path: Path, tiny_model: Path,
                                                           monkeypatch: pytest.MonkeyPatch, fails_at: str) -> None:
    wandb = pytest.importorskip("wandb")

    class BrokenRun:
        def log(self, *_args: object, **_kwargs: object) -> None:
            raise ConnectionError("W&B is unreachable")

        def finish(self, **_kwargs: object) -> None:
            raise ConnectionError("still unreachable")

    def init(**_kwargs: object) -> object:
        if fails_at == "init":
            raise wandb.errors.UsageError("api_key not configured (no-tty)")
        return BrokenRun()

    monkeypatch.setattr(wandb, "init", init)
    if fails_at == "log":  # the event about where the run logs reads the run's settings
        monkeypatch.setattr("worker.training.recipe._describe_wandb_run", lambda run: ("a broken run", {}))
    reporter = RecordingReporter()
    result = train(make_config(), model_path=tiny_model, train_file=write_jsonl(tmp_path / "t.jsonl", code_mapping(8)),
                   validation_file=None, output_dir=tmp_path / "out", reporter=reporter,
                   wandb={"project": "tuneforge-test"})
    assert result.steps == len(reporter.steps) > 1  # every step ran
    warnings = reporter.warnings()
    assert len(warnings) == 1 and "training goes on without it" in warnings[0]
    assert ("could not start" if fails_at == "init" else "failed at step 1") in warnings[0]
