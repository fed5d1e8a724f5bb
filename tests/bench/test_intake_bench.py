"""The intake benchmark runs end to end in smoke mode and prints its figures (no timing assertion)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.intake import main


def test_intake_benchmark_smoke_run_prints_throughput_ratio_and_rss(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    main(["--size-mb", "2", "--dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "plain json.loads pass:" in out and "DatasetValidator pass:" in out
    assert "ratio validator/plain:" in out and out.count("peak RSS growth") == 2
    assert list(tmp_path.iterdir()) == []  # the generated file is removed
