"""Stopping a child process: one way for the supervisor, `tuneforge serve`, the benchmarks and the tests."""

from __future__ import annotations

import subprocess
from typing import Any, Protocol


class Stoppable(Protocol):
    """What stop_process needs: subprocess.Popen, or a forked attempt (worker/zygote.py)."""

    pid: int

    def poll(self) -> int | None: ...

    def terminate(self) -> None: ...

    def kill(self) -> None: ...

    def wait(self, timeout: float | None = None) -> Any: ...


def stop_process(process: Stoppable, *, grace: float) -> None:
    """SIGTERM, then SIGKILL after the grace period; returns once the process is gone."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
