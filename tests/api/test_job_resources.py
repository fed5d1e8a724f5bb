"""Job create extensions: resources (GPUs, GPU memory, labels, processes) and priority."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import select

from tests.api.test_jobs import create


def test_resources_and_priority_are_stored_echoed_and_reach_the_training_config(client: TestClient,
                                                                               session: Any) -> None:
    from app.models import FineTuningJob

    response = create(client, priority=7, resources={"gpus": 2, "min_gpu_memory_gb": 40,
                                                     "labels": ["a100", "eu", "a100"], "distributed": "fsdp"})
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["priority"] == 7
    assert job["resources"] == {"gpus": 2, "min_gpu_memory_gb": 40.0, "labels": ["a100", "eu"], "processes": 2,
                                "distributed": "fsdp"}
    assert client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["resources"] == job["resources"]
    row = session.scalar(select(FineTuningJob).where(FineTuningJob.id == job["id"]))
    assert row.priority == 7 and row.resources["labels"] == ["a100", "eu"]
    assert row.config["processes"] == 2 and row.config["distributed"] == "fsdp"
    # No worker is registered here: the job says so at once (and is sent on for its files to be checked).
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]
    assert any(e["level"] == "warn" and e["message"].startswith(
        "No worker can run this job: it asks for 2 GPUs with at least 40 GB each and labels 'a100', 'eu'; "
        "no worker is live.") for e in events), events


def test_a_job_that_asks_for_nothing_needs_nothing_and_runs_one_process(client: TestClient) -> None:
    job = create(client).json()
    assert job["priority"] == 0
    assert job["resources"] == {"gpus": 0, "min_gpu_memory_gb": None, "labels": [], "processes": 1,
                                "distributed": "ddp"}
    cpu = create(client, resources={"processes": 3}).json()
    assert cpu["resources"]["processes"] == 3 and "processes" not in cpu["method"]["supervised"]["hyperparameters"]


def test_inconsistent_resources_are_refused_naming_the_param(client: TestClient) -> None:
    cases = [
        ({"gpus": 2, "processes": 4}, "resources.processes", "must equal resources.gpus (2)"),
        ({"min_gpu_memory_gb": 40}, "resources.min_gpu_memory_gb", "set resources.gpus"),
        ({"gpus": 65}, "resources.gpus", None),
        ({"gpus": -1}, "resources.gpus", None),
        ({"processes": 0}, "resources.processes", None),
        ({"gpus": 1, "min_gpu_memory_gb": 0}, "resources.min_gpu_memory_gb", None),
        ({"labels": ["a b"]}, "resources.labels.0", None),
        ({"labels": [""]}, "resources.labels.0", None),
        ({"labels": [f"l{i}" for i in range(17)]}, "resources.labels", None),
        ({"distributed": "zero3"}, "resources.distributed", None),
        ({"gpu": 1}, "resources.gpu", None),
    ]
    for resources, param, words in cases:
        response = create(client, resources=resources)
        assert response.status_code == 400, (resources, response.text)
        error = response.json()["error"]
        assert error["param"] == param, (resources, error)
        assert words is None or words in error["message"], error["message"]
    for priority in (101, -101, "high"):
        response = create(client, priority=priority)
        assert response.status_code == 400 and response.json()["error"]["param"] == "priority"


def test_idempotency_covers_resources_and_priority(client: TestClient) -> None:
    from app.schemas.jobs import JobCreate
    from app.services.jobs import _request_hash

    body = {"model": "tiny-llama", "training_file": "file-x"}
    plain = JobCreate.model_validate(body)
    # A body without the extensions hashes as before they existed: keys replayed across the upgrade match.
    legacy = plain.model_dump(mode="json")
    legacy.pop("resources")
    legacy.pop("priority")
    assert _request_hash(plain) == hashlib.sha256(json.dumps(legacy, sort_keys=True).encode()).hexdigest()
    assert _request_hash(JobCreate.model_validate({**body, "priority": 0, "resources": {}})) == _request_hash(plain)
    assert _request_hash(JobCreate.model_validate({**body, "priority": 1})) != _request_hash(plain)
    assert _request_hash(JobCreate.model_validate({**body, "resources": {"gpus": 1}})) != _request_hash(plain)
    file_id = client.post("/v1/files", files={"file": ("t.jsonl", _chat(), "application/jsonl")},
                          data={"purpose": "fine-tune"}).json()["id"]
    headers = {"Idempotency-Key": "resources-key"}
    made = client.post("/v1/fine_tuning/jobs", headers=headers,
                       json={"model": "tiny-llama", "training_file": file_id, "priority": 2})
    again = client.post("/v1/fine_tuning/jobs", headers=headers,
                        json={"model": "tiny-llama", "training_file": file_id, "priority": 2})
    assert made.status_code == 200 and again.json()["id"] == made.json()["id"]
    other = client.post("/v1/fine_tuning/jobs", headers=headers,
                        json={"model": "tiny-llama", "training_file": file_id, "priority": 3})
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_key_reused"


def _chat() -> bytes:
    from tests.support.data import chat_lines, jsonl

    return jsonl(chat_lines(12))
