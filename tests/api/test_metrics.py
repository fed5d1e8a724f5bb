from __future__ import annotations

import time
from typing import Any

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.core.config import get_settings
from tests.factories import create_job, create_project


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_report_jobs_queue_tokens_durations_heartbeats_and_http_latency(client: TestClient,
                                                                                 session: Any) -> None:
    project = create_project(session, "team-a")
    now = int(time.time())
    lease = get_settings().lease_seconds
    create_job(session, project=project, status="queued")
    create_job(session, project=project, status="queued")
    create_job(session, project=project, status="validating_files")  # waiting too: a file is being checked
    create_job(session, project=project, status="running", lease_owner="gpu-host-1:42",
               lease_expires_at=now - 3 + lease)
    create_job(session, project=project, status="succeeded", trained_tokens=1000, started_at=now - 120,
               finished_at=now - 20)
    create_job(session, project=project, status="failed", started_at=now - 4000, finished_at=now - 10)
    assert client.get("/v1/fine_tuning/jobs").status_code == 200

    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    got = samples(response.text)
    assert got[("tuneforge_jobs", (("status", "queued"),))] == 2
    assert got[("tuneforge_jobs", (("status", "running"),))] == 1
    assert got[("tuneforge_jobs", (("status", "cancelled"),))] == 0
    assert got[("tuneforge_queue_depth", ())] == 3
    assert got[("tuneforge_trained_tokens", ())] == 1000
    assert got[("tuneforge_job_duration_seconds_count", ())] == 2
    assert got[("tuneforge_job_duration_seconds_sum", ())] == 100 + 3990
    assert got[("tuneforge_job_duration_seconds_bucket", (("le", "300.0"),))] == 1
    assert got[("tuneforge_job_duration_seconds_bucket", (("le", "+Inf"),))] == 2
    age = got[("tuneforge_worker_heartbeat_age_seconds", (("worker", "gpu-host-1:42"),))]
    assert 2 <= age <= 30
    latency = ("tuneforge_http_request_duration_seconds_count",
               (("method", "GET"), ("route", "/v1/fine_tuning/jobs"), ("status", "200")))
    assert got[latency] >= 1
    # Raw paths with ids never become labels (unbounded cardinality).
    assert not any("ftjob-" in dict(labels).get("route", "") for _name, labels in got)


def test_readyz_checks_the_database_and_the_broker(client: TestClient) -> None:
    from app.api.deps import current_settings
    from app.core.config import Settings
    from app.main import app

    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json() == {"status": "ok", "database": "ok", "broker": "ok"}
    app.dependency_overrides[current_settings] = lambda: Settings(broker_url="redis://127.0.0.1:1/0")
    down = client.get("/readyz")
    assert down.status_code == 503 and down.json()["broker"] == "ConnectionError"
    assert client.get("/healthz").status_code == 200
