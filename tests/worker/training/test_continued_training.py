"""Continued training: train(..., init_adapter=...) starts from an existing adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.reporters import RecordingReporter
from tests.worker.training.factories import code_mapping, make_config, write_jsonl
from worker.training.recipe import train

ADAPTER = {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0}


def test_training_from_a_trained_adapter_starts_at_a_lower_loss(tmp_path: Path, tiny_model: Path) -> None:
    common = dict(model_path=tiny_model, train_file=write_jsonl(tmp_path / "t.jsonl", code_mapping(16)),
                  validation_file=None)  # fmt: skip
    first = RecordingReporter()
    parent = train(make_config(n_epochs=6, adapter=ADAPTER), output_dir=tmp_path / "parent", reporter=first, **common)
    scratch, continued = RecordingReporter(), RecordingReporter()
    train(make_config(adapter=ADAPTER), output_dir=tmp_path / "scratch", reporter=scratch, **common)
    result = train(make_config(adapter=ADAPTER), output_dir=tmp_path / "continued", reporter=continued,
                   init_adapter=parent.final_dir, **common)  # fmt: skip
    # Step 1 of a fresh adapter is the base model's loss (B starts at zero); the parent already learnt the data.
    assert continued.losses()[0] < 0.8 * scratch.losses()[0]
    assert continued.losses()[0] == pytest.approx(first.losses()[-1], rel=0.35)
    assert any(e["message"] == "continuing training from an existing adapter" for e in continued.events)
    assert not continued.warnings()
    assert (result.final_dir / "adapter_model.safetensors").is_file()


def test_the_adapters_own_settings_win_and_an_event_says_so(tmp_path: Path, tiny_model: Path) -> None:
    common = dict(model_path=tiny_model, train_file=write_jsonl(tmp_path / "t.jsonl", code_mapping(8)),
                  validation_file=None)  # fmt: skip
    parent = train(make_config(adapter={**ADAPTER, "r": 4}), output_dir=tmp_path / "parent",
                   reporter=RecordingReporter(), **common)  # fmt: skip
    reporter = RecordingReporter()
    result = train(make_config(adapter=ADAPTER), output_dir=tmp_path / "child", reporter=reporter,
                   init_adapter=parent.final_dir, **common)  # fmt: skip
    (warning,) = reporter.warnings()
    assert "its own settings are used" in warning and "r: 8 -> 4" in warning
    assert json.loads((result.final_dir / "adapter_config.json").read_text())["r"] == 4


def test_continued_training_refuses_a_full_fine_tune_and_a_directory_without_an_adapter(
    tmp_path: Path, tiny_model: Path
) -> None:
    common = dict(model_path=tiny_model, train_file=write_jsonl(tmp_path / "t.jsonl", code_mapping(8)),
                  validation_file=None, output_dir=tmp_path / "out", reporter=RecordingReporter())  # fmt: skip
    with pytest.raises(ValueError, match="needs an adapter type"):
        train(make_config(adapter={"type": "full"}), init_adapter=tmp_path, **common)
    with pytest.raises(ValueError, match="adapter_config.json is missing"):
        train(make_config(), init_adapter=tmp_path, **common)
