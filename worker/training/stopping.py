"""SIGTERM and SIGINT in a training process: a request to checkpoint and leave, never a crash.

Service managers signal every process of a worker (systemd's `stop` sends SIGTERM to the whole unit,
Kubernetes and compose to the container's processes) and Ctrl-C reaches the whole foreground process group,
so a training process hears the stop itself, often before its supervisor does. The handler only sets a flag;
the recipe reads it after each optimizer step, saves a checkpoint and raises TrainingReleased, and the
caller hands the job back so it continues elsewhere from that checkpoint. The cost of a stop is therefore
one step plus one checkpoint save: the grace period an orchestrator must allow (docs/operators.md).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_requested = threading.Event()


def _on_stop_signal(signum: int, _frame: FrameType | None) -> None:
    _requested.set()


def install_handlers() -> None:
    """From now on SIGTERM and SIGINT ask this process to checkpoint and stop (main thread only)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, _on_stop_signal)


def requested() -> bool:
    """Whether this process was asked to stop."""
    return _requested.is_set()


def request() -> None:
    """Ask this process to stop, as the signal does (tests, and callers that learn it another way)."""
    _requested.set()


def clear() -> None:
    """Forget a request (a new run in the same process)."""
    _requested.clear()
