"""Resource routing on real processes: jobs run only on workers that fit them, in priority order, and a
job that fits no worker says so; the admin API and CLI show the workers."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import pytest

from tests.integration.conftest import Service, all_events, stop_process, wait_for_status
from tests.support.data import chat_lines, jsonl
from tests.support.service import TERMINAL

pytestmark = [pytest.mark.integration]
NO_FIT = "No worker can run this job"


def _started_on(client: httpx.Client, job_id: str) -> dict:
    return next(e for e in all_events(client, job_id) if e["message"].startswith("Attempt 1 started on "))


def _wait_for_event(client: httpx.Client, job_id: str, prefix: str, timeout: float = 60,
                    containing: str = "") -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [e for e in all_events(client, job_id)
                 if e["message"].startswith(prefix) and containing in e["message"]]
        if found:
            return found
        time.sleep(0.3)
    raise TimeoutError(f"no {prefix!r} event for {job_id}: {all_events(client, job_id)}")


def _admin_key(service: Service) -> str:
    created = subprocess.run([sys.executable, "-m", "app.cli", "keys", "create", "ops", "--admin"], env=service.env,
                             check=True, capture_output=True, text=True)
    return str(json.loads(created.stdout.strip().splitlines()[-1])["key"])


def test_labelled_jobs_wait_for_their_worker_then_run_there_by_priority(service: Service) -> None:
    labelled = None
    with service.client() as client:
        file_id = client.post("/v1/files", files={"file": ("t.jsonl", jsonl(chat_lines(12)))},
                              data={"purpose": "fine-tune"}).json()["id"]

        def create(**extra: object) -> str:
            response = client.post("/v1/fine_tuning/jobs", json={
                "model": "tiny-llama", "training_file": file_id,
                "hyperparameters": {"n_epochs": 1, "batch_size": 4}, **extra})
            assert response.status_code == 200, response.text
            return str(response.json()["id"])

        try:
            low = create(resources={"labels": ["it-lab"]})
            high = create(resources={"labels": ["it-lab"]}, priority=10)
            gpu = create(resources={"gpus": 1})
            # worker-1 checks their files, then nothing live fits: each says so and waits queued. A job checked
            # before worker-1's first heartbeat says "no worker is live" first, then names it once it is live.
            for job_id in (low, high, gpu):
                _wait_for_event(client, job_id, NO_FIT, containing="live workers: worker-1 (0 GPUs)")
                assert wait_for_status(client, job_id, {"queued"}, timeout=30)["status"] == "queued"

            labelled = service.start_worker("it-lab-1", extra_env={"TUNEFORGE_WORKER_LABELS": "it-lab,blue"})
            finals = [wait_for_status(client, job_id, TERMINAL, timeout=120)
                      for job_id in (high, low)]
            assert [f["status"] for f in finals] == ["succeeded", "succeeded"], finals
            starts = [_started_on(client, job_id) for job_id in (high, low)]
            assert [s["data"]["worker"] for s in starts] == ["it-lab-1", "it-lab-1"]
            # One worker fits both: the high-priority job, created later, ran first.
            assert finals[0]["finished_at"] <= starts[1]["created_at"], "\n".join(
                f"{name} {e['created_at']} {e['message']}" for name, job_id in (("high", high), ("low", low))
                for e in all_events(client, job_id))
            assert _wait_for_event(client, low, "A worker that can run this job is live: sent to it-lab-1.")

            # The GPU job still fits nothing; it said so once per set of live workers (none, perhaps, before
            # worker-1's first heartbeat; worker-1; worker-1 and it-lab-1), and still waits.
            notes = [e["message"] for e in all_events(client, gpu) if e["message"].startswith(NO_FIT)]
            assert len(notes) == len(set(notes)) and len(notes) <= 3, notes
            assert client.get(f"/v1/fine_tuning/jobs/{gpu}").json()["status"] == "queued"
            assert client.post(f"/v1/fine_tuning/jobs/{gpu}/cancel").json()["status"] == "cancelled"

            admin = _admin_key(service)
            response = httpx.get(f"{service.base_url}/v1/admin/workers",
                                 headers={"Authorization": f"Bearer {admin}"}, timeout=30)
            assert response.status_code == 200, response.text
            workers = {w["name"]: w for w in response.json()["data"]}
            assert workers["it-lab-1"]["live"] and workers["it-lab-1"]["labels"] == ["it-lab", "blue"]
            assert workers["it-lab-1"]["gpus"] == 0 and workers["worker-1"]["live"]
            assert client.get("/v1/admin/workers").status_code == 403  # a project key
            listed = subprocess.run([sys.executable, "-m", "app.cli", "admin", "workers", "it-lab-1", "--json",
                                     "--url", service.base_url, "--api-key", admin], env=service.env,
                                    capture_output=True, text=True, timeout=60)
            assert listed.returncode == 0, listed.stderr
            assert json.loads(listed.stdout)["queue"].endswith(".it-lab-1")
        finally:
            if labelled is not None:
                stop_process(labelled, grace=20)
    # A clean shutdown leaves the registry.
    with httpx.Client(base_url=service.base_url, headers={"Authorization": f"Bearer {admin}"}) as admin_client:
        assert admin_client.get("/v1/admin/workers/it-lab-1").status_code == 404
