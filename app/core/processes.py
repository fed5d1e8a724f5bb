"""Stopping a child process: one way for the supervisor, `tuneforge serve`, the benchmarks and the tests."""

from __future__ import annotations

import subprocess


def stop_process(process: subprocess.Popen[bytes], *, grace: float) -> None:
    """SIGTERM, then SIGKILL after the grace period; returns once the process is gone."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
