"""Warm start: a process that has imported torch, transformers, peft and the training code once, and forks each
training attempt from there, so an attempt starts in milliseconds instead of seconds of imports.

Each attempt still runs in a process of its own (its memory is freed when it exits, its crash is contained): the
fork is a copy of a process that has only imported modules. The zygote runs no torch operation, starts no thread
and opens no database connection, so there is nothing a fork could copy half-way. It dies with the worker
(PR_SET_PDEATHSIG); an attempt dies with the zygote, as it does with the worker when started cold. A multi-process
attempt (torchrun) starts cold, as before. TUNEFORGE_WORKER_WARM_START=false starts every attempt cold.

The worker talks to the zygote over its stdin/stdout, one JSON object a line:
    worker -> zygote  {"request", "job_id", "attempt", "log_path"}  fork an attempt
    zygote -> worker  {"ready": true}                                imports done
                      {"started": pid, "request": int}               the attempt's pid, for that request
                      {"exited": pid, "returncode": int}             as subprocess reports it (-N: killed by signal N)

A fork that is not reported within FORK_TIMEOUT_SECONDS ends the zygote (and so any attempt it forked late) before
the worker starts that attempt cold: the same attempt never runs twice.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import IO, Any

logger = logging.getLogger("tuneforge.supervisor")
# What an attempt imports; imported once by the zygote.
PRELOADED = ("torch", "transformers", "peft", "torchmetrics", "worker.attempt", "worker.training.recipe",
             "worker.training.model")
# How long the worker waits for a ready zygote to report a fork (a fork takes milliseconds).
FORK_TIMEOUT_SECONDS = 30.0


# ---------------------------------------------------------------- the zygote process
def _die_with_parent(parent: int | None = None) -> None:
    """SIGKILL when the parent dies; a parent that died before this ran (`parent` is no longer ours) ends us now."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if parent is not None and os.getppid() != parent:
        os._exit(1)


def _say(out: IO[str], message: dict[str, Any]) -> None:
    out.write(json.dumps(message) + "\n")
    out.flush()


def _attempt(job_id: str, attempt: int, log_path: str, channel: IO[str], zygote: int) -> None:
    """In the forked child: become `python -m worker.attempt JOB ATTEMPT` writing to its log, and run it."""
    try:
        os.close(channel.fileno())  # the zygote's line to the worker is not the attempt's
        _die_with_parent(zygote)
        for number in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(number, signal.SIG_DFL)
        log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - the process's own stdout
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        # Its command line stays the zygote's (rewriting it, as setproctitle does, clobbers /proc/PID/environ):
        # `ps -o comm` shows tf-attempt, and its stdout is the attempt's log (attempt_log_path names the job).
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(15, b"tf-attempt", 0, 0, 0)  # PR_SET_NAME
        sys.argv = ["worker.attempt", job_id, str(attempt)]
        from worker import attempt as attempt_module

        attempt_module.main()  # ends the process itself
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
    os._exit(1)


def serve() -> None:
    """The zygote's loop: fork an attempt per request, report each one's exit."""
    _die_with_parent()
    # A signal to the worker's process group (Ctrl-C, a service manager's stop) is for the worker and its attempts,
    # which checkpoint and hand their job back; the zygote ends when the worker does (its pipe closes, or
    # PR_SET_PDEATHSIG), after its attempts.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The line to the worker is a descriptor of its own; whatever the imports print goes to stderr instead.
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    for module in PRELOADED:
        __import__(module)
    _say(out, {"ready": True})
    children: set[int] = set()
    stdin = sys.stdin.fileno()
    while True:
        readable, _, _ = select.select([stdin], [], [], 0.2)
        if readable:
            line = sys.stdin.readline()
            if not line:  # the worker closed the pipe (or died): end, leaving running attempts to finish
                break
            request = json.loads(line)
            me = os.getpid()
            pid = os.fork()
            if pid == 0:
                _attempt(request["job_id"], int(request["attempt"]), request["log_path"], out, me)
            children.add(pid)
            _say(out, {"started": pid, "request": request["request"]})
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            children.discard(pid)
            _say(out, {"exited": pid, "returncode": os.waitstatus_to_exitcode(status)})
    while children:  # wait for the last attempts so they are reaped, not left as zombies of init
        pid, _status = os.waitpid(-1, 0)
        children.discard(pid)


# ---------------------------------------------------------------- the worker's side
class ForkedAttempt:
    """An attempt forked by the zygote, with the parts of subprocess.Popen the supervisor uses."""

    def __init__(self, zygote: Zygote, pid: int, gone: threading.Event) -> None:
        self.zygote, self.pid, self.gone = zygote, pid, gone  # gone: its zygote's (a later zygote has its own)
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.zygote.exit_code(self.pid, gone=self.gone)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"attempt {self.pid}", timeout or 0.0)
            time.sleep(0.05)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, number: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, number)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Zygote:
    """The worker's handle on its zygote process: started once, restarted when it died."""

    def __init__(self, *, fork_timeout: float = FORK_TIMEOUT_SECONDS) -> None:
        self.fork_timeout = fork_timeout
        self._process: subprocess.Popen[str] | None = None
        self._lock = threading.Lock()
        self._exits: dict[int, int] = {}
        self._started: dict[int, int] = {}  # request -> pid
        self._reported = threading.Condition()
        self._requests = itertools.count(1)
        # Each zygote process has events of its own: a replaced one's reader may still be ending.
        self._ready = threading.Event()
        self._gone = threading.Event()

    def start(self) -> None:
        """Start the zygote (its imports run in the background) unless it runs."""
        with self._lock:
            if self._process is not None and self._process.poll() is None:
                return
            self._ready, self._gone = threading.Event(), threading.Event()
            self._process = subprocess.Popen([sys.executable, "-m", "worker.zygote"], stdin=subprocess.PIPE,
                                             stdout=subprocess.PIPE, text=True, bufsize=1,
                                             preexec_fn=_die_with_parent)
            threading.Thread(target=self._read, args=(self._process, self._ready, self._gone), name="tuneforge-zygote",
                             daemon=True).start()

    def _read(self, process: subprocess.Popen[str], ready: threading.Event, gone: threading.Event) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if "ready" in message:
                ready.set()
            elif "started" in message:
                with self._reported:
                    self._started[int(message["request"])] = int(message["started"])
                    self._reported.notify_all()
            elif "exited" in message:
                self._exits[int(message["exited"])] = int(message["returncode"])
        with self._reported:
            gone.set()  # its attempts died with it (PR_SET_PDEATHSIG)
            self._reported.notify_all()

    def exit_code(self, pid: int, *, gone: threading.Event) -> int | None:
        if pid in self._exits:
            return self._exits.pop(pid)
        if gone.is_set():
            return self._exits.pop(pid, -signal.SIGKILL)
        return None

    def wait_ready(self, timeout: float) -> bool:
        self.start()
        return self._ready.wait(timeout)

    def fork(self, job_id: str, attempt: int, log_path: Path) -> ForkedAttempt | None:
        """Fork the attempt; None when the zygote cannot now (still importing, just after the worker started, or
        gone): the caller starts it cold then. Never waits for the imports: the job's lease is being held."""
        self.start()
        with self._lock:
            process, ready, gone = self._process, self._ready, self._gone  # one zygote's, read together
            if not ready.is_set():
                logger.info("the warm-start process is still importing; starting this attempt cold")
                return None
            if process is None or process.poll() is not None or process.stdin is None:
                return None
            request = next(self._requests)
            try:
                process.stdin.write(json.dumps({"request": request, "job_id": job_id, "attempt": attempt,
                                                "log_path": str(log_path)}) + "\n")
                process.stdin.flush()
            except (BrokenPipeError, OSError):
                return None
            with self._reported:  # until the fork is reported, or the zygote is gone (its attempts with it)
                self._reported.wait_for(lambda: request in self._started or gone.is_set(), timeout=self.fork_timeout)
                pid = self._started.pop(request, None)
            if pid is None and gone.is_set():
                return None
            if pid is None:
                # A fork reported late would run this attempt beside the cold one the caller now starts: end the
                # zygote, and a child it forked dies with it. The next fork starts a new zygote.
                logger.warning("the warm-start process did not fork within %.0f s; replacing it, starting this "
                               "attempt cold", self.fork_timeout)
                process.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=10)
                return None
        return ForkedAttempt(self, pid, gone)

    def stop(self) -> None:
        with self._lock:
            if self._process is not None and self._process.stdin is not None:
                with contextlib.suppress(OSError):
                    self._process.stdin.close()


_zygote = Zygote()


def zygote() -> Zygote:
    """This worker's zygote."""
    return _zygote


if __name__ == "__main__":
    serve()
