"""The checks that must hold against concurrent requests take the database's write lock on SQLite (the embedded
mode), where a SELECT takes no lock and SELECT ... FOR UPDATE locks nothing: each holds its rows with a write
(app/core/db.py). Found by a review: the race tests land the other request's write before the check, so a
check that only read would pass them; here another connection must find the database locked."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.db import build_engine
from app.models import File, Project, RegisteredModel
from app.models.base import Base


@pytest.fixture
def sqlite_session(tmp_path: Path) -> Iterator[tuple[Session, Path]]:
    path = tmp_path / "embedded.db"
    engine = build_engine(f"sqlite:///{path}")
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        project = Project(id="proj_a", name="a")
        session.add(project)
        session.flush()
        session.add(File(id="file-a", project_pk=project.pk, filename="a.jsonl", purpose="fine-tune", bytes=1,
                         sha256="0" * 64, blob_key="files/file-a", status="processed"))
        session.add(RegisteredModel(name="base", source="path:/models/base", status="ready", info={}, files=[],
                                    tokenizer={}, owned_by="tuneforge", trust_remote_code=False, allow_pickle=False))
        session.commit()
        yield session, path
    engine.dispose()


def _hold_files(session: Session) -> None:
    from app.services.jobs import hold_files

    file = session.query(File).one()
    hold_files(session, project=session.query(Project).one(), files=[("training_file", file)])


def _quota(session: Session) -> None:
    from app.services.quotas import check_job_quota

    check_job_quota(session, project=session.query(Project).one(), settings=Settings())


def _base(session: Session) -> None:
    from app.services import base_models

    base_models.hold(session, name="base", revision="path:/models/base@")


@pytest.mark.parametrize("check", [_hold_files, _quota, _base], ids=["files", "quota", "base model"])
def test_a_binding_check_holds_the_write_lock_until_its_commit(sqlite_session: tuple[Session, Path],
                                                               check: Callable[[Session], Any]) -> None:
    session, path = sqlite_session
    session.commit()  # nothing open before the check
    check(session)
    other = sqlite3.connect(path, timeout=0)
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("BEGIN IMMEDIATE")  # another request's first write
        session.commit()
        other.execute("BEGIN IMMEDIATE")  # free once the checking request commits
        other.rollback()
    finally:
        other.close()
