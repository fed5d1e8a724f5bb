from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.support.reporters import RecordingReporter
from tests.worker.training.factories import code_mapping, make_config, write_jsonl
from worker.training.checkpoint import checkpoint_steps, verify_checkpoint
from worker.training.recipe import train
from worker.training.reporting import TrainingPaused


def test_checkpoint_schedule() -> None:
    assert checkpoint_steps(10, save_steps=3, n_checkpoints=1) == {3, 6, 9}
    assert checkpoint_steps(10, save_steps=None, n_checkpoints=1) == {10}
    assert checkpoint_steps(10, save_steps=None, n_checkpoints=3) == {3, 7, 10}
    assert checkpoint_steps(2, save_steps=None, n_checkpoints=5) == {1, 2}


def test_checkpoint_is_complete_and_verify_detects_corruption(tmp_path: Path, tiny_model: Path) -> None:
    reporter = RecordingReporter()
    train(
        make_config(n_checkpoints=2),
        model_path=tiny_model,
        train_file=write_jsonl(tmp_path / "t.jsonl", code_mapping(16)),
        validation_file=None,
        output_dir=tmp_path / "out",
        reporter=reporter,
    )
    assert [c["step"] for c in reporter.checkpoints] == [2, 4]
    root = tmp_path / "out" / "checkpoints"
    assert [p.name for p in root.iterdir()] == ["step-4"]  # step-2 pruned, no temp dirs left behind
    path = root / "step-4"
    manifest = json.loads((path / "manifest.json").read_text())["files"]
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pt", "trainer_state.json"} <= set(
        manifest
    )
    state = json.loads((path / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["total_steps"] == 4
    assert verify_checkpoint(path)

    weights = path / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, one flipped byte
    weights.write_bytes(bytes(data))
    assert not verify_checkpoint(path)
    with pytest.raises(ValueError, match="incomplete or corrupted"):
        train(make_config(), model_path=tiny_model, train_file=tmp_path / "t.jsonl", validation_file=None,
              output_dir=tmp_path / "again", reporter=RecordingReporter(), resume_from=path)  # fmt: skip
    (path / "optimizer.pt").unlink()
    assert not verify_checkpoint(path)


@pytest.mark.parametrize(
    ("n_examples", "n_epochs", "accum"),
    [(24, 1, 1), (12, 2, 1), (12, 2, 2)],
    ids=["mid-epoch", "epoch-boundary", "accumulation"],
)
def test_resume_continues_the_exact_loss_curve(
    tmp_path: Path, tiny_model: Path, n_examples: int, n_epochs: int, accum: int
) -> None:
    # Dropout on: the resumed run must also restore the RNG, not just weights and optimizer.
    config = make_config(
        adapter={"type": "lora", "r": 4, "alpha": 8, "dropout": 0.1},
        n_epochs=n_epochs,
        gradient_accumulation_steps=accum,
        batch_size=4 // accum,
        lr_scheduler="cosine",
        warmup_ratio=0.2,
    )
    train_file = write_jsonl(tmp_path / "t.jsonl", code_mapping(n_examples))
    common = dict(model_path=tiny_model, train_file=train_file, validation_file=None)
    full = RecordingReporter()
    uninterrupted = train(config, output_dir=tmp_path / "full", reporter=full, **common)
    assert uninterrupted.steps == 6

    paused = RecordingReporter(commands={3: "pause"})
    with pytest.raises(TrainingPaused) as stopped:
        train(config, output_dir=tmp_path / "paused", reporter=paused, **common)
    resumed = RecordingReporter()
    result = train(
        config, output_dir=tmp_path / "resumed", reporter=resumed, resume_from=stopped.value.checkpoint, **common
    )
    assert [s["step"] for s in resumed.steps] == [4, 5, 6]
    assert result.steps == uninterrupted.steps and result.trained_tokens == uninterrupted.trained_tokens
    assert resumed.losses() == pytest.approx(full.losses()[3:], rel=1e-5)
    assert [s["learning_rate"] for s in resumed.steps] == pytest.approx([s["learning_rate"] for s in full.steps[3:]])
    # The resumed run's CSV holds the whole history.
    assert len(result.metrics_csv.read_text().splitlines()) == 1 + 6


def test_pruning_keeps_the_latest_and_the_best_checkpoint(tmp_path: Path, tiny_model: Path) -> None:
    reporter = RecordingReporter()
    data = code_mapping(16)
    train(
        make_config(n_epochs=3, learning_rate=0.05, eval_steps=1, save_steps=1),
        model_path=tiny_model,
        train_file=write_jsonl(tmp_path / "t.jsonl", data),
        validation_file=write_jsonl(tmp_path / "v.jsonl", code_mapping(4, seed=1)),
        output_dir=tmp_path / "out",
        reporter=reporter,
    )
    valid = {s["step"]: s["valid_loss"] for s in reporter.steps}
    best = min(valid, key=valid.get)
    kept = {p.name for p in (tmp_path / "out" / "checkpoints").iterdir()}
    assert kept == {f"step-{best}", "step-12"}


class KeepingReporter(RecordingReporter):
    """Copies every registered checkpoint aside, as the service uploads it, so pruning cannot remove it."""

    def __init__(self, keep: Path, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.keep = keep

    def checkpoint_saved(self, *, step: int, path: Path, metrics: dict) -> None:
        super().checkpoint_saved(step=step, path=path, metrics=metrics)
        shutil.copytree(path, self.keep / path.name)


def test_checkpoint_command_saves_at_that_step_and_training_continues(tmp_path: Path, tiny_model: Path) -> None:
    reporter = RecordingReporter(commands={1: "checkpoint", 3: "checkpoint", 4: "checkpoint"})
    result = train(make_config(), model_path=tiny_model, train_file=write_jsonl(tmp_path / "t.jsonl", code_mapping(16)),
                   validation_file=None, output_dir=tmp_path / "out", reporter=reporter)  # fmt: skip
    assert result.steps == 4 == len(reporter.steps)
    # Step 4 is the scheduled final checkpoint already: the command does not save it twice.
    assert [c["step"] for c in reporter.checkpoints] == [1, 3, 4]
    assert [c["metrics"]["step"] for c in reporter.checkpoints] == [1, 3, 4]


def test_resume_from_a_time_based_checkpoint_continues_the_exact_loss_curve(tmp_path: Path, tiny_model: Path) -> None:
    config = make_config(adapter={"type": "lora", "r": 4, "alpha": 8, "dropout": 0.1}, n_epochs=2,
                         lr_scheduler="cosine", warmup_ratio=0.2)  # fmt: skip
    common = dict(model_path=tiny_model, train_file=write_jsonl(tmp_path / "t.jsonl", code_mapping(12)),
                  validation_file=None)  # fmt: skip
    reporter = KeepingReporter(tmp_path / "kept", commands={2: "checkpoint"})
    uninterrupted = train(config, output_dir=tmp_path / "full", reporter=reporter, **common)
    assert uninterrupted.steps == 6 and [c["step"] for c in reporter.checkpoints] == [2, 6]
    assert verify_checkpoint(tmp_path / "kept" / "step-2")
    resumed = RecordingReporter()
    result = train(config, output_dir=tmp_path / "resumed", reporter=resumed,
                   resume_from=tmp_path / "kept" / "step-2", **common)  # fmt: skip
    assert [s["step"] for s in resumed.steps] == [3, 4, 5, 6]
    assert result.trained_tokens == uninterrupted.trained_tokens
    assert resumed.losses() == pytest.approx(reporter.losses()[2:], rel=1e-5)
