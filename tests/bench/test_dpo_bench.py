"""The DPO benchmark runs end to end in quick mode: every row trains, is scored and prints its figures (no timing
assertion)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.dpo import ROWS, main, trl_version

pytestmark = pytest.mark.skipif(not trl_version(), reason="the DPO benchmark compares against TRL")


def test_dpo_benchmark_quick_run_reports_every_row_and_the_ratios(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = main(["--quick", "--dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert list(results) == list(ROWS)
    for name, row in results.items():
        assert row["steps"] == 2 and row["pairs"] == 16, name
        assert row["pairs_per_second"] > 0 and row["peak_mb"] > 0, name
        assert 0.0 <= row["valid_accuracy"] <= 1.0, name
    # The reference pass is timed inside each row's span (TRL's default, inline, has none).
    assert all(results[name]["reference_seconds"] > 0 for name in ("tuneforge", "trl", "tuneforge-bf16", "trl-bf16"))
    assert results["trl-bf16-inline"]["reference_seconds"] == 0
    printed = {line.split()[0] for line in out.splitlines() if line.split()}
    assert set(ROWS) <= printed
    for ratio in ("tuneforge/trl:", "tuneforge-bf16/trl-bf16:", "tuneforge-bf16/trl-bf16-inline:"):
        assert ratio in out
    assert list(tmp_path.iterdir()) == []  # the scratch directory is removed
