from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.support.data import chat_lines, jsonl, preference_lines


@pytest.fixture
def client(session: Any, tiny_model_dir: Any) -> Iterator[TestClient]:
    """The app with its database session bound to the test's rolled-back transaction (the catalogue's
    tiny-llama built, so the registry can read it)."""
    from app.api.deps import get_session
    from app.main import app
    from app.services.projects import create_api_key

    _row, key = create_api_key(session, project_name="team-a")
    session.commit()
    app.dependency_overrides[get_session] = lambda: session
    with TestClient(app, headers={"Authorization": f"Bearer {key}"}) as test_client:
        yield test_client
    app.dependency_overrides.clear()


@pytest.fixture
def other_client(session: Any, client: TestClient) -> Iterator[TestClient]:
    """A second project's client, for isolation checks."""
    from app.main import app
    from app.services.projects import create_api_key

    _row, key = create_api_key(session, project_name="team-b")
    session.commit()
    with TestClient(app, headers={"Authorization": f"Bearer {key}"}) as test_client:
        yield test_client


def upload(client: TestClient, content: bytes, *, filename: str = "train.jsonl", purpose: str = "fine-tune"
           ) -> Any:
    return client.post("/v1/files", files={"file": (filename, content, "application/jsonl")},
                       data={"purpose": purpose})


def upload_chat(client: TestClient, n: int = 12, offset: int = 0) -> str:
    response = upload(client, jsonl(chat_lines(n, offset=offset)))
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


def upload_pairs(client: TestClient, n: int = 12, offset: int = 0) -> str:
    response = upload(client, jsonl(preference_lines(n, offset=offset)))
    assert response.status_code == 200 and response.json()["status"] == "processed", response.text
    return str(response.json()["id"])
