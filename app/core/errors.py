"""Domain errors and the OpenAI error envelope every failing response uses."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import iter_route_contexts
from sqlalchemy.exc import DataError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

logger = logging.getLogger("tuneforge.api")


class APIError(Exception):
    """An error a client can act on; routes and services raise it, the handler renders it."""

    status_code = 400
    type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 status_code: int | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}
        if status_code is not None:
            self.status_code = status_code


class InvalidRequest(APIError):
    status_code = 400


class NotFound(APIError):
    status_code = 404

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message, param=param, code="not_found")


class Conflict(APIError):
    """A permanent conflict: 409 with x-should-retry false so SDKs do not retry it."""

    status_code = 409

    def __init__(self, message: str, *, param: str | None = None, code: str | None = "conflict") -> None:
        super().__init__(message, param=param, code=code, headers={"x-should-retry": "false"})


class Unauthorized(APIError):
    status_code = 401
    type = "authentication_error"


class TooLargeError(APIError):
    status_code = 413


class PermissionDenied(APIError):
    """The key is valid but may not do this (admin routes with a project key)."""

    status_code = 403
    type = "permission_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message, param=param, code="permission_denied")


class RateLimited(APIError):
    """429 with Retry-After; SDKs retry it after the delay unless retry is false."""

    status_code = 429
    type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after: float, code: str = "rate_limit_exceeded",
                 retry: bool = True) -> None:
        seconds = max(1, math.ceil(retry_after))
        headers = {"retry-after": str(seconds), "retry-after-ms": str(max(1, math.ceil(retry_after * 1000)))}
        if not retry:
            headers["x-should-retry"] = "false"
        super().__init__(message, code=code, headers=headers)


# Seconds a client is told to wait while the database is away (a restart takes a few).
DATABASE_RETRY_AFTER_SECONDS = 5


def envelope(message: str, *, type_: str, param: str | None, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _param_from_loc(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "form")]
    # Pydantic adds the union branch or validator name to the location; keep the field path.
    parts = [p for p in parts if not p.startswith(("function-", "literal[", "constrained-"))
             and p not in ("int", "float", "str", "list[str]", "bool")]
    return ".".join(parts) or None


async def _nul_param(request: Request) -> str | None:
    """Which parameter holds a NUL character: a query parameter's name, or the path to a value of the JSON body
    (dotted, as validation errors name one); None when none is found."""
    for name, value in request.query_params.multi_items():
        if "\x00" in name or "\x00" in value:
            return name
    with contextlib.suppress(Exception):  # the body is read already (cached); one that is not JSON names nothing
        return _path_to_nul(json.loads(await request.body()), ())
    return None


def _path_to_nul(value: Any, path: tuple[str, ...]) -> str | None:
    if isinstance(value, str):
        return (".".join(path) or None) if "\x00" in value else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if "\x00" in str(key):
            return ".".join((*path, str(key)))
        found = _path_to_nul(item, (*path, str(key)))
        if found is not None:
            return found
    return None


def allowed_methods(request: Request) -> list[str]:
    """The methods served at the request's path by its most specific matching templates (Starlette's own 405
    names only the first route's; `/jobs/estimate` also matches `/jobs/{id}`, but the literal one is meant)."""
    found: dict[str, set[str]] = {}
    for route in iter_route_contexts(request.app.router.routes):  # included routers' routes, with their prefixes
        match, _scope = route.matches({**request.scope, "method": "GET"})
        if match != Match.NONE:
            template = getattr(route, "path_format", "")
            found.setdefault(template, set()).update(getattr(route, "methods", None) or ())
    if not found:
        return []
    literal = max(len(_PARAM.sub("", template)) for template in found)
    return sorted({m for template, methods in found.items() if len(_PARAM.sub("", template)) == literal
                   for m in methods})


_PARAM = re.compile(r"\{[^}]*\}")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(envelope(exc.message, type_=exc.type, param=exc.param, code=exc.code),
                            status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
        param = _param_from_loc(tuple(first.get("loc", ())))
        kind = first.get("type", "")
        if kind == "json_invalid":  # its location is the character offset, which names no parameter
            message, code, param = "The request body is not valid JSON.", "invalid_json", None
        elif kind == "missing" and param is None:
            message, code = "The request needs a JSON object body.", "missing_required_parameter"
        elif kind == "missing":
            message, code = f"Missing required parameter: '{param}'.", "missing_required_parameter"
        elif kind == "extra_forbidden":
            message, code = f"Unrecognized request argument supplied: {param}", "unknown_parameter"
        else:
            msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
            message = f"Invalid value for '{param}': {msg}" if param else msg
            code = "invalid_value"
        return JSONResponse(envelope(message, type_="invalid_request_error", param=param, code=code),
                            status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        messages = {404: "Not found.", 405: "Method not allowed."}
        message = messages.get(exc.status_code, str(exc.detail))
        headers = {k.lower(): v for k, v in (getattr(exc, "headers", None) or {}).items()}
        if exc.status_code == 405:
            headers["allow"] = ", ".join(allowed_methods(request))
        return JSONResponse(envelope(message, type_="invalid_request_error", param=None, code=None),
                            status_code=exc.status_code, headers=headers)

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, _exc: ClientDisconnect) -> JSONResponse:
        # The client closed the connection mid-body (an upload cancelled): no server fault, and whatever the request
        # had begun to store was rolled back where it was being written; the answer reaches no one.
        logger.info("client disconnected during %s %s", request.method, request.url.path)
        return JSONResponse(envelope("The client disconnected before the request body was complete.",
                                     type_="invalid_request_error", param=None, code="client_disconnected"),
                            status_code=400)

    @app.exception_handler(DataError)
    async def _data_error(request: Request, exc: DataError) -> JSONResponse:
        # Postgres refuses NUL characters in text and JSON values: the client's input, not a server fault.
        if any(marker in str(exc.orig) for marker in ("NUL (0x00)", "\\u0000")):
            return JSONResponse(envelope("Text values cannot contain NUL (\\u0000) characters.",
                                         type_="invalid_request_error", param=await _nul_param(request),
                                         code="invalid_value"), status_code=400)
        return await _unexpected(request, exc)

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    @app.exception_handler(PoolTimeout)
    async def _database_unavailable(_request: Request, exc: Exception) -> JSONResponse:
        # A database restarting, failing over or unreachable: nothing was written, the request can be retried.
        logger.warning("database unavailable: %s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return JSONResponse(envelope("The database is unavailable at the moment; retry the request shortly.",
                                     type_="server_error", param=None, code="database_unavailable"),
                            status_code=503, headers={"retry-after": str(DATABASE_RETRY_AFTER_SECONDS)})

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error", exc_info=exc)
        return JSONResponse(envelope("The server had an error processing your request.",
                                     type_="server_error", param=None, code=None), status_code=500)
