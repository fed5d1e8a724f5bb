"""The training benchmark runs end to end in quick mode and prints every row (no timing assertion)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.train import main, trl_version


def test_training_benchmark_quick_run_prints_every_variant_and_the_targets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main(["--quick", "--dir", str(tmp_path)])
    out = capsys.readouterr().out
    rows = {line.split()[0] for line in out.splitlines() if line.split() and line.split()[0].isascii()}
    expected = {"seed", "hf-dynamic", "tuneforge", "seed-qlora", "tuneforge-qlora"}
    if trl_version():
        expected |= {"trl", "trl-packing"}
    assert expected <= rows
    assert "matmul peak (" in out and "targets: tuneforge/seed tokens/s =" in out and "QLoRA: tuneforge/seed" in out
    assert list(tmp_path.iterdir()) == []  # the scratch directory is removed
