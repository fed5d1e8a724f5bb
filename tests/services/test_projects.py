"""Projects: created on first use, once, whichever of two concurrent first requests inserts the row."""

from __future__ import annotations

from sqlalchemy import event, func, select
from sqlalchemy.orm import Session

from app.models import Project
from app.services.projects import get_or_create_project


def test_two_first_requests_of_a_project_share_one_row(session: Session) -> None:
    """Found by an audit: the first requests in keyless mode, or an admin creating keys for a new project, each
    read "no such project" and inserted it; the second insert's unique-name error answered 500. The other request's
    insert lands here just before this one's."""
    seen: list[str] = []
    landed: list[str] = []

    def insert_before(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        # After this request's read found no project, before anything it writes (its own savepoint included: the
        # other request's row is committed, not undone with this one's insert).
        words = statement.lstrip().upper()
        if words.startswith("SELECT") and "FROM PROJECTS" in words:
            seen.append(statement)
        elif seen and not landed and (words.startswith("SAVEPOINT") or words.startswith("INSERT INTO PROJECTS")):
            landed.append(statement)
            cursor.execute("INSERT INTO projects (id, name, created_at) VALUES ('proj_other', 'racing', 1)")

    engine = session.get_bind()
    event.listen(engine, "before_cursor_execute", insert_before)
    try:
        project = get_or_create_project(session, name="racing")
    finally:
        event.remove(engine, "before_cursor_execute", insert_before)
    assert landed and project.id == "proj_other"
    assert session.scalar(select(func.count()).select_from(Project).where(Project.name == "racing")) == 1
    assert get_or_create_project(session, name="racing") is project
