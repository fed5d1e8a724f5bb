"""Request dependencies: a database session, the calling key and project, and the admin check."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.core.config import Settings, get_settings
from app.core.db import POOL_MAX_OVERFLOW, POOL_SIZE, get_sessionmaker
from app.core.errors import InvalidRequest, PermissionDenied, RateLimited, Unauthorized
from app.core.ratelimit import seconds_until_allowed
from app.models import ApiKey, Project
from app.services.projects import authenticate, get_or_create_project


def get_session() -> Iterator[Session]:
    session = get_sessionmaker()()
    try:
        yield session
    finally:
        session.close()


# At most as many request sessions at once as the pool has connections, so a request never waits for a
# connection while holding a thread that a connection holder needs (see app/core/db.py); scope="function"
# closes the session when the endpoint returns, so a streamed response (events, downloads) holds no slot.
SessionDep = Annotated[Session, Depends(get_session, scope="function",
                                        max_concurrency=POOL_SIZE + POOL_MAX_OVERFLOW)]


async def current_settings() -> Settings:
    """The settings (async: a cached value needs no trip through the thread pool)."""
    return get_settings()


SettingsDep = Annotated[Settings, Depends(current_settings)]


@dataclass(frozen=True)
class Caller:
    """Who is calling: the project, and the key (None in keyless mode)."""

    project: Project
    api_key: ApiKey | None


def _identify(request: Request, session: Session, settings: Settings) -> Caller:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() == "bearer" and key.strip():
        found = authenticate(session, key=key.strip())
        if found is not None:
            return Caller(project=found[0], api_key=found[1])
        if settings.require_api_keys:
            raise Unauthorized("Incorrect API key provided.", code="invalid_api_key")
    if not settings.require_api_keys:
        # Keyless mode (loopback only): SDKs insist on sending some key, so any key is accepted.
        project = get_or_create_project(session, name=settings.default_project)
        session.commit()
        return Caller(project=project, api_key=None)
    raise Unauthorized("You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
                       code="missing_api_key")


def get_caller(request: Request, session: SessionDep, settings: SettingsDep) -> Caller:
    """The authenticated caller, charged one request against its key's rate limit."""
    return _charged_caller(request, session, settings)


# A session without a concurrency slot, for routes that wait on something else for long after their queries
# (an inference worker's answer): they close it first (session.close() returns the connection), and a long answer
# then holds neither a connection nor one of the slots every other route needs.
BriefSessionDep = Annotated[Session, Depends(get_session, scope="function")]


def get_caller_briefly(request: Request, session: BriefSessionDep, settings: SettingsDep) -> Caller:
    """get_caller, on a session without a concurrency slot (BriefSessionDep)."""
    return _charged_caller(request, session, settings)


def _charged_caller(request: Request, session: Session, settings: Settings) -> Caller:
    caller = _identify(request, session, settings)
    bucket = caller.api_key.id if caller.api_key is not None else f"project:{caller.project.id}"
    wait = seconds_until_allowed(settings, key=bucket)
    if wait > 0:
        raise RateLimited(f"Rate limit reached: at most {settings.rate_limit_per_minute} requests per minute "
                          "per API key. Retry after the delay in the Retry-After header.", retry_after=wait)
    return caller


CallerDep = Annotated[Caller, Depends(get_caller)]


# Async: plain attribute checks, run on the event loop rather than each taking a thread-pool hop.
async def get_current_project(caller: CallerDep) -> Project:
    return caller.project


async def get_admin_key(caller: CallerDep) -> ApiKey:
    """The caller's key if it is an admin key; 403 otherwise (keyless mode has no admin)."""
    if caller.api_key is None or not caller.api_key.is_admin:
        raise PermissionDenied("This endpoint needs an admin API key (tuneforge keys create --admin).")
    return caller.api_key


async def get_current_project_briefly(caller: Annotated[Caller, Depends(get_caller_briefly)]) -> Project:
    return caller.project


CurrentProject = Annotated[Project, Depends(get_current_project)]
BriefProject = Annotated[Project, Depends(get_current_project_briefly)]
AdminKey = Annotated[ApiKey, Depends(get_admin_key)]


def check_limit(limit: int, maximum: int) -> None:
    """A list endpoint's `limit`: 1 to the list_limit_max setting."""
    if not 1 <= limit <= maximum:
        raise InvalidRequest(f"Invalid 'limit': must be between 1 and {maximum}.", param="limit",
                             code="invalid_value")
