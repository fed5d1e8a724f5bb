"""Streamed reads run on the streaming threads, at most STREAM_THREADS at once, and are closed when dropped."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import anyio

from app.api.streaming import STREAM_THREADS, in_stream_thread, iterate_in_stream_threads


def test_a_dropped_download_closes_its_reader_on_a_streaming_thread() -> None:
    closed_on: list[str] = []
    read_on: list[str] = []

    def chunks() -> Iterator[bytes]:
        try:
            for i in range(5):
                read_on.append(threading.current_thread().name)
                yield bytes([i])
        finally:
            closed_on.append(threading.current_thread().name)

    async def main() -> list[bytes]:
        got = []
        stream = iterate_in_stream_threads(chunks())
        async for chunk in stream:
            got.append(chunk)
            if len(got) == 2:
                break
        await stream.aclose()  # what Starlette does when the client goes away
        return got

    assert anyio.run(main) == [b"\x00", b"\x01"]
    assert closed_on and all(name != threading.main_thread().name for name in read_on + closed_on)


def test_streaming_reads_never_run_more_than_the_limit_at_once() -> None:
    running, most = 0, 0
    lock = threading.Lock()

    def poll() -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.05)
        with lock:
            running -= 1

    async def main() -> None:
        async with anyio.create_task_group() as group:
            for _ in range(int(STREAM_THREADS.total_tokens) * 3):
                group.start_soon(in_stream_thread, poll)

    anyio.run(main)
    assert most == STREAM_THREADS.total_tokens
