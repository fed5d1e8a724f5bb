"""No secrets in responses or logs: API keys, database URL passwords, W&B tokens."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

DB_PASSWORD = "S3cret-Db-Passw0rd"
DB_URL = f"postgresql+psycopg://tuneforge:{DB_PASSWORD}@127.0.0.1:1/tuneforge"
WANDB_TOKEN = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def wandb_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", WANDB_TOKEN)


def everything_logged(caplog: pytest.LogCaptureFixture) -> str:
    formatter = logging.Formatter("%(name)s %(message)s")
    return "\n".join(formatter.format(r) for r in caplog.records) + caplog.text


@pytest.mark.parametrize("text", [
    "key tf-abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG rejected",
    f"connecting to {DB_URL}",
    f"redis://:{DB_PASSWORD}@broker:6379/0 down",
    f"wandb login with {WANDB_TOKEN}",
])
def test_redact_masks_keys_url_passwords_and_environment_tokens(text: str) -> None:
    from app.core.logging import redact

    masked = redact(text)
    for secret in ("tf-abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG", DB_PASSWORD, WANDB_TOKEN):
        assert secret not in masked
    assert "***" in masked


def test_key_prefixes_and_ordinary_text_survive_redaction() -> None:
    from app.core.logging import redact

    assert redact("key tf-abc1234 (prefix) for project team-a") == "key tf-abc1234 (prefix) for project team-a"
    assert redact("postgresql+psycopg://postgres@127.0.0.1:5432/db") == "postgresql+psycopg://postgres@127.0.0.1:5432/db"


def test_log_records_are_redacted_whatever_the_logger(caplog: pytest.LogCaptureFixture) -> None:
    import app.main  # noqa: F401  # building the app installs the redaction
    from app.core.config import Settings

    caplog.set_level(logging.DEBUG)
    settings = Settings(database_url=DB_URL, broker_url=f"redis://:{DB_PASSWORD}@broker:6379/0")
    logging.getLogger("some.library").warning("settings: %r", settings)
    try:
        raise RuntimeError(f"wandb.login failed for {WANDB_TOKEN} with key tf-{'k' * 43}")
    except RuntimeError:
        logging.getLogger("tuneforge.worker").exception("integration failed")
    logged = everything_logged(caplog)
    assert "integration failed" in logged and "RuntimeError" in logged
    for secret in (DB_PASSWORD, WANDB_TOKEN, "k" * 43):
        assert secret not in logged


def test_a_bad_key_is_not_echoed_in_the_response_or_the_logs(client: TestClient,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    bad = "tf-" + "Z" * 43
    response = client.get("/v1/files", headers={"Authorization": f"Bearer {bad}"})
    assert response.status_code == 401 and bad not in response.text and "Z" * 10 not in response.text
    assert bad not in everything_logged(caplog)


@pytest.fixture
def broken_database(session: Any) -> Iterator[TestClient]:
    """Requests get a session on a database that refuses connections, at a URL with a password."""
    from app.api.deps import get_session
    from app.core.db import build_engine
    from app.main import app

    engine = build_engine(DB_URL)

    def unreachable() -> Iterator[Any]:
        from sqlalchemy.orm import Session

        with Session(engine) as db:
            yield db

    app.dependency_overrides[get_session] = unreachable
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client
    app.dependency_overrides.pop(get_session, None)
    engine.dispose()


def test_database_failures_reveal_neither_the_url_nor_the_password(broken_database: TestClient,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    key = "tf-" + "Q" * 43
    response = broken_database.get("/v1/files", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 503 and response.json()["error"]["code"] == "database_unavailable"
    ready = broken_database.get("/readyz")
    assert ready.status_code == 503
    logged = everything_logged(caplog)
    assert "database unavailable" in logged
    for text in (response.text, ready.text, logged):
        assert DB_PASSWORD not in text and key not in text and WANDB_TOKEN not in text


def test_wandb_integrations_never_carry_the_token(client: TestClient, caplog: pytest.LogCaptureFixture,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import SecretStr

    from app.core.config import get_settings
    from tests.api.conftest import upload_chat

    monkeypatch.setattr(get_settings(), "wandb_api_key", SecretStr(WANDB_TOKEN))
    caplog.set_level(logging.DEBUG)
    response = client.post("/v1/fine_tuning/jobs", json={
        "model": "tiny-llama", "training_file": upload_chat(client),
        "integrations": [{"type": "wandb", "wandb": {"project": "p", "entity": WANDB_TOKEN[:8]}}]})
    assert response.status_code == 200, response.text
    job = client.get(f"/v1/fine_tuning/jobs/{response.json()['id']}")
    for text in (response.text, job.text, everything_logged(caplog)):
        assert WANDB_TOKEN not in text
