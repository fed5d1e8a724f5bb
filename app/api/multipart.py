"""Reading an upload's multipart/form-data body as it streams in (python-multipart's push parser)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import anyio.from_thread
from fastapi import Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from app.core.errors import InvalidRequest
from app.core.storage import CHUNK_BYTES
from app.services import files as file_service

# Form fields (purpose, model) are short; anything longer is not a field we read.
MAX_FIELD_BYTES = 64 * 1024


class MultipartUpload:
    """A multipart/form-data body read from the request stream on demand: small fields are kept, the
    `file` part's bytes are handed out as they arrive (about CHUNK_BYTES at a time), never held whole."""

    def __init__(self, request: Request, *, max_file_bytes: int) -> None:
        content_type, params = parse_options_header(request.headers.get("content-type"))
        if content_type != b"multipart/form-data" or not params.get(b"boundary"):
            raise InvalidRequest("Uploads must be multipart/form-data with the fields 'file' and 'purpose'.",
                                 param="file", code="invalid_request")
        self._body: AsyncIterator[bytes] = request.stream().__aiter__()
        self._parser = MultipartParser(params[b"boundary"], callbacks={
            "on_part_begin": self._part_begin, "on_header_field": self._header_field,
            "on_header_value": self._header_value, "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
            "on_part_end": self._part_end})
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self._headers: dict[bytes, bytes] = {}
        self._field, self._value, self._data = bytearray(), bytearray(), bytearray()
        self._name = ""
        self._in_file = self._file_seen = self._file_done = False
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._file_bytes, self._max_file_bytes = 0, max_file_bytes

    # -- parser callbacks ----------------------------------------------------------------------------
    def _part_begin(self) -> None:
        self._headers, self._data = {}, bytearray()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[bytes(self._field).lower()] = bytes(self._value)
        self._field, self._value = bytearray(), bytearray()

    def _headers_finished(self) -> None:
        _disposition, options = parse_options_header(self._headers.get(b"content-disposition"))
        self._name = options.get(b"name", b"").decode("utf-8", "replace")
        if self._name == "file" and not self._file_seen:
            self._in_file = self._file_seen = True
            self.filename = options.get(b"filename", b"upload.jsonl").decode("utf-8", "replace")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file:
            self._pending.append(data[start:end])
            self._pending_bytes += end - start
            self._file_bytes += end - start
            if self._file_bytes > self._max_file_bytes:  # refuse before reading (or storing) any more
                raise file_service.too_large(self._max_file_bytes)
            return
        self._data += data[start:end]
        if len(self._data) > MAX_FIELD_BYTES:
            raise InvalidRequest(f"The form field {self._name!r} is longer than {MAX_FIELD_BYTES} bytes.",
                                 param=self._name or None, code="invalid_value")

    def _part_end(self) -> None:
        if self._in_file:
            self._in_file, self._file_done = False, True
        else:
            self.fields.setdefault(self._name, self._data.decode("utf-8", "replace"))

    # -- reading -------------------------------------------------------------------------------------
    async def _pump(self) -> bool:
        """Parse the next piece of the body; False once the body has ended."""
        try:
            data = await self._body.__anext__()
        except StopAsyncIteration:
            return False
        try:
            self._parser.write(data)
        except MultipartParseError as exc:
            raise InvalidRequest(f"The multipart body is malformed: {exc}", param="file",
                                 code="invalid_request") from None
        return True

    async def start(self) -> None:
        """Read up to the first byte of the file; the fields before it are in `fields`."""
        while not self._file_seen:
            if not await self._pump():
                raise InvalidRequest("Missing required parameter: 'file'.", param="file",
                                     code="missing_required_parameter")

    async def next_file_chunk(self) -> bytes | None:
        """The file's next bytes (at most CHUNK_BYTES), None after the last."""
        while self._pending_bytes < CHUNK_BYTES and not self._file_done:
            if not await self._pump():
                raise InvalidRequest("The upload ended before the file was complete.", param="file",
                                     code="invalid_request")
        if not self._pending:
            return None
        data = b"".join(self._pending)
        chunk, rest = data[:CHUNK_BYTES], data[CHUNK_BYTES:]
        self._pending, self._pending_bytes = ([rest] if rest else []), len(rest)
        return chunk

    async def finish(self) -> dict[str, str]:
        """Read the rest of the body (fields after the file) and return every field."""
        while await self._pump():
            pass
        return self.fields

    def file_chunks(self) -> Iterator[bytes]:
        """The file's bytes for code in a worker thread: each chunk is read on the event loop."""
        while (chunk := anyio.from_thread.run(self.next_file_chunk)) is not None:
            yield chunk
