"""Project B's keys never reach project A's objects, on every route the app has (derived, not listed)."""

from __future__ import annotations

import re
from typing import Any

import pytest
from fastapi.routing import iter_route_contexts
from fastapi.testclient import TestClient

from tests.security.conftest import ProjectAObjects

_PARAM = re.compile(r"{(\w+)(?::\w+)?}")


def app_routes() -> list[tuple[str, str, bool]]:
    """(method, path template, needs a key) for every HTTP route of the app, included routers flattened."""
    from app.main import app

    found = []
    for route in iter_route_contexts(app.routes):
        assert route.path is not None and route.methods, f"unexpected route {route!r}: extend the walker"
        found += [(method, route.path, needs_key(route)) for method in sorted(route.methods - {"HEAD"})]
    return found


def needs_key(route: Any) -> bool:
    """Whether the route's dependencies include the authenticated caller."""
    from app.api.deps import get_caller

    stack = [getattr(route, "dependant", None)]
    while stack:
        dependant = stack.pop()
        if dependant is None:
            continue
        if dependant.call is get_caller:
            return True
        stack.extend(dependant.dependencies)
    return False


def fill(path: str, ids: dict[str, str], *, public: bool = False) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if public:  # routes without a key take no object ids (checked below); any value will do
            return ids.get(name, "x")
        assert name in ids, (f"path parameter {name!r} in {path}: add an id of project A's object of that kind "
                             "to the project_a fixture so the isolation walk covers the route")
        return ids[name]

    return _PARAM.sub(value, path)


def call(client: TestClient, method: str, path: str) -> Any:
    body = {} if method in ("POST", "PUT", "PATCH") else None
    return client.request(method, path, json=body)


def assert_envelope(response: Any, status: int, code: str | None = None) -> None:
    assert response.status_code == status, (response.request.method, response.request.url, response.text)
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if code is not None:
        assert error["code"] == code


def assert_no_leak(response: Any, a: ProjectAObjects, *, asked: str) -> None:
    """Nothing of A's in the answer, except ids the caller itself put in the path (echoed in 404s)."""
    text = response.text
    for object_id in a.all_ids:
        if object_id and object_id not in asked:
            assert object_id not in text, (response.request.method, response.request.url, object_id)


def is_admin_route(path: str) -> bool:
    return path.startswith("/v1/admin")


def test_the_walk_covers_object_list_and_admin_routes() -> None:
    paths = {path for _method, path, _key in app_routes()}
    assert "/v1/files/{file_id}" in paths and "/v1/fine_tuning/jobs/{fine_tuning_job_id}/artifacts/{name}" in paths
    assert "/v1/fine_tuning/jobs" in paths and any(is_admin_route(p) for p in paths)


def test_routes_without_a_key_take_no_object_ids(project_a: ProjectAObjects) -> None:
    for method, template, keyed in app_routes():
        if not keyed:
            taken = set(_PARAM.findall(template)) & set(project_a.path_ids)
            assert not taken, f"{method} {template} takes {taken} but does not authenticate the caller"


def test_every_object_route_answers_404_to_another_projects_key(project_a: ProjectAObjects,
                                                                 other_client: TestClient,
                                                                 admin_client: TestClient) -> None:
    walked = 0
    for client, is_admin in ((other_client, False), (admin_client, True)):
        for method, template, keyed in app_routes():
            if not _PARAM.search(template) or (is_admin and is_admin_route(template)):
                continue
            if not keyed:
                response = call(client, method, fill(template, project_a.path_ids, public=True))
                assert response.status_code < 500, (template, response.text)
                assert_no_leak(response, project_a, asked="")
                continue
            path = fill(template, project_a.path_ids)
            response = call(client, method, path)
            if is_admin_route(template):
                assert_envelope(response, 403, "permission_denied")
            else:
                assert_envelope(response, 404)
            assert_no_leak(response, project_a, asked=path)
            walked += 1
    assert walked >= 10


def test_list_routes_never_show_another_projects_objects(project_a: ProjectAObjects, other_client: TestClient,
                                                         admin_client: TestClient) -> None:
    for client, is_admin in ((other_client, False), (admin_client, True)):
        for method, template, _keyed in app_routes():
            if method != "GET" or _PARAM.search(template) or (is_admin and is_admin_route(template)):
                continue
            response = client.get(template)
            if is_admin_route(template):
                assert_envelope(response, 403, "permission_denied")
            assert response.status_code < 500, (template, response.text)
            assert_no_leak(response, project_a, asked="")


def test_writes_without_a_path_id_cannot_use_another_projects_objects(project_a: ProjectAObjects,
                                                                      other_client: TestClient) -> None:
    file_id = project_a.path_ids["file_id"]
    response = other_client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_id})
    assert_envelope(response, 400, "invalid_file")
    response = other_client.post("/v1/fine_tuning/jobs", json={
        "model": project_a.path_ids["model_id"], "training_file": file_id})
    assert_envelope(response, 400, "model_not_available")
    response = other_client.get("/v1/files", params={"after": file_id})
    assert_envelope(response, 400)
    response = other_client.get("/v1/fine_tuning/jobs", params={"after": project_a.path_ids["fine_tuning_job_id"]})
    assert_envelope(response, 400)


@pytest.mark.usefixtures("poll_sessions")
def test_project_a_reaches_every_object_it_owns(project_a: ProjectAObjects, client: TestClient,
                                                other_client: TestClient, admin_client: TestClient) -> None:
    """The ids the walk uses are real: A's own key reads each of them (else a 404 above proves nothing)."""
    for method, template, keyed in app_routes():
        if method == "GET" and keyed and _PARAM.search(template) and not is_admin_route(template):
            response = client.get(fill(template, project_a.path_ids))
            assert response.status_code in (200, 206), (template, response.text)
    for method, template, keyed in app_routes():  # B's writes above changed nothing of A's
        if method == "DELETE" and keyed and not is_admin_route(template):
            call(other_client, method, fill(template, project_a.path_ids))
    assert client.get(f"/v1/files/{project_a.path_ids['file_id']}").status_code == 200
    assert client.get(f"/v1/models/{project_a.path_ids['model_id']}").status_code == 200
