"""What a crashed attempt's event says: killed by the OOM killer, by another signal, or an exit code."""

from __future__ import annotations

import signal
from pathlib import Path

from worker.supervisor import describe_exit, oom_kills


def test_an_oom_kill_is_named_with_its_remedy() -> None:
    reason = describe_exit(-signal.SIGKILL, oom_killed=True)
    assert "out-of-memory killer" in reason and "batch_size" in reason


def test_a_sigkill_without_an_oom_kill_says_someone_else_killed_it() -> None:
    reason = describe_exit(-signal.SIGKILL, oom_killed=False)
    assert "killed (SIGKILL) by someone other than tuneforge" in reason and "out-of-memory killer outside" in reason


def test_other_signals_and_exit_codes_are_named() -> None:
    assert describe_exit(-signal.SIGSEGV, oom_killed=False) == "the training process was killed by signal 11 (SIGSEGV)"
    assert describe_exit(-200, oom_killed=False).endswith("(unknown signal)")
    assert describe_exit(1, oom_killed=False).startswith("the training process exited with code 1 without recording")


def test_oom_kills_are_read_from_the_cgroups_memory_events(tmp_path: Path) -> None:
    events = tmp_path / "memory.events"
    events.write_text("low 0\nhigh 0\nmax 4\noom 2\noom_kill 2\noom_group_kill 0\n")
    assert oom_kills(events) == 2
    events.unlink()
    assert oom_kills(events) is None  # no cgroup v2 memory controller visible: unknown, not zero
