"""Admin API: keys and projects across tenants, jobs across projects; project keys get 403."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from tests.security.conftest import ProjectAObjects


def test_admin_creates_a_key_shown_once_that_works_and_revokes_it(admin_client: TestClient,
                                                                  session: Any) -> None:
    from app.main import app

    created = admin_client.post("/v1/admin/keys", json={"project": "team-c", "name": "ci"})
    assert created.status_code == 200, created.text
    body = created.json()
    key = body["key"]
    assert key.startswith("tf-") and body["project"] == "team-c" and body["is_admin"] is False
    assert body["key_prefix"] == key[:10] and body["revoked_at"] is None
    listing = admin_client.get("/v1/admin/keys", params={"limit": 100})
    assert listing.status_code == 200
    assert body["id"] in [k["id"] for k in listing.json()["data"]]
    assert key not in listing.text and "key_hash" not in listing.text  # never shown again
    with TestClient(app, headers={"Authorization": f"Bearer {key}"}) as team_c:
        assert team_c.get("/v1/files").status_code == 200
        revoked = admin_client.delete(f"/v1/admin/keys/{body['id']}")
        assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
        assert key not in revoked.text
        response = team_c.get("/v1/files")
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert admin_client.delete("/v1/admin/keys/key_nope").status_code == 404


def test_admin_lists_projects_and_jobs_across_projects(admin_client: TestClient, project_a: ProjectAObjects
                                                       ) -> None:
    projects = admin_client.get("/v1/admin/projects").json()["data"]
    assert {"team-a", "team-b"} <= {p["name"] for p in projects}
    jobs = admin_client.get("/v1/admin/jobs").json()["data"]
    assert project_a.path_ids["fine_tuning_job_id"] in [j["id"] for j in jobs]
    only_a = admin_client.get("/v1/admin/jobs", params={"project": project_a.project_id}).json()["data"]
    assert {j["organization_id"] for j in only_a} == {project_a.project_id}
    response = admin_client.get("/v1/admin/jobs", params={"project": "proj_nope"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "project"
    assert admin_client.get("/v1/admin/jobs", params={"limit": 1000}).status_code == 400


def test_admin_keys_stay_in_their_own_project_on_normal_routes(admin_client: TestClient,
                                                               project_a: ProjectAObjects) -> None:
    assert admin_client.get(f"/v1/fine_tuning/jobs/{project_a.path_ids['fine_tuning_job_id']}").status_code == 404
    assert project_a.path_ids["fine_tuning_job_id"] not in admin_client.get("/v1/fine_tuning/jobs").text


def test_project_keys_and_missing_keys_cannot_use_the_admin_api(client: TestClient) -> None:
    for method, path in (("GET", "/v1/admin/keys"), ("POST", "/v1/admin/keys"), ("GET", "/v1/admin/projects"),
                         ("GET", "/v1/admin/jobs"), ("DELETE", "/v1/admin/keys/key_x")):
        response = client.request(method, path, json={"project": "x"} if method == "POST" else None)
        assert response.status_code == 403, (path, response.text)
        assert response.json()["error"] == {"message": response.json()["error"]["message"],
                                            "type": "permission_error", "param": None, "code": "permission_denied"}
        response = client.request(method, path, headers={"Authorization": ""})
        assert response.status_code == 401, (path, response.text)


def test_keyless_mode_has_no_admin(client: TestClient, override_settings: Any) -> None:
    override_settings(require_api_keys=False)
    response = client.get("/v1/admin/keys", headers={"Authorization": ""})
    assert response.status_code == 403 and response.json()["error"]["code"] == "permission_denied"
    assert client.get("/v1/files", headers={"Authorization": ""}).status_code == 200


def test_admin_key_creation_validates_the_project_name(admin_client: TestClient) -> None:
    for bad in ("", "../x", "a" * 65, "team a"):
        response = admin_client.post("/v1/admin/keys", json={"project": bad})
        assert response.status_code == 400 and response.json()["error"]["param"] == "project", bad


def test_a_key_name_is_printable_text(admin_client: TestClient) -> None:
    """Found by an audit: a NUL or a right-to-left override was stored, and shown in listings and the CLI's table."""
    for bad in ("ci\x00bot", "ci\nbot", "laptop\u202egpj.exe"):
        response = admin_client.post("/v1/admin/keys", json={"project": "team-n", "name": bad})
        assert response.status_code == 400 and response.json()["error"]["param"] == "name", bad
    made = admin_client.post("/v1/admin/keys", json={"project": "team-n", "name": "Équipe données ✓"})
    assert made.status_code == 200 and made.json()["name"] == "Équipe données ✓", made.text


def test_keys_are_stored_only_as_hashes(session: Any) -> None:
    from sqlalchemy import select

    from app.models import ApiKey
    from app.services.projects import authenticate, create_api_key

    row, key = create_api_key(session, project_name="team-h")
    stored = session.scalar(select(ApiKey).where(ApiKey.id == row.id))
    assert key not in (stored.key_hash, stored.key_prefix, stored.name) and len(stored.key_hash) == 64
    assert authenticate(session, key=key) is not None and authenticate(session, key=key + "x") is None
