"""GPU tier: run on a lent CUDA machine with `pytest -m gpu` (skipped elsewhere)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.support.reporters import RecordingReporter
from tests.worker.training.factories import code_mapping, make_config, write_jsonl
from worker.training.recipe import train
from worker.training.reporting import TrainingPaused

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def run(tmp_path: Path, tiny_model: Path, **overrides: object) -> tuple[object, RecordingReporter]:
    reporter = RecordingReporter()
    result = train(make_config(**overrides), model_path=tiny_model,
                   train_file=write_jsonl(tmp_path / "t.jsonl", code_mapping(16)), validation_file=None,
                   output_dir=tmp_path / "out", reporter=reporter)  # fmt: skip
    return result, reporter


def test_bf16_autocast_training_on_cuda_lowers_the_loss(tmp_path: Path, tiny_model: Path) -> None:
    _, reporter = run(tmp_path, tiny_model, precision="auto", n_epochs=6)
    assert "on cuda in bfloat16" in reporter.events[0]["message"] or "on cuda in float16" in reporter.events[0][
        "message"]
    losses = reporter.losses()
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4


def test_qlora_on_cuda_trains_a_4bit_base(tmp_path: Path, tiny_model: Path) -> None:
    adapter = {"type": "qlora", "r": 8, "alpha": 16, "dropout": 0.0}
    result, reporter = run(tmp_path, tiny_model, precision="auto", n_epochs=6, adapter=adapter)
    losses = reporter.losses()
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4
    assert (result.final_dir / "adapter_model.safetensors").is_file()  # type: ignore[attr-defined]


def test_training_benchmark_quick_mode_runs_on_cuda(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bench.train import main

    main(["--quick", "--dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert out.startswith("device: cuda") and "llama-1k LoRA: tuneforge/seed tokens/s =" in out


def test_fp16_loss_scale_survives_a_pause_and_resume(tmp_path: Path, tiny_model: Path) -> None:
    paused = RecordingReporter(commands={3: "pause"})
    train_file = write_jsonl(tmp_path / "t.jsonl", code_mapping(16))
    with pytest.raises(TrainingPaused) as stop:
        train(make_config(precision="fp16", n_epochs=2), model_path=tiny_model, train_file=train_file,
              validation_file=None, output_dir=tmp_path / "out", reporter=paused)  # fmt: skip
    saved = json.loads((stop.value.checkpoint / "trainer_state.json").read_text())["grad_scaler"]
    assert saved["scale"] > 0 and "_growth_tracker" in saved
    resumed = RecordingReporter()
    train(make_config(precision="fp16", n_epochs=2), model_path=tiny_model, train_file=train_file,
          validation_file=None, output_dir=tmp_path / "again", reporter=resumed, resume_from=stop.value.checkpoint)
    assert "resumed from checkpoint at step 3" in [e["message"] for e in resumed.events[:3]]
    assert all(math.isfinite(x) for x in resumed.losses())


def test_two_gpu_ddp_processes_follow_the_one_process_curve(tmp_path: Path, tiny_model: Path) -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    from tests.worker.training.test_distributed import SETTINGS, _torchrun

    write_jsonl(tmp_path / "t.jsonl", code_mapping(24))
    write_jsonl(tmp_path / "v.jsonl", code_mapping(6, seed=1))
    report = _torchrun(tmp_path, tiny_model, make_config(**SETTINGS, processes=2, precision="bf16"), tmp_path / "d")
    assert report["events"][0]["message"].startswith("training lora on 2 cuda processes (ddp)")
    one = RecordingReporter()  # the same global batch in one process on one GPU
    train(make_config(**SETTINGS, precision="bf16"), model_path=tiny_model, train_file=tmp_path / "t.jsonl",
          validation_file=tmp_path / "v.jsonl", output_dir=tmp_path / "one", reporter=one)
    assert [s["step"] for s in report["steps"]] == [s["step"] for s in one.steps]
    # bf16 sums in another order across two processes: the curves agree to bf16's precision, not exactly.
    assert [s["train_loss"] for s in report["steps"]] == pytest.approx(one.losses(), rel=2e-2)
