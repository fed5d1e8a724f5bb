"""Warm start: attempts forked from a pre-imported process run as processes of their own, report their exit
codes as subprocess does, write to their attempt log, and die with the zygote."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import psutil
import pytest

from worker.exits import EXIT_STALE
from worker.zygote import Zygote


@pytest.fixture
def zygote(database_url: str) -> Zygote:
    started = Zygote()
    assert started.wait_ready(120)
    yield started
    started.stop()


def test_a_forked_attempt_runs_as_its_own_process_and_reports_its_exit(zygote: Zygote, tmp_path: Path) -> None:
    log = tmp_path / "attempt.log"
    log.write_bytes(b"")
    forked = zygote.fork("ftjob-nonexistent", 1, log)
    assert forked is not None
    process = zygote._process
    assert process is not None and forked.pid not in (os.getpid(), process.pid)
    try:  # while it lives: a child of the zygote, named tf-attempt, its stdout the attempt's log
        child = psutil.Process(forked.pid)
        assert child.ppid() == process.pid
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and forked.poll() is None and child.name() != "tf-attempt":
            time.sleep(0.01)
        if forked.poll() is None:
            assert child.name() == "tf-attempt"
            assert str(log) in [f.path for f in child.open_files()]
    except psutil.NoSuchProcess:
        pass  # it was quicker than us
    # No such job: the attempt says so by its exit code, as `python -m worker.attempt` does.
    assert forked.wait(timeout=60) == EXIT_STALE
    assert psutil.Process(process.pid).is_running()  # the zygote serves the next attempt
    again = zygote.fork("ftjob-nonexistent", 2, log)
    assert again is not None and again.pid != forked.pid and again.wait(timeout=60) == EXIT_STALE


def test_attempts_die_with_the_zygote_and_a_new_zygote_takes_over(database_url: str, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # The attempt waits for a database that never answers (a socket that listens and never speaks), so it is
    # alive when the zygote dies.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    monkeypatch.setenv("TUNEFORGE_DATABASE_URL", f"postgresql+psycopg://postgres@127.0.0.1:{silent.getsockname()[1]}/x")
    zygote = Zygote()
    try:
        assert zygote.wait_ready(120)
        log = tmp_path / "attempt.log"
        log.write_bytes(b"")
        forked = zygote.fork("ftjob-x", 1, log)
        assert forked is not None and forked.poll() is None
        first = zygote._process
        assert first is not None
        first.send_signal(signal.SIGKILL)
        assert forked.wait(timeout=30) == -signal.SIGKILL
        deadline = time.monotonic() + 10
        while psutil.pid_exists(forked.pid) and psutil.Process(forked.pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the attempt outlived its zygote"
            time.sleep(0.1)
        # Until the new zygote has imported everything, attempts start cold (fork answers None at once).
        assert zygote.fork("ftjob-x", 2, log) is None
        assert zygote.wait_ready(120)
        replaced = zygote.fork("ftjob-x", 2, log)
        assert replaced is not None and zygote._process is not first
        replaced.kill()
        assert replaced.wait(timeout=30) == -signal.SIGKILL
    finally:
        zygote.stop()
        silent.close()


def test_a_zygote_that_does_not_fork_in_time_is_replaced_and_the_attempt_starts_cold(database_url: str,
                                                                                    tmp_path: Path) -> None:
    """A fork reported after the worker gave up would run the attempt a second time, beside the cold start: the
    worker ends that zygote first, and the next attempt forks from a new one."""
    zygote = Zygote(fork_timeout=2.0)
    try:
        assert zygote.wait_ready(120)
        stalled = zygote._process
        assert stalled is not None
        stalled.send_signal(signal.SIGSTOP)  # it cannot read the request, let alone fork
        log = tmp_path / "attempt.log"
        log.write_bytes(b"")
        asked = time.monotonic()
        assert zygote.fork("ftjob-nonexistent", 1, log) is None  # the caller starts this attempt cold
        assert 2.0 <= time.monotonic() - asked < 30
        assert stalled.poll() == -signal.SIGKILL  # ended, not left to fork late
        assert zygote.wait_ready(120) and zygote._process is not stalled
        forked = zygote.fork("ftjob-nonexistent", 2, log)
        assert forked is not None and forked.wait(timeout=60) == EXIT_STALE
    finally:
        zygote.stop()
