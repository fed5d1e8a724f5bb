"""The training benchmark runs end to end in quick mode: both shapes, every row trains and prints its figures, and the
ratios name the best peer (no timing assertion)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.train import QUICK, main, trl_version
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
        expected = [r for r in shape.rows if trl_version() or Row(r).stack != "trl"]
        assert {name: r["status"] for name, r in results[shape.name].items()} == dict.fromkeys(expected, "ok")
        printed = {line.split()[0]: line.split()[1:] for line in section.splitlines() if line.split()}
        for name in expected:  # steps, real tokens, tokens/s, ... MFU: every figure printed
            assert len(printed[name]) == 14, printed[name]
        for adapter in ("LoRA", "QLoRA"):
            assert f"{shape.name} {adapter}: " in section
        if trl_version():
            assert f"{shape.name} LoRA: tokens/s tuneforge/best peer (" in section
            assert "peak memory tuneforge/leanest peer (" in section
    assert "load average at start" in out and "matmul peak before the rows" in out
    assert list(tmp_path.iterdir()) == []  # the scratch directory is removed
