"""The OpenAPI document, exact: every status code an operation can answer, with the error envelope's schema.

FastAPI documents a 422 that this API never sends (validation errors are 400s in the OpenAI envelope) and
none of the errors routes and dependencies raise. Here each operation's error answers are derived from what
it depends on (a key: 401 and 429; an admin key: 403; a database session: 503; parameters or a body: 400;
a path parameter: 404; a JSON body: 413), plus the ones a route declares with `errors(...)`. A `limit`
query parameter documents the `list_limit_max` setting it is checked against.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.dependencies.utils import get_flat_params
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute, iter_route_contexts
from pydantic import BaseModel, Field

from app.api.deps import get_admin_key, get_caller, get_caller_briefly, get_session
from app.core.config import get_settings

ERROR_DESCRIPTIONS = {
    400: "Invalid request: a parameter or the body is missing, malformed or not allowed.",
    401: "No API key, or an unknown or revoked one.",
    403: "The key may not do this (admin endpoints need an admin key).",
    404: "No such object in the caller's project.",
    409: "The request conflicts with the object's state; retrying will not help.",
    413: "The body is larger than the server accepts.",
    416: "The Range header cannot be satisfied.",
    429: "Rate limit or quota reached; retry after the Retry-After delay.",
    502: "A service behind the API failed: the Hugging Face Hub (or the mirror in HF_ENDPOINT) could not be read, "
         "or an inference process stopped while answering.",
    503: "The database, or every inference process, is unavailable for a moment; retry after the Retry-After delay.",
    504: "The inference process did not answer in time (TUNEFORGE_INFERENCE_TIMEOUT_SECONDS).",
}
RETRY_AFTER = {"retry-after": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}}


class ErrorBody(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, permission_error, "
                                  "rate_limit_error or server_error.")
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """The OpenAI error envelope every failing answer uses."""

    error: ErrorBody


def errors(*codes: int, error_codes: dict[int, tuple[str, ...]] | None = None) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: these error status codes, each with the envelope's schema; `error_codes` names the
    envelope's `code` values an answer of a status may carry (in its description; the status need not be in `codes`,
    a derived one is described so)."""
    named = error_codes or {}
    return {code: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[code] + (
                       f" `code`: {', '.join(named[code])}." if code in named else ""),
                   **({"headers": RETRY_AFTER} if code in (429, 503) else {})} for code in {*codes, *named}}


def binary_responses(media_type: str, *, ranges: bool) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route that streams bytes of media_type (with Range support: 206 and 416)."""
    body = {"content": {media_type: {"schema": {"type": "string", "format": "binary"}}}}
    found: dict[int | str, dict[str, Any]] = {200: {"description": "The content.", **body}}
    if ranges:
        found[206] = {"description": "The byte range asked for.", **body}
        found.update(errors(416))
    return found


def _calls(dependant: Dependant) -> set[Any]:
    """Every callable a route depends on, however deep."""
    found = set()
    for dependency in dependant.dependencies:
        found |= {dependency.call, *_calls(dependency)}
    return found


def _derived_errors(route: Any) -> set[int]:
    calls = _calls(route.dependant)
    params = get_flat_params(route.dependant)
    codes: set[int] = set()
    if get_caller in calls or get_caller_briefly in calls:
        codes |= {401, 429}
    if get_admin_key in calls:
        codes.add(403)
    if get_session in calls:
        codes.add(503)
    if any(param.field_info.__class__.__name__ == "Path" for param in params):
        codes.add(404)
    if params or route.body_field is not None:
        codes.add(400)
    if route.body_field is not None:
        codes.add(413)
    return codes


def build_openapi(app: FastAPI) -> dict[str, Any]:
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    limit_max = get_settings().list_limit_max
    error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
    schema.setdefault("components", {}).setdefault("schemas", {})["ErrorResponse"] = ErrorResponse.model_json_schema(
        ref_template="#/components/schemas/{model}")
    schema["components"]["schemas"]["ErrorBody"] = ErrorBody.model_json_schema()
    schema["components"]["schemas"]["ErrorResponse"].pop("$defs", None)
    for name in ("HTTPValidationError", "ValidationError"):
        schema["components"]["schemas"].pop(name, None)
    for route in iter_route_contexts(app.routes):  # included routers' routes, with their prefixes
        if not isinstance(route.original_route, APIRoute) or not route.include_in_schema:
            continue
        for method in route.methods or ():
            operation = schema["paths"][route.path_format][method.lower()]
            responses = operation["responses"]
            responses.pop("422", None)
            for code in sorted(_derived_errors(route)):
                responses.setdefault(str(code), {"description": ERROR_DESCRIPTIONS[code],
                                                 "content": {"application/json": {"schema": error_ref}},
                                                 **({"headers": RETRY_AFTER} if code in (429, 503) else {})})
            for answer in responses.values():
                content = answer.get("content", {})
                # A declared binary or event-stream body replaces FastAPI's schemaless JSON default (a route
                # with a response model answers both: JSON, or events when asked to stream).
                if len(content) > 1 and not content.get("application/json", {}).get("schema"):
                    content.pop("application/json", None)
            for parameter in operation.get("parameters", []):
                if parameter["name"] == "limit" and parameter["in"] == "query":
                    parameter["schema"].update(minimum=1, maximum=limit_max)
    return schema


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
