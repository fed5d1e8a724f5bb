"""The service benchmark runs end to end in quick mode and prints every row with numbers (no timing assertion)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROWS = ["direct: fresh process, end to end", "direct: train() in that process",
        "direct: start -> training loop starts", "direct: step 1 (from the loop's start)",
        "direct: start -> step 1 done", "direct: steps 2..", "direct: last step -> process exit",
        "direct: interpreter exit after train()", "service: POST -> succeeded", "service: POST -> running (pickup)",
        "service: POST -> step 1 done", "service: claimed -> training loop (warm start)",
        "service: claimed -> step 1 done", "service: steps 2..", "service: last step -> succeeded",
        "service events: created -> running", "service events: running -> training loop",
        "service events: training loop", "service events: loop end -> succeeded",
        "pickup POST -> running, 1 jobs: median", "pickup POST -> running, 1 jobs: max",
        "pickup POST -> queued, 1 jobs: median", "worker busy after succeeded (attempt exit)"]


def test_service_benchmark_quick_run_prints_direct_service_and_pickup_rows(tmp_path: Path) -> None:
    # A subprocess, like the service it starts: its API and worker processes get settings of their own.
    result = subprocess.run([sys.executable, "-m", "bench.service", "--quick", "--dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    seconds = {}
    for label in ROWS:
        row = next(line for line in lines if line.startswith(label))
        wall, cpu = row.split()[-2:]
        seconds[label] = float(wall)
        assert cpu == "-" or float(cpu) > 0, row
    # The parts add up: each whole takes at least as long as the part of it measured alone, and work takes time.
    assert seconds["direct: fresh process, end to end"] >= seconds["direct: train() in that process"] > 0
    assert seconds["service: POST -> succeeded"] >= seconds["service: POST -> step 1 done"] \
        >= seconds["service: POST -> running (pickup)"] > 0
    assert seconds["direct: start -> step 1 done"] > seconds["direct: start -> training loop starts"] > 0
    assert seconds["direct: step 1 (from the loop's start)"] > 0
    # The warm start's figure: the loop's event is seen before (or, polled at once, with) step 1.
    assert seconds["service: claimed -> step 1 done"] >= seconds["service: claimed -> training loop (warm start)"] > 0
    assert seconds["service: steps 2.."] > 0 and seconds["direct: steps 2.."] > 0
    ratios = next(line for line in lines if line.startswith("ratios: service/direct fresh process wall "))
    assert float(ratios.split()[5]) > 0
    targets = next(line for line in lines if line.startswith("targets: overhead <= 1.15x: "))
    assert "claimed -> first step starts <= 2 s: " in targets
    assert list(tmp_path.iterdir()) == []  # the scratch directory is removed
