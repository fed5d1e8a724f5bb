from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.api.routes import stream
from app.services.jobs import add_event
from tests.factories import create_job, create_project


def parse_frames(text: str) -> list[dict[str, Any]]:
    """SSE text -> [{"event", "id", "data"}], comments dropped."""
    frames = []
    for block in text.split("\n\n"):
        fields: dict[str, Any] = {}
        for line in block.splitlines():
            if line.startswith(":") or ": " not in line:
                continue
            name, _, value = line.partition(": ")
            fields[name] = json.loads(value) if name == "data" else value
        if fields:
            frames.append(fields)
    return frames


@pytest.fixture
def poll_in_test_session(session: Any, client: TestClient) -> Iterator[list[Any]]:
    """Polls read the test's transaction; a hook list lets a test change the job between polls."""
    from app.main import app

    hooks: list[Any] = []

    @contextmanager
    def same_session() -> Iterator[Any]:
        if hooks:
            hooks.pop(0)()
        yield session

    app.dependency_overrides[stream.get_poll_sessions] = lambda: same_session
    yield hooks


def finished_job(session: Any, *, status: str = "succeeded", events: int = 3) -> Any:
    job = create_job(session, project=create_project(session, "team-a"), status="running", step=2, total_steps=4)
    for i in range(events):
        add_event(session, job=job, message=f"event {i}", type_="metrics",
                  data={"step": i + 1, "train_loss": 1.0 / (i + 1)})
    job.status = status
    session.commit()
    return job


def test_stream_sends_events_oldest_first_then_the_terminal_status_and_ends(
        client: TestClient, session: Any, poll_in_test_session: list[Any]) -> None:
    job = finished_job(session)
    response = client.get(f"/v1/fine_tuning/jobs/{job.id}/events/stream")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    frames = parse_frames(response.text)
    events = [f for f in frames if f["event"] == "event"]
    assert [e["data"]["message"] for e in events] == ["event 0", "event 1", "event 2"]
    assert all(e["id"] == e["data"]["id"] and e["data"]["object"] == "fine_tuning.job.event" for e in events)
    assert events[0]["data"]["type"] == "metrics" and events[0]["data"]["data"]["step"] == 1
    status = [f for f in frames if f["event"] == "status"]
    assert len(status) == 1 and status[0]["data"]["status"] == "succeeded"
    assert status[0]["data"]["progress"] == {"step": 2, "total_steps": 4}
    assert frames[-1]["event"] == "status"


def test_last_event_id_resumes_after_that_event(client: TestClient, session: Any,
                                                poll_in_test_session: list[Any]) -> None:
    job = finished_job(session)
    first = parse_frames(client.get(f"/v1/fine_tuning/jobs/{job.id}/events/stream").text)
    resumed = parse_frames(client.get(f"/v1/fine_tuning/jobs/{job.id}/events/stream",
                                      headers={"Last-Event-ID": first[0]["id"]}).text)
    assert [f["data"]["message"] for f in resumed if f["event"] == "event"] == ["event 1", "event 2"]
    bad = client.get(f"/v1/fine_tuning/jobs/{job.id}/events/stream", headers={"Last-Event-ID": "ftevent-nope"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "Last-Event-ID"


def test_stream_follows_a_live_job_until_it_finishes(client: TestClient, session: Any,
                                                     poll_in_test_session: list[Any],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stream, "POLL_SECONDS", 0.01)
    job = create_job(session, project=create_project(session, "team-a"), status="running", step=0, total_steps=4)

    def progress() -> None:
        job.step = 3
        add_event(session, job=job, message="Step 3/4", type_="metrics", data={"step": 3})
        session.commit()

    def finish() -> None:
        job.status, job.step = "succeeded", 4
        add_event(session, job=job, message="The job has successfully completed.")
        session.commit()

    poll_in_test_session.extend([lambda: None, lambda: None, progress, lambda: None, finish])
    frames = parse_frames(client.get(f"/v1/fine_tuning/jobs/{job.id}/events/stream").text)
    assert [(f["event"], f["data"].get("status") or f["data"]["message"]) for f in frames] == [
        ("status", "running"), ("event", "Step 3/4"), ("status", "running"),
        ("event", "The job has successfully completed."), ("status", "succeeded")]
    assert frames[2]["data"]["progress"]["step"] == 3


def test_another_projects_job_is_not_found(client: TestClient, other_client: TestClient, session: Any,
                                           poll_in_test_session: list[Any]) -> None:
    job = finished_job(session)
    response = other_client.get(f"/v1/fine_tuning/jobs/{job.id}/events/stream")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    assert client.get("/v1/fine_tuning/jobs/ftjob-nope/events/stream").status_code == 404


def test_a_stream_ends_once_its_api_key_is_revoked(client: TestClient, session: Any,
                                                   poll_in_test_session: list[Any],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by an audit: a revoked key's open stream kept sending frames, while its new requests got 401."""
    from app.models import ApiKey
    from app.services.projects import revoke_api_key

    monkeypatch.setattr(stream, "POLL_SECONDS", 0.01)
    monkeypatch.setattr(stream, "KEY_CHECK_SECONDS", 0.0)
    job = create_job(session, project=create_project(session, "team-a"), status="running", step=0, total_steps=4)
    key = session.query(ApiKey).one()  # the client's

    def revoke() -> None:
        revoke_api_key(session, key_id=key.id)
        session.commit()

    def finish() -> None:  # ends a stream that did not end at the revocation (with a frame the test then sees)
        job.status = "succeeded"
        session.commit()

    poll_in_test_session.extend([lambda: None, lambda: None, revoke, *[lambda: None] * 20, finish])
    frames = parse_frames(client.get(f"/v1/fine_tuning/jobs/{job.id}/events/stream").text)
    assert [f["data"]["status"] for f in frames] == ["running"]  # then it ended, the job still running
    assert client.get(f"/v1/fine_tuning/jobs/{job.id}").status_code == 401
