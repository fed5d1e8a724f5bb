"""Does fine-tuning teach the tiny model something it cannot know? A synthetic key -> code mapping.

Validation here reuses the training pairs: the tiny random model cannot generalise, so the question is
only whether the adapter learns (memorises) the mapping, measured on the completion tokens.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.reporters import RecordingReporter
from tests.worker.training.factories import code_mapping, make_config, write_jsonl
from worker.training.recipe import train


@pytest.mark.slow
@pytest.mark.parametrize(
    ("adapter", "min_accuracy"),
    [
        ({"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0}, 0.5),
        ({"type": "qlora", "r": 8, "alpha": 16, "dropout": 0.0}, 0.5),
    ],
    ids=["lora", "qlora"],
)
def test_validation_token_accuracy_rises_on_an_unknowable_mapping(
    tmp_path: Path, tiny_model: Path, adapter: dict, min_accuracy: float
) -> None:
    data = code_mapping(16)
    reporter = RecordingReporter()
    result = train(
        make_config(adapter=adapter, n_epochs=10, learning_rate=1e-2, eval_steps=4),
        model_path=tiny_model,
        train_file=write_jsonl(tmp_path / "t.jsonl", data),
        validation_file=write_jsonl(tmp_path / "v.jsonl", data),
        output_dir=tmp_path / "out",
        reporter=reporter,
    )
    evaluated = [s for s in reporter.steps if "valid_loss" in s]
    first, last = evaluated[0], evaluated[-1]
    assert last["valid_mean_token_accuracy"] >= min_accuracy
    assert last["valid_mean_token_accuracy"] >= first["valid_mean_token_accuracy"] + 0.3
    assert last["valid_loss"] < first["valid_loss"] - 1.0
    assert result.final_metrics["full_valid_mean_token_accuracy"] >= min_accuracy
