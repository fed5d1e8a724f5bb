"""Request dependencies: a database session and the calling project."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.core.config import Settings, get_settings
from app.core.db import get_sessionmaker
from app.core.errors import Unauthorized
from app.models import Project
from app.services.projects import authenticate, get_or_create_project


def get_session() -> Iterator[Session]:
    session = get_sessionmaker()()
    try:
        yield session
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_current_project(request: Request, session: SessionDep, settings: SettingsDep) -> Project:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() == "bearer" and key.strip():
        found = authenticate(session, key=key.strip())
        if found is not None:
            return found[0]
        if settings.require_api_keys:
            raise Unauthorized("Incorrect API key provided.", code="invalid_api_key")
    if not settings.require_api_keys:
        # Keyless mode (loopback only): SDKs insist on sending some key, so any key is accepted.
        project = get_or_create_project(session, name=settings.default_project)
        session.commit()
        return project
    raise Unauthorized("You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
                       code="missing_api_key")


CurrentProject = Annotated[Project, Depends(get_current_project)]
