"""The stop benchmark runs in smoke mode: every adapter type is released by SIGTERM with a checkpoint (no timing
assertion; bench.stop raises when a run is not released)."""

from __future__ import annotations

import re
import signal

import pytest

from bench.stop import main


def test_stop_benchmark_smoke_run_releases_every_adapter_type(capsys: pytest.CaptureFixture[str]) -> None:
    before = signal.getsignal(signal.SIGTERM)
    main(["--quick"])
    rows = re.findall(r"^(lora|qlora|full)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", capsys.readouterr().out, re.M)
    assert [r[0] for r in rows] == ["lora", "qlora", "full"]
    assert all(float(r[3]) > 0 for r in rows)  # a checkpoint archive was written
    assert signal.getsignal(signal.SIGTERM) is before  # the test process's own handler is back
