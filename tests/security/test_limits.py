"""Limits: request body size, active jobs per project, request rate per key, list `limit` ceilings."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from tests.api.conftest import upload, upload_chat
from tests.security.conftest import ProjectAObjects
from tests.support.data import chat_lines, jsonl


@pytest.fixture
def small_bodies(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """JSON bodies up to 2000 bytes and uploads up to 4000 (the middleware reads settings per request)."""
    from app.core.config import get_settings

    monkeypatch.setenv("TUNEFORGE_MAX_JSON_BODY_BYTES", "2000")
    monkeypatch.setenv("TUNEFORGE_MAX_UPLOAD_BYTES", "4000")
    get_settings.cache_clear()
    yield
    monkeypatch.undo()
    get_settings.cache_clear()


def job_body(client: TestClient, **extra: Any) -> dict[str, Any]:
    return {"model": "tiny-llama", "training_file": upload_chat(client), **extra}


@pytest.mark.usefixtures("small_bodies")
def test_json_body_over_the_limit_gets_413_before_parsing(client: TestClient) -> None:
    big = {"model": "tiny-llama", "training_file": "file-x", "metadata": {"k": "v" * 3000}}
    response = client.post("/v1/fine_tuning/jobs", json=big)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    assert "2000 bytes" in response.json()["error"]["message"]


@pytest.mark.usefixtures("small_bodies")
def test_chunked_body_without_content_length_is_cut_off_at_the_limit(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "tiny-llama", "training_file": "file-x", "metadata": {"k": "'
        for _ in range(10):
            yield b"v" * 500
        yield b'"}}'

    response = client.post("/v1/fine_tuning/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "request_too_large"


@pytest.mark.usefixtures("small_bodies")
def test_small_json_bodies_pass(client: TestClient) -> None:
    response = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": "file-x"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_file"


@pytest.mark.usefixtures("small_bodies")
def test_uploads_are_capped_before_spooling_and_by_the_upload_limit(client: TestClient) -> None:
    huge = b"x" * (4000 + 1024**2 + 10)  # past the upload limit plus multipart overhead: refused at the door
    response = upload(client, huge)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    over = jsonl(chat_lines(60))  # over the 4000-byte upload limit, inside the multipart allowance
    assert len(over) > 4000
    response = upload(client, over)
    assert response.status_code == 413 and response.json()["error"]["code"] == "file_too_large"
    response = upload(client, jsonl(chat_lines(12)))
    assert response.status_code == 200, response.text


def test_active_jobs_per_project_are_capped_with_429_quota_exceeded(
        client: TestClient, other_client: TestClient, override_settings: Callable[..., Any]) -> None:
    override_settings(max_active_jobs_per_project=2)
    body = job_body(client)
    first = client.post("/v1/fine_tuning/jobs", json=body, headers={"Idempotency-Key": "one"})
    assert first.status_code == 200, first.text
    assert client.post("/v1/fine_tuning/jobs", json=body).status_code == 200
    refused = client.post("/v1/fine_tuning/jobs", json=body)
    assert refused.status_code == 429, refused.text
    error = refused.json()["error"]
    assert error["code"] == "quota_exceeded" and "maximum is 2" in error["message"]
    assert refused.headers["retry-after"] == "60" and refused.headers["x-should-retry"] == "false"
    # A replay of an accepted request creates nothing, so the quota does not refuse it.
    replay = client.post("/v1/fine_tuning/jobs", json=body, headers={"Idempotency-Key": "one"})
    assert replay.status_code == 200 and replay.json()["id"] == first.json()["id"]
    # Quotas are per project, and a finished job frees its slot.
    assert other_client.post("/v1/fine_tuning/jobs", json=job_body(other_client)).status_code == 200
    assert client.post(f"/v1/fine_tuning/jobs/{first.json()['id']}/cancel").status_code == 200
    assert client.post("/v1/fine_tuning/jobs", json=body).status_code == 200


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_requests_over_the_rate_limit_get_429_with_retry_after(
        backend: str, client: TestClient, other_client: TestClient, override_settings: Callable[..., Any]) -> None:
    override_settings(rate_limit_per_minute=6, rate_limit_burst=3, rate_limit_backend=backend)
    assert [client.get("/v1/files").status_code for _ in range(3)] == [200, 200, 200]
    refused = client.get("/v1/files")
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(refused.headers["retry-after"]) <= 10
    assert other_client.get("/v1/files").status_code == 200  # per key
    assert client.get("/healthz").status_code == 200  # health checks are not limited


def test_rate_limit_falls_back_to_memory_when_redis_is_down(client: TestClient,
                                                             override_settings: Callable[..., Any]) -> None:
    override_settings(rate_limit_per_minute=6, rate_limit_burst=2, rate_limit_backend="redis",
                      broker_url="redis://127.0.0.1:1/0")
    assert [client.get("/v1/files").status_code for _ in range(3)] == [200, 200, 429]


def test_rate_limit_zero_turns_it_off(client: TestClient, override_settings: Callable[..., Any]) -> None:
    override_settings(rate_limit_per_minute=0, rate_limit_burst=1)
    assert {client.get("/v1/files").status_code for _ in range(5)} == {200}


def test_every_list_route_enforces_the_limit_ceiling(client: TestClient, project_a: ProjectAObjects,
                                                     override_settings: Callable[..., Any]) -> None:
    from app.main import app

    override_settings(list_limit_max=5)
    checked = []
    for path, operations in app.openapi()["paths"].items():
        get = operations.get("get", {})
        if not any(p["name"] == "limit" and p["in"] == "query" for p in get.get("parameters", [])):
            continue
        if path.startswith("/v1/admin"):
            continue  # needs an admin key: covered in test_admin
        url = re.sub(r"{(\w+)(?::\w+)?}", lambda m: project_a.path_ids[m.group(1)], path)
        assert client.get(url, params={"limit": 5}).status_code == 200, url
        for bad in (6, 0):
            response = client.get(url, params={"limit": bad})
            assert response.status_code == 400 and response.json()["error"]["param"] == "limit", url
        checked.append(path)
    assert len(checked) >= 4, checked


def test_resuming_a_paused_job_counts_against_the_quota(client: TestClient,
                                                        override_settings: Callable[..., Any]) -> None:
    """A paused job holds no slot; resuming it takes one, so pause, create and resume cannot outgrow the quota."""
    override_settings(max_active_jobs_per_project=1)
    body = job_body(client)
    paused = client.post("/v1/fine_tuning/jobs", json=body).json()["id"]
    assert client.post(f"/v1/fine_tuning/jobs/{paused}/pause").json()["status"] == "paused"
    other = client.post("/v1/fine_tuning/jobs", json=body)
    assert other.status_code == 200, other.text
    refused = client.post(f"/v1/fine_tuning/jobs/{paused}/resume")
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "quota_exceeded", refused.text
    assert client.get(f"/v1/fine_tuning/jobs/{paused}").json()["status"] == "paused"
    # a job that is not paused is refused for that, whatever the quota
    not_paused = client.post(f"/v1/fine_tuning/jobs/{other.json()['id']}/resume")
    assert not_paused.status_code == 400 and not_paused.json()["error"]["code"] == "job_not_paused"
    assert client.post(f"/v1/fine_tuning/jobs/{other.json()['id']}/cancel").status_code == 200
    # it never ran: back through validating_files, whose checks run again
    assert client.post(f"/v1/fine_tuning/jobs/{paused}/resume").json()["status"] == "validating_files"


def test_a_job_created_while_another_is_planned_counts_against_its_quota(
        client: TestClient, override_settings: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by an audit: the quota was counted before the job was planned, and the planning can commit (token
    statistics, the model catalogue), which released the project's lock; on SQLite it never locked. Two creates at
    once both counted the other's job out and went over the quota. The other create lands here during the planning."""
    from app.models import Project
    from app.services import jobs
    from tests.factories import create_job

    override_settings(max_active_jobs_per_project=1)
    body = job_body(client)
    real_check = jobs.check_fits_some_worker
    landed: list[str] = []

    def another_create_meanwhile(session: Any, **kwargs: Any) -> Any:
        if not landed:  # the other request's job, committed (the test's database session is the request's)
            landed.append(create_job(session, project=session.scalar(select(Project).where(
                Project.name == "team-a"))).id)
        return real_check(session, **kwargs)

    monkeypatch.setattr(jobs, "check_fits_some_worker", another_create_meanwhile)
    refused = client.post("/v1/fine_tuning/jobs", json=body)
    assert len(landed) == 1
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "quota_exceeded", refused.text
    listed = client.get("/v1/fine_tuning/jobs").json()["data"]
    assert len([j for j in listed if j["status"] in ("queued", "validating_files", "running")]) == 1


def test_a_retry_with_the_key_of_a_create_that_committed_meanwhile_gets_that_job_not_429(
        client: TestClient, override_settings: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by a review: two requests with the same Idempotency-Key at one job under the quota; the first committed
    while the second was planned, and the second's binding quota check counted that job and answered 429 instead
    of returning it."""
    from app.models import Project
    from app.schemas.jobs import JobCreate
    from app.services import jobs
    from tests.factories import create_job

    override_settings(max_active_jobs_per_project=1)
    body = job_body(client)
    real_check = jobs.check_fits_some_worker
    landed: list[str] = []

    def the_first_commits_meanwhile(session: Any, **kwargs: Any) -> Any:
        if not landed:
            landed.append(create_job(session, project=session.scalar(select(Project).where(Project.name == "team-a")),
                                     idempotency_key="once",
                                     request_hash=jobs._request_hash(JobCreate.model_validate(body))).id)
        return real_check(session, **kwargs)

    monkeypatch.setattr(jobs, "check_fits_some_worker", the_first_commits_meanwhile)
    again = client.post("/v1/fine_tuning/jobs", json=body, headers={"Idempotency-Key": "once"})
    assert again.status_code == 200, again.text
    assert again.json()["id"] == landed[0]
