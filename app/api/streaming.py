"""Streaming downloads from storage with Content-Length, a sha256 header and single-range requests."""

from __future__ import annotations

import re

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from app.core.errors import APIError
from app.core.storage import get_storage

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
    return StreamingResponse(get_storage().read(key, start, end), status_code=status, headers=headers,
                             media_type=media_type)
