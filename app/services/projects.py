"""Projects (tenants) and their API keys."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.security import generate_api_key, hash_api_key, keys_match
from app.models import ApiKey, Project
from app.models.base import new_id, now_seconds
from app.services.paging import page_after


def get_or_create_project(session: Session, *, name: str) -> Project:
    """The project called name, created on first use (by whichever of two concurrent first requests inserts it:
    the other reads it back instead of failing on the unique name)."""
    project = session.scalar(select(Project).where(Project.name == name))
    if project is None:
        try:
            with session.begin_nested():
                project = Project(id=new_id("proj_"), name=name)
                session.add(project)
        except IntegrityError:
            project = session.scalar(select(Project).where(Project.name == name))
            assert project is not None
    return project


def create_api_key(session: Session, *, project_name: str, name: str = "",
                   is_admin: bool = False) -> tuple[ApiKey, str]:
    """A new key for the project; the plain key is returned once and never stored."""
    project = get_or_create_project(session, name=project_name)
    key = generate_api_key()
    row = ApiKey(id=new_id("key_"), project_pk=project.pk, name=name, key_hash=hash_api_key(key),
                 key_prefix=key[:10], is_admin=is_admin)
    session.add(row)
    session.flush()
    return row, key


def authenticate(session: Session, *, key: str) -> tuple[Project, ApiKey] | None:
    """The project a live key belongs to, or None."""
    presented = hash_api_key(key)
    found = session.execute(select(ApiKey, Project).join(Project, ApiKey.project_pk == Project.pk)
                            .where(ApiKey.key_hash == presented, ApiKey.revoked_at.is_(None))).first()
    if found is None or not keys_match(presented, found[0].key_hash):
        return None
    return found[1], found[0]


def list_api_keys(session: Session) -> list[tuple[ApiKey, Project]]:
    """Every key with its project, oldest first (the CLI's listing)."""
    rows = session.execute(select(ApiKey, Project).join(Project, ApiKey.project_pk == Project.pk)
                           .order_by(ApiKey.pk))
    return [(key, project) for key, project in rows]


def revoke_api_key(session: Session, *, key_id: str) -> bool:
    """Revoke a key (idempotent); False if no key has that id."""
    row = session.scalar(select(ApiKey).where(ApiKey.id == key_id))
    if row is None:
        return False
    row.revoked_at = row.revoked_at or now_seconds()
    return True


def page_api_keys(session: Session, *, after: str | None, limit: int) -> tuple[list[ApiKey], bool]:
    """One page of keys across projects, newest first (admin API)."""
    return page_after(session, select(ApiKey), ApiKey, project_pk=None, after=after, limit=limit)


def page_projects(session: Session, *, after: str | None, limit: int) -> tuple[list[Project], bool]:
    """One page of projects, newest first (admin API)."""
    return page_after(session, select(Project), Project, project_pk=None, after=after, limit=limit)


def get_api_key(session: Session, *, key_id: str) -> ApiKey | None:
    return session.scalar(select(ApiKey).where(ApiKey.id == key_id))


def get_project(session: Session, *, project_id: str) -> Project | None:
    return session.scalar(select(Project).where(Project.id == project_id))


def projects_by_pk(session: Session, pks: set[int]) -> dict[int, Project]:
    """The projects with these internal keys, by key (one query)."""
    return {p.pk: p for p in session.scalars(select(Project).where(Project.pk.in_(pks)))} if pks else {}
