"""Two projects: A owns one of every kind of object, B holds a project key and an admin key."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import client, other_client, upload_chat

__all__ = ["client", "other_client"]  # the API tests' fixtures, used here too


@dataclass
class ProjectAObjects:
    """Ids of project A's objects, keyed by the path parameter that names each kind."""

    project_id: str
    path_ids: dict[str, str]
    other_ids: list[str] = field(default_factory=list)

    @property
    def all_ids(self) -> list[str]:
        return [self.project_id, *self.path_ids.values(), *self.other_ids]


@pytest.fixture
def project_a(session: Any, client: TestClient) -> ProjectAObjects:
    """A file, a succeeded job (event, checkpoint, artifact, fine-tuned model, answer evaluation), a key and a
    webhook."""
    from app.core.storage import get_storage
    from app.models import AnswerEvaluation, JobArtifact, JobCheckpoint
    from app.models.base import new_id
    from app.services.files import build_result_file
    from app.services.jobs import add_event
    from app.services.projects import create_api_key, get_or_create_project
    from app.services.webhooks import create_endpoint
    from tests.factories import create_job

    file_id = upload_chat(client)
    project = get_or_create_project(session, name="team-a")
    key_row, _key = create_api_key(session, project_name="team-a", name="second")
    job = create_job(session, project=project, training_file=file_id, status="succeeded", finished_at=1,
                     fine_tuned_model=f"ft:tiny-llama:{project.id}:secret:{new_id('')[-8:]}")
    event = add_event(session, job=job, message="Created fine-tuning job")
    stored = get_storage().write(f"results/{job.id}/adapter.tar", [b"adapter bytes"])
    result = build_result_file(project_pk=project.pk, filename="adapter.tar", blob_key=stored.key,
                               size=stored.bytes, sha256=stored.sha256)
    session.add(result)
    session.flush()
    artifact_name = f"adapter-{new_id('')}"  # distinctive, so the leak check can look for it
    session.add(JobArtifact(job_pk=job.pk, file_pk=result.pk, name=artifact_name, kind="adapter"))
    checkpoint = JobCheckpoint(id=new_id("ftckpt_"), job_pk=job.pk, step_number=1, metrics={"step": 1},
                               attempt=1, blob_key=stored.key, sha256=stored.sha256, bytes=stored.bytes)
    session.add(checkpoint)
    evaluation = AnswerEvaluation(id=new_id("ftevaluation-"), job_pk=job.pk, project_pk=project.pk,
                                  model=job.fine_tuned_model, file_id=file_id, max_examples=4, target={},
                                  status="succeeded", report={"examples": 4}, result_files=[result.id])
    session.add(evaluation)
    session.commit()
    webhook = create_endpoint(session, project=project, url="https://hooks.example.com/a", event_types=None)
    return ProjectAObjects(
        project_id=project.id,
        path_ids={"file_id": file_id, "fine_tuning_job_id": job.id, "model_id": job.fine_tuned_model or "",
                  "name": artifact_name, "key_id": key_row.id,
                  "webhook_id": webhook.id, "evaluation_id": evaluation.id},
        other_ids=[event.id, checkpoint.id, result.id, webhook.secret, webhook.url])


@pytest.fixture
def admin_client(session: Any, other_client: TestClient) -> Iterator[TestClient]:
    """An admin key of project B."""
    from app.main import app
    from app.services.projects import create_api_key

    _row, key = create_api_key(session, project_name="team-b", name="ops", is_admin=True)
    session.commit()
    with TestClient(app, headers={"Authorization": f"Bearer {key}"}) as test_client:
        yield test_client


@pytest.fixture
def poll_sessions(session: Any) -> Iterator[None]:
    """SSE polls read the test's transaction too."""
    from app.api.routes.stream import get_poll_sessions
    from app.main import app

    app.dependency_overrides[get_poll_sessions] = lambda: lambda: nullcontext(session)
    yield
    app.dependency_overrides.pop(get_poll_sessions, None)


@pytest.fixture
def override_settings(client: TestClient) -> Iterator[Callable[..., Any]]:
    """Call with Settings fields to change them for route dependencies and middleware alike."""
    from app.api.deps import current_settings
    from app.core.config import get_settings
    from app.main import app

    def apply(**changes: Any) -> Any:
        changed = get_settings().model_copy(update=changes)
        app.dependency_overrides[current_settings] = lambda: changed
        return changed

    yield apply
    app.dependency_overrides.pop(current_settings, None)
