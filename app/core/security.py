"""API keys (generated once, stored as sha256, compared in constant time) and request body limits."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.errors import envelope

KEY_PREFIX = "tf-"
# Multipart framing (boundaries, part headers, the purpose field) on top of the file's own bytes.
MULTIPART_OVERHEAD_BYTES = 1024**2
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def generate_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    # Keys carry 256 random bits, so a fast hash is enough: there is nothing to brute-force.
    return hashlib.sha256(key.encode()).hexdigest()


def keys_match(presented_hash: str, stored_hash: str) -> bool:
    return hmac.compare_digest(presented_hash, stored_hash)


def plain_filename(name: str | None, *, default: str = "upload.jsonl") -> str:
    """The last path component of a client's filename, without control characters (a label, never a path)."""
    base = _CONTROL_CHARS.sub("", (name or "").replace("\\", "/")).rsplit("/", 1)[-1].strip()
    return default if base in ("", ".", "..") else base[:255]


class _BodyTooLarge(Exception):
    """Raised from receive() to stop the app reading a body past the limit."""


class BodySizeLimit:
    """413 for bodies over the limit: by Content-Length up front, else counted as the body streams in.

    Multipart uploads get their own, larger limit; Starlette would otherwise spool any size to disk.
    """

    def __init__(self, app: ASGIApp, *, limits: Callable[[], tuple[int, int]]) -> None:
        self.app = app
        self.limits = limits  # () -> (json_limit, upload_limit), read per request so settings apply

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        json_limit, upload_limit = self.limits()
        multipart = headers.get(b"content-type", b"").lower().startswith(b"multipart/")
        limit = upload_limit + MULTIPART_OVERHEAD_BYTES if multipart else json_limit
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await _send_too_large(send, limit)
            return
        received, tripped, started = 0, False, False

        async def limited_receive() -> Message:
            nonlocal received, tripped
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    tripped = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if tripped:
                return  # the app's answer to an aborted read is replaced by the 413 below
            started = started or message["type"] == "http.response.start"
            await send(message)

        # The app may let the abort escape, or turn it into its own error answer (swallowed above).
        with contextlib.suppress(_BodyTooLarge):
            await self.app(scope, limited_receive, guarded_send)
        if tripped and not started:
            await _send_too_large(send, limit)


async def _send_too_large(send: Send, limit: int) -> None:
    body = json.dumps(envelope(f"The request body exceeds the maximum size of {limit} bytes.",
                               type_="invalid_request_error", param=None, code="request_too_large")).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
