"""The download benchmark runs (smoke size); its figures are for docs/benchmarks.md, not assertions."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_download_benchmark_smoke_run_prints_its_figures() -> None:
    result = subprocess.run([sys.executable, "-m", "bench.download", "--size-mb", "8"],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]  # the benchmark checks the bytes' sha256 and a Range resume
    match = re.match(r"download of (\d+) MB \(database storage\): ([\d.]+) MB/s; server RSS (\d+) MB, growth while "
                     r"serving ([\d.-]+) MB; sha256 verified; Range resume verified", result.stdout)
    assert match, result.stdout
    size, rate, rss, growth = (float(g) for g in match.groups())
    assert size == 8 and rate > 0 and rss > 0 and growth < size * 4  # streamed, not held whole in memory
