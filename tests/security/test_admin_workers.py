"""Admin view of the workers: resources, heartbeats, liveness and current jobs; admin keys only."""

from __future__ import annotations

import time
from typing import Any

from fastapi.testclient import TestClient

from tests.services.test_routing import add_worker


def test_admin_lists_workers_with_resources_heartbeat_and_current_job(admin_client: TestClient,
                                                                    session: Any) -> None:
    from app.services.projects import get_or_create_project
    from app.services.workers import get_worker, set_current_job
    from tests.factories import create_job

    add_worker(session, "gpu-a-0", gpus=2, gpu_memory_gb=79.6, gpu_names=("H100", "H100"), labels=("h100",))
    add_worker(session, "cpu-1", labels=("cpu",), cpu_count=16, memory_gb=62.5)
    job = create_job(session, project=get_or_create_project(session, name="team-a"), status="running", attempt=1,
                     step=12, total_steps=240)
    set_current_job(session, name="gpu-a-0", job_id=job.id)
    gone = get_worker(session, name="cpu-1")
    assert gone is not None
    gone.heartbeat_at = time.time() - 600
    session.commit()

    response = admin_client.get("/v1/admin/workers")
    assert response.status_code == 200, response.text
    listing = response.json()
    assert listing["object"] == "list" and listing["has_more"] is False
    by_name = {w["name"]: w for w in listing["data"]}
    gpu = by_name["gpu-a-0"]
    assert gpu["object"] == "worker" and gpu["live"] is True and gpu["status"] == "busy"
    assert (gpu["gpus"], gpu["gpu_memory_gb"], gpu["gpu_names"], gpu["labels"]) == (2, 79.6, ["H100", "H100"],
                                                                                      ["h100"])
    assert gpu["queue"] == "training.gpu-a-0" and 0 <= gpu["seconds_since_heartbeat"] < 5
    assert gpu["current_job"] == {"id": job.id, "project_id": gpu["current_job"]["project_id"], "project": "team-a",
                                  "status": "running", "attempt": 1, "crashes": 0, "step": 12, "total_steps": 240}
    cpu = by_name["cpu-1"]
    assert cpu["live"] is False and cpu["seconds_since_heartbeat"] >= 600 and cpu["current_job"] is None
    assert cpu["cpu_count"] == 16 and cpu["memory_gb"] == 62.5

    one = admin_client.get("/v1/admin/workers/gpu-a-0")
    assert one.status_code == 200 and one.json()["name"] == "gpu-a-0"
    missing = admin_client.get("/v1/admin/workers/nope")
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "name"


def test_project_keys_cannot_see_workers(client: TestClient) -> None:
    for path in ("/v1/admin/workers", "/v1/admin/workers/w1"):
        response = client.get(path)
        assert response.status_code == 403 and response.json()["error"]["code"] == "permission_denied"
        assert client.get(path, headers={"Authorization": ""}).status_code == 401

