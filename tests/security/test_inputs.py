"""Inputs the fuzzer found breaking the server, kept as plain regression tests."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import upload_chat


@pytest.mark.parametrize(("method", "path", "kwargs", "param"), [
    ("GET", "/v1/fine_tuning/jobs", {"params": {"after": "\x00"}}, "after"),
    ("GET", "/v1/files", {"params": {"after": "file-\x00"}}, "after"),
    ("GET", "/v1/files/file-%00", {}, None),
    ("GET", "/v1/fine_tuning/jobs/ftjob-%00/events", {}, None),
    ("POST", "/v1/fine_tuning/jobs", {"json": {"model": "tiny-llama", "training_file": "file-\x00"}}, "training_file"),
])
def test_nul_characters_answer_400_not_500(client: TestClient, method: str, path: str, kwargs: dict[str, Any],
                                           param: str | None) -> None:
    response = client.request(method, path, **kwargs)
    assert response.status_code in (400, 404), response.text
    assert response.json()["error"]["type"] == "invalid_request_error"
    if response.status_code == 400:
        assert response.json()["error"]["param"] == param


@pytest.mark.parametrize(("body", "param"), [
    ({"metadata": {"k": "a\x00b"}}, "metadata.k"),
    ({"metadata": {"k\x00": "b"}}, "metadata.k\x00"),
    ({"suffix": "x\x00"}, "suffix"),
])
def test_nul_characters_in_json_values_answer_400_naming_them(client: TestClient, body: dict[str, Any],
                                                              param: str) -> None:
    response = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": upload_chat(client),
                                                         **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_value"
    assert response.json()["error"]["param"] == param
