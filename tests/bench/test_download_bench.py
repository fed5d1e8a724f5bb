"""The download benchmark runs (smoke size); its figures are for docs/benchmarks.md, not assertions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_download_benchmark_smoke_run_prints_its_figures() -> None:
    result = subprocess.run([sys.executable, "-m", "bench.download", "--size-mb", "8"],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MB/s" in result.stdout and "sha256 verified" in result.stdout
