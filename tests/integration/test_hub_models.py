"""Hub models end to end: real `tuneforge api` and `tuneforge worker` processes on Postgres, a fake Hub on
loopback (HF_ENDPOINT) serving the tiny model as test-org/tiny-chat."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from tests.support.data import chat_lines, jsonl
from tests.support.fake_hub import FakeHub, repo_from_dir
from tests.support.service import TERMINAL, Service, all_events, running_service, wait_for_status

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = "test-org/tiny-chat"
V1 = "c0ffee" + "0" * 34
WEIGHTS = "model.safetensors"


def cli(service: Service, key: str, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "app.cli", *args, "--url", service.base_url, "--api-key", key],
                          env=service.env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def create_job(service: Service, file_id: str) -> str:
    with service.client() as client:
        job = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-chat", "training_file": file_id,
                                                        "hyperparameters": {"n_epochs": 1, "batch_size": 4}})
        assert job.status_code == 200, job.text
        return str(job.json()["id"])


def run_job(service: Service, file_id: str, job_id: str | None = None) -> dict:
    job_id = job_id or create_job(service, file_id)
    with service.client() as client:
        final = wait_for_status(client, job_id, TERMINAL)
        assert final["status"] == "succeeded", final
        return final


def watch_download(service: Service, admin_key: str, job_id: str) -> set[tuple[str, str]]:
    """(job status, model status) pairs seen until the job leaves the queue."""
    seen: set[tuple[str, str]] = set()
    admin = {"Authorization": f"Bearer {admin_key}"}
    with service.client() as client:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"]
            model = client.get("/v1/admin/models/tiny-chat", headers=admin).json()["status"]
            seen.add((job, model))
            if job not in ("validating_files", "queued"):
                return seen
            time.sleep(0.2)
    raise AssertionError(f"the job never left the queue: {seen}")


def test_a_registered_hub_model_is_pulled_once_per_host_and_pinned(tmp_path: Path, tiny_model_dir: Path) -> None:
    # The weights take a few seconds to come, so the test sees the job wait queued while they download.
    repo = repo_from_dir(REPO, tiny_model_dir, revisions={"main": "f" * 40, "v1": V1}, license="mit",
                         delay={WEIGHTS: 3.0})
    with FakeHub([repo]) as hub, running_service(
            tmp_path, tiny_model_dir=tiny_model_dir, name=f"hub_{os.getpid()}", quiet=True,
            extra_env={"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0"}) as service:
        created = subprocess.run([sys.executable, "-m", "app.cli", "keys", "create", "ops", "--admin"],
                                 env=service.env, check=True, capture_output=True, text=True)
        admin_key = json.loads(created.stdout.strip().splitlines()[-1])["key"]
        said = cli(service, admin_key, "models", "add", "tiny-chat", f"hf:{REPO}", "--revision", "v1")
        assert f"at {V1}" in said and "registered" in said
        assert hub.downloads(REPO, WEIGHTS) == 0  # the API host read config and tokenizer only
        with service.client() as client:
            # Listed for jobs once a worker host holds it.
            assert "tiny-chat" not in {m["id"] for m in client.get("/v1/models").json()["data"]}
            # Token statistics at upload come from the tokenizer files kept in the database.
            upload = client.post("/v1/files", params={"model": "tiny-chat"},
                                 files={"file": ("t.jsonl", jsonl(chat_lines(16)))}, data={"purpose": "fine-tune"})
            assert upload.status_code == 200, upload.text
            report = client.get(f"/v1/files/{upload.json()['id']}/validation_report").json()["report"]
            tokens = report["tokens"]["tiny-chat"]
            assert tokens["method"] == "chat_template" and tokens["total_tokens"] > 0
        first_id = create_job(service, upload.json()["id"])
        # The job waits queued (not running) while its worker host downloads the model, and says so.
        seen = watch_download(service, admin_key, first_id)
        assert ("queued", "downloading") in seen and not any(job == "running" and model != "ready"
                                                             for job, model in seen), seen
        first = run_job(service, upload.json()["id"], first_id)
        with service.client() as client:
            messages = [e["message"] for e in all_events(client, first["id"])][::-1]  # oldest first
            waiting = next(i for i, m in enumerate(messages) if m.startswith("Waiting in the queue while worker"))
            downloading = next(i for i, m in enumerate(messages) if m.startswith(f"Downloading {REPO}@{V1[:10]}: "))
            started = next(i for i, m in enumerate(messages) if "ttempt 1" in m)
            assert waiting < downloading < started, messages
            assert hub.downloads(REPO, WEIGHTS) == 1
            listed = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
            assert listed["tiny-chat"]["commit_sha"] == V1 and listed["tiny-chat"]["details"]["license"] == "mit"
            detail = client.get("/v1/admin/models/tiny-chat", headers={"Authorization": f"Bearer {admin_key}"})
            assert detail.json()["status"] == "ready" and len(detail.json()["hosts"]) == 1, detail.text
            config = client.get(f"/v1/fine_tuning/jobs/{first['id']}/artifacts/config").json()
            assert config["base_model"] == {"name": "tiny-chat", "source": f"hf:{REPO}", "commit_sha": V1}
            adapter = client.get(f"/v1/fine_tuning/jobs/{first['id']}/artifacts/adapter").content
            with tarfile.open(fileobj=io.BytesIO(adapter)) as tar:
                names = tar.getnames()
            assert any(n.endswith("adapter_model.safetensors") for n in names)
        second = run_job(service, upload.json()["id"])
        with service.client() as client:
            assert not any(e["message"].startswith("Downloading") for e in all_events(client, second["id"]))
        assert hub.downloads(REPO, WEIGHTS) == 1  # the same host's cache
        # A worker on another host (its own data dir) fetches its own copy when asked to pull.
        service.start_worker("other-host", own_data_dir=True)
        deadline = time.monotonic() + 60
        pulled = ""
        while time.monotonic() < deadline and hub.downloads(REPO, WEIGHTS) < 2:
            if "other-host" not in pulled:
                pulled = cli(service, admin_key, "models", "pull", "tiny-chat", "--worker", "other-host") \
                    if _live(service, admin_key, "other-host") else ""
            time.sleep(1)
        assert hub.downloads(REPO, WEIGHTS) == 2, pulled
        cached = tmp_path / "host-other-host" / "models" / "test-org--tiny-chat" / V1
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (cached / ".tuneforge-complete").is_file():
            time.sleep(0.5)
        assert (cached / WEIGHTS).read_bytes() == (tiny_model_dir / WEIGHTS).read_bytes()
        # A model a job still uses cannot be removed; a finished one's can.
        removed = cli(service, admin_key, "models", "rm", "tiny-chat")
        assert "removed tiny-chat" in removed


def _live(service: Service, key: str, worker: str) -> bool:
    import httpx

    answer = httpx.get(f"{service.base_url}/v1/admin/workers/{worker}", headers={"Authorization": f"Bearer {key}"})
    return answer.status_code == 200 and answer.json()["live"]
