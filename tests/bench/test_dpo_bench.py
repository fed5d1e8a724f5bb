"""The DPO benchmark runs end to end in quick mode: every row trains, is scored and prints its figures (no timing
assertion)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.dpo import ROWS, main, runnable_rows, trl_version

pytestmark = pytest.mark.skipif(not trl_version(), reason="the DPO benchmark compares against TRL")


def test_dpo_benchmark_quick_run_reports_every_row_and_the_ratios(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = main(["--quick", "--dir", str(tmp_path)])
    out = capsys.readouterr().out
    expected = runnable_rows(list(ROWS))  # the -bf16 rows where the CPU has bf16 instructions (or on a GPU)
    assert list(results) == expected and {"tuneforge", "trl"} <= set(expected)
    for name, row in results.items():
        assert row["steps"] == 2 and row["pairs"] == 16, name
        assert row["pairs_per_second"] > 0 and row["peak_mb"] > 0, name
        assert 0.0 <= row["valid_accuracy"] <= 1.0, name
    # The reference pass is timed inside each row's span (TRL's default, inline, has none).
    assert all(results[name]["reference_seconds"] > 0
               for name in ("tuneforge", "trl", "tuneforge-bf16", "trl-bf16") if name in expected)
    printed = {line.split()[0] for line in out.splitlines() if line.split()}
    assert set(expected) <= printed
    assert "tuneforge/trl:" in out
    if "trl-bf16-inline" in expected:
        assert results["trl-bf16-inline"]["reference_seconds"] == 0
        for ratio in ("tuneforge-bf16/trl-bf16:", "tuneforge-bf16/trl-bf16-inline:"):
            assert ratio in out
    else:
        assert "left out tuneforge-bf16, trl-bf16, trl-bf16-inline: this CPU has no bf16 instructions" in out
    assert list(tmp_path.iterdir()) == []  # the scratch directory is removed
