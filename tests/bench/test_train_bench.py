"""The training benchmark runs end to end in quick mode: both shapes, every row trains and prints its figures, and the
ratios name the best peer (no timing assertion)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.train import QUICK, bracket, main, run_order, runnable_rows, trl_version
from bench.train_rows import Row


def test_training_benchmark_quick_run_prints_every_row_of_both_shapes_and_the_best_peer_ratios(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = main(["--quick", "--dir", str(tmp_path)])
    out = capsys.readouterr().out
    sections = out.split("\n== ")[1:]
    assert [s.split(":")[0] for s in sections] == ["llama-1k", "qwen2-152k"]
    for section in sections:
        shape = QUICK[section.split(":")[0]]
        expected = [r for r in shape.rows if (trl_version() or Row(r).stack != "trl") and Row(r).setting != "liger"]
        assert {name: r["status"] for name, r in results[shape.name].items()} == dict.fromkeys(expected, "ok")
        printed = {line.split()[0]: line.split()[1:] for line in section.splitlines() if line.split()}
        for name in expected:  # steps, real tokens, tokens/s, ... MFU: every figure printed
            assert len(printed[name]) == 14, printed[name]
        for adapter in ("LoRA", "QLoRA"):
            assert f"{shape.name} {adapter}: " in section
        for name in ("tuneforge", "tuneforge-qlora"):  # run before and after the other rows of its adapter type
            assert f"ran {name}: " in section and f"ran {name} again: " in section
            assert f"{name}: training loop " in section and "before its peers" in section
            assert "MB before" in section and "the table has the higher" in section
        # the matmul peak: before and after the rows, and from each row's process (tuneforge's rows run twice)
        runs = len(expected) + 2
        assert f"after each of the {runs} row runs " in section
        assert all(r["matmul_peak"] > 0 for r in results[shape.name].values())
        if trl_version():
            assert f"{shape.name} LoRA: tokens/s tuneforge/best peer (" in section
            assert "peak memory tuneforge/leanest peer (" in section
    assert "load average at start" in out and "matmul peak before the rows" in out
    assert list(tmp_path.iterdir()) == []  # the scratch directory is removed


def test_each_tuneforge_row_runs_first_and_last_of_its_adapter_type_and_counts_the_mean() -> None:
    assert run_order(["hf-dynamic", "trl", "tuneforge", "hf-grouped-qlora", "tuneforge-qlora"]) == [
        "tuneforge", "hf-dynamic", "trl", "tuneforge", "tuneforge-qlora", "hf-grouped-qlora", "tuneforge-qlora"]
    assert run_order(["tuneforge", "seed-qlora"]) == ["tuneforge", "seed-qlora"]  # alone in its type: once
    first = {"status": "ok", "seconds": 10.0, "cpu_seconds": 19.0, "peak_mb": 900.0, "loop_mb": 800.0}
    last = {**first, "seconds": 14.0, "cpu_seconds": 27.0, "peak_mb": 880.0, "loop_mb": 850.0}
    both = bracket(first, last)
    assert (both["seconds"], both["cpu_seconds"], both["peak_mb"], both["loop_mb"]) == (12.0, 23.0, 900.0, 850.0)
    assert both["runs_seconds"] == (10.0, 14.0) and both["runs_peak_mb"] == (900.0, 880.0)
    stopped = {"status": "failed: out of memory"}
    assert bracket(first, stopped) is stopped and bracket(stopped, last) is stopped


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA device with liger-kernel the Liger rows run")
def test_the_liger_rows_are_left_out_without_a_cuda_device() -> None:
    rows = ["hf-grouped", "trl-padding-free", "trl-liger", "tuneforge", "trl-liger-qlora", "tuneforge-qlora"]
    expected = ["hf-grouped", "trl-padding-free", "tuneforge", "tuneforge-qlora"] if trl_version() else [
        "hf-grouped", "tuneforge", "tuneforge-qlora"]
    assert runnable_rows(rows, in_process=False) == expected


def test_the_liger_rows_run_only_in_a_process_of_their_own(monkeypatch: pytest.MonkeyPatch) -> None:
    # Liger patches the model's classes for the whole process: in-process, every later row would run its kernels.
    import bench.train

    monkeypatch.setattr(bench.train, "liger_version", lambda: "0.8.5")
    monkeypatch.setattr(bench.train, "trl_version", lambda: "1.16.0")
    rows = ["trl-padding-free", "trl-liger", "tuneforge", "trl-liger-qlora"]
    assert runnable_rows(rows, in_process=False) == rows
    assert runnable_rows(rows, in_process=True) == ["trl-padding-free", "tuneforge"]
