from __future__ import annotations

from pathlib import Path

import pytest

from tests.worker.training.factories import code_mapping, make_config, write_jsonl
from worker.training.recipe import train
from worker.training.reporting import RecordingReporter


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
    assert len(started) == 1 and Path(started[0]["sync_file"]) == logs[0]
