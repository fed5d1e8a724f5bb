"""`tuneforge keys create` refuses what POST /v1/admin/keys refuses, before touching the database."""

from __future__ import annotations

from contextlib import AbstractContextManager

import pytest
from typer.testing import CliRunner

from app.cli import app as cli


def _no_database() -> AbstractContextManager[object]:
    raise AssertionError("keys create opened the database for a name the API refuses")


@pytest.mark.parametrize(("args", "message"), [
    (["x" * 80], "Invalid value for PROJECT: String should have at most 64 characters"),
    ([""], "Invalid value for PROJECT: String should have at least 1 character"),
    (["my team"], "Invalid value for PROJECT: String should match pattern"),
    (["team-a", "--name", "n" * 129], "Invalid value for --name: String should have at most 128 characters"),
])
def test_keys_create_refuses_the_names_the_admin_api_refuses(monkeypatch: pytest.MonkeyPatch, args: list[str],
                                                            message: str) -> None:
    monkeypatch.setattr("app.core.db.session_scope", _no_database)
    result = CliRunner().invoke(cli, ["keys", "create", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
