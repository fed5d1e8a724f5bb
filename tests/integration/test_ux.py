"""The user's tools against the real service: SSE stream, CLI client, JSON logs, webhooks."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from app.cli import app as cli
from tests.api.test_webhooks import Receiver, serve_receiver
from tests.integration.conftest import Service, wait_for_status
from tests.support.data import chat_lines, jsonl
from tests.support.service import TERMINAL, wait_for_step

pytestmark = pytest.mark.integration


def run_cli(service: Service, *args: str) -> Any:
    result = CliRunner().invoke(cli, list(args), env={"TUNEFORGE_URL": service.base_url,
                                                      "TUNEFORGE_API_KEY": service.api_key, "COLUMNS": "200"})
    return result


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with serve_receiver() as state:
        yield state


def sse(client: httpx.Client, job_id: str, last_event_id: str | None = None) -> list[dict[str, Any]]:
    from app.cli_client import sse_frames

    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    with client.stream("GET", f"/v1/fine_tuning/jobs/{job_id}/events/stream", headers=headers) as response:
        assert response.status_code == 200
        return [{**f, "data": json.loads(f["data"])} for f in sse_frames(response.iter_lines())]


def test_cli_runs_a_job_from_upload_to_verified_resumable_download(service: Service, tmp_path: Path) -> None:
    dataset = tmp_path / "train.jsonl"
    dataset.write_bytes(jsonl(chat_lines(12)))
    uploaded = run_cli(service, "files", "upload", str(dataset))
    assert uploaded.exit_code == 0, uploaded.output
    file_id = re.search(r"file-[0-9a-f]+", uploaded.output).group(0)  # type: ignore[union-attr]
    assert "processed" in uploaded.output
    # A small file goes in one read, where a bar measuring between reads would say "0 bytes/s".
    assert "0 bytes/s" not in uploaded.output and re.search(r" [1-9][\d.]* [kMG]?B/s ", uploaded.output), \
        uploaded.output
    assert file_id in run_cli(service, "files", "list").output

    spec = tmp_path / "job.yaml"
    spec.write_text(f"model: tiny-llama\ntraining_file: {file_id}\nsuffix: from-spec\n"
                    "method:\n  type: supervised\n  supervised:\n    hyperparameters: {batch_size: 4}\n"
                    "    adapter: {type: lora, r: 4, alpha: 8}\n")
    created = run_cli(service, "jobs", "create", "--spec", str(spec), "--n-epochs", "2", "--learning-rate", "2e-3",
                      "--suffix", "cli")
    assert created.exit_code == 0, created.output
    job_id = re.search(r"ftjob-[0-9a-f]+", created.output).group(0)  # type: ignore[union-attr]

    watched = run_cli(service, "jobs", "watch", job_id)
    assert watched.exit_code == 0, watched.output
    assert f"{job_id} succeeded" in watched.output and "ft:tiny-llama:integration:cli:" in watched.output
    assert "Files validated" in watched.output  # message events are printed as they arrive

    with service.client() as client:
        job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        assert job["suffix"] == "cli" and job["hyperparameters"]["n_epochs"] == 2
        assert job["method"]["supervised"]["adapter"]["r"] == 4
        # The stream replays every event oldest first and ends on the terminal status.
        frames = sse(client, job_id)
        events = [f["data"] for f in frames if f["event"] == "event"]
        listed = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()["data"]
        assert [e["id"] for e in events] == [e["id"] for e in reversed(listed)]
        assert frames[-1]["event"] == "status" and frames[-1]["data"]["status"] == "succeeded"
        assert frames[-1]["data"]["progress"] == {"step": 6, "total_steps": 6}
        resumed = sse(client, job_id, last_event_id=events[2]["id"])
        assert [f["data"]["id"] for f in resumed if f["event"] == "event"] == [e["id"] for e in events[3:]]
        artifacts = {a["name"]: a for a in client.get(f"/v1/fine_tuning/jobs/{job_id}/artifacts").json()["data"]}

    assert job_id in run_cli(service, "jobs", "list").output
    assert '"status": "succeeded"' in run_cli(service, "jobs", "get", job_id).output
    assert job["fine_tuned_model"] in run_cli(service, "models", "list").output

    target = tmp_path / "adapter.tar"
    downloaded = run_cli(service, "jobs", "download", job_id, "-o", str(target))
    assert downloaded.exit_code == 0, downloaded.output and "verified" in downloaded.output
    whole = target.read_bytes()
    assert hashlib.sha256(whole).hexdigest() == artifacts["adapter"]["sha256"]

    target.write_bytes(whole[: len(whole) // 2])  # an interrupted download resumes where it stopped
    resumed_download = run_cli(service, "jobs", "download", job_id, "-o", str(target))
    assert resumed_download.exit_code == 0 and "verified" in resumed_download.output
    assert target.read_bytes() == whole
    # Proof that only the missing tail was fetched: a corrupted prefix is kept, and the sha256 check catches it.
    target.write_bytes(b"X" + whole[1: len(whole) // 2])
    corrupt = run_cli(service, "jobs", "download", job_id, "-o", str(target))
    assert corrupt.exit_code == 1 and "sha256 mismatch" in corrupt.output

    refused = run_cli(service, "jobs", "cancel", job_id)
    assert refused.exit_code == 1 and "cannot be cancelled" in refused.output


def test_cli_pauses_resumes_and_cancels_a_job_and_watch_reports_it(service: Service, tmp_path: Path) -> None:
    with service.client() as client:
        file_id = client.post("/v1/files", files={"file": ("t.jsonl", jsonl(chat_lines(48)))},
                              data={"purpose": "fine-tune"}).json()["id"]
    # 960 steps of a few tens of ms: the pause lands long before the end.
    created = run_cli(service, "jobs", "create", "--model", "tiny-llama", "--training-file", file_id,
                      "--n-epochs", "20", "--batch-size", "1")
    job_id = re.search(r"ftjob-[0-9a-f]+", created.output).group(0)  # type: ignore[union-attr]
    try:
        with service.client() as client:
            # A job paused before it ever ran resumes into validating_files; one paused while it runs is queued to
            # continue from its checkpoint, which is what this follows.
            wait_for_step(client, job_id, 2)
        paused = run_cli(service, "jobs", "pause", job_id)
        assert paused.exit_code == 0 and job_id in paused.output, paused.output
        with service.client() as client:
            wait_for_status(client, job_id, {"paused"}, timeout=120)
        resumed = run_cli(service, "jobs", "resume", job_id)
        assert resumed.exit_code == 0 and "queued" in resumed.output, resumed.output
        cancelled = run_cli(service, "jobs", "cancel", job_id)
        assert cancelled.exit_code == 0 and "cancelled" in cancelled.output
    finally:  # a job left training would send its events into the next tests' webhooks
        with service.client() as client:
            client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    watched = run_cli(service, "jobs", "watch", job_id)
    assert watched.exit_code == 1 and f"{job_id} cancelled" in watched.output
    missing = run_cli(service, "jobs", "get", "ftjob-nope")
    assert missing.exit_code == 1 and "404" in missing.output


def test_training_process_logs_json_lines_with_job_id_and_attempt(service: Service) -> None:
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from tests.factories import create_job, create_project

    engine = create_engine(service.env["TUNEFORGE_DATABASE_URL"])
    with Session(engine, expire_on_commit=False) as session:
        # Running, attempt 1, on a base model the operator removed: the attempt fails fast and says why.
        job = create_job(session, project=create_project(session, "logs"), status="running", attempt=1,
                         base_model="removed-model")
    engine.dispose()
    env = {**service.env, "TUNEFORGE_LOG_FORMAT": "json"}
    done = subprocess.run([sys.executable, "-m", "worker.attempt", job.id, "1"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert lines and all(line["job_id"] == job.id and line["attempt"] == 1 for line in lines)
    assert any(line["level"] == "ERROR" and "is no longer registered" in line.get("message", "")
               for line in lines)


def test_an_attempt_on_a_base_registered_again_since_the_job_was_created_fails_saying_so(service: Service) -> None:
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from app.models import FineTuningJob
    from tests.factories import create_job, create_project

    with service.client() as client:  # registered from the catalogue on first use
        assert client.get("/v1/models/tiny-llama").status_code == 200
    engine = create_engine(service.env["TUNEFORGE_DATABASE_URL"])
    with Session(engine, expire_on_commit=False) as session:
        job = create_job(session, project=create_project(session, "registered-again"), status="running", attempt=1,
                         base_model="tiny-llama", base_revision="path:/models/before@")
    done = subprocess.run([sys.executable, "-m", "worker.attempt", job.id, "1"], env=service.env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    with Session(engine) as session:
        failed = session.get(FineTuningJob, job.pk)
        assert failed is not None and failed.status == "failed" and failed.error is not None
        assert failed.error["code"] == "invalid_training"
        assert failed.error["message"].startswith("base model 'tiny-llama' was registered again after the job was "
                                                  "created (it was path:/models/before@, it is path:")
    engine.dispose()


def test_webhooks_reach_a_local_receiver_signed_for_succeeded_and_cancelled_jobs(service: Service,
                                                                                  receiver: Receiver) -> None:
    import openai

    sdk = openai.OpenAI(api_key="unused", base_url="http://127.0.0.1:9")
    with service.client() as client:
        endpoint = client.post("/v1/webhooks", json={"url": receiver.url}).json()
        try:
            file_id = client.post("/v1/files", files={"file": ("w.jsonl", jsonl(chat_lines(12)))},
                                  data={"purpose": "fine-tune"}).json()["id"]
            ok = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_id,
                                                           "hyperparameters": {"n_epochs": 1, "batch_size": 4}}).json()
            doomed = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_id,
                                                               "hyperparameters": {"n_epochs": 20}}).json()
            assert client.post(f"/v1/fine_tuning/jobs/{doomed['id']}/cancel").json()["status"] == "cancelled"
            assert wait_for_status(client, ok["id"], {"succeeded", "failed"})["status"] == "succeeded"
            deadline = time.monotonic() + 30  # the workers' reaper sends every 2 s here
            while len(receiver.received) < 2 and time.monotonic() < deadline:
                time.sleep(0.2)
            events = {}
            for headers, body in receiver.received:
                sdk.webhooks.verify_signature(body, headers, secret=endpoint["secret"])
                event = json.loads(body)
                events[event["type"]] = event["data"]["id"]
            assert events == {"fine_tuning.job.succeeded": ok["id"], "fine_tuning.job.cancelled": doomed["id"]}
            deliveries = client.get(f"/v1/webhooks/{endpoint['id']}/deliveries").json()["data"]
            assert sorted((d["event_type"], d["status"], d["attempts"]) for d in deliveries) == [
                ("fine_tuning.job.cancelled", "succeeded", 1), ("fine_tuning.job.succeeded", "succeeded", 1)]
        finally:
            client.delete(f"/v1/webhooks/{endpoint['id']}")


def test_cli_upload_of_a_file_that_fails_validation_exits_non_zero(service: Service, tmp_path: Path) -> None:
    dataset = tmp_path / "bad.jsonl"
    dataset.write_text("".join(json.dumps({"colour": "red"}) + "\n" for _ in range(12)))  # JSON, not examples
    uploaded = run_cli(service, "files", "upload", str(dataset))
    assert uploaded.exit_code == 1, uploaded.output
    assert "error" in uploaded.output and "validation_report" in uploaded.output


def test_cli_download_defaults_to_the_jobs_weights_for_a_full_fine_tune(service: Service, tmp_path: Path) -> None:
    with service.client() as client:
        file_id = client.post("/v1/files", files={"file": ("t.jsonl", jsonl(chat_lines(12)))},
                              data={"purpose": "fine-tune"}).json()["id"]
        job = client.post("/v1/fine_tuning/jobs", json={
            "model": "tiny-llama", "training_file": file_id,
            "method": {"supervised": {"adapter": {"type": "full"}, "hyperparameters": {"n_epochs": 1}}}}).json()
        assert wait_for_status(client, job["id"], TERMINAL)["status"] == "succeeded"
        names = {a["name"] for a in client.get(f"/v1/fine_tuning/jobs/{job['id']}/artifacts").json()["data"]}
    assert "model" in names and "adapter" not in names
    downloaded = run_cli(service, "jobs", "download", job["id"], "-o", str(tmp_path / "model.tar"))
    assert downloaded.exit_code == 0 and "verified" in downloaded.output, downloaded.output
