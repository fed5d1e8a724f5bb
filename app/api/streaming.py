"""Streaming downloads from storage with Content-Length, a sha256 header and single-range requests.

Streamed reads (blob chunks here, event polls in routes/stream.py) run on threads of their own, at most
STREAM_THREADS at once: they take pooled connections outside SessionDep's limit (app/api/deps.py), and a
read waiting for a connection must never hold one of the threads that request handlers need.
"""

from __future__ import annotations

import functools
import re
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

import anyio
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from app.core.errors import APIError
from app.core.storage import get_storage

T = TypeVar("T")
STREAM_THREADS = anyio.CapacityLimiter(8)


async def in_stream_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """fn(*args, **kwargs) on one of the streaming threads."""
    return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs), limiter=STREAM_THREADS)


async def iterate_in_stream_threads(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    """The chunks of a blocking iterator, each read on a streaming thread; closed if the client goes away."""
    done = object()
    try:
        while (chunk := await in_stream_thread(next, chunks, done)) is not done:
            yield chunk  # type: ignore[misc]
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            await in_stream_thread(close)

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def stream_blob(request: Request, *, key: str, size: int, sha256: str, filename: str,
                media_type: str = "application/octet-stream") -> Response:
    """200 with the whole blob, or 206 with the one byte range asked for (a broken download resumes)."""
    headers = {"accept-ranges": "bytes", "x-content-sha256": sha256, "etag": f'"{sha256}"',
               "content-disposition": f'attachment; filename="{filename}"'}
    start, end = 0, size
    status = 200
    wanted = request.headers.get("range")
    if wanted:
        match = _RANGE.match(wanted.strip())
        if match is None or match.groups() == ("", ""):
            raise APIError("Invalid Range header: use a single range like 'bytes=100-'.", param="Range",
                           code="invalid_range", status_code=416, headers={"content-range": f"bytes */{size}"})
        first, last = match.groups()
        if first == "":  # suffix range: the last N bytes
            start = max(0, size - int(last))
        else:
            start = int(first)
            end = min(size, int(last) + 1) if last else size
        if start >= size or start >= end:
            raise APIError(f"Range not satisfiable: the content is {size} bytes.", param="Range",
                           code="range_not_satisfiable", status_code=416,
                           headers={"content-range": f"bytes */{size}"})
        status = 206
        headers["content-range"] = f"bytes {start}-{end - 1}/{size}"
    headers["content-length"] = str(end - start)
    return StreamingResponse(iterate_in_stream_threads(get_storage().read(key, start, end)), status_code=status,
                             headers=headers,
                             media_type=media_type)
