"""Fault injection on real processes: kill, stop, terminate, cancel, pause; then check invariants."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any

import httpx
import psutil
import pytest
from sqlalchemy import create_engine, text

from tests.integration.conftest import Service, all_events, wait_for_status
from tests.support.data import chat_lines, jsonl
from tests.support.service import (
    TERMINAL,
    is_warm_start_process,
    training_processes,
    wait_for_step,
    worker_of_attempt,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.faults]


def long_job(client: httpx.Client, *, n_epochs: int = 12, save_steps: int = 10,
             hyperparameters_extra: dict[str, Any] | None = None, **extra: Any) -> dict:
    """A job of a few hundred short steps on the tiny model, checkpointing every save_steps."""
    file_id = client.post("/v1/files", files={"file": ("t.jsonl", jsonl(chat_lines(40)))},
                          data={"purpose": "fine-tune"}).json()["id"]
    response = client.post("/v1/fine_tuning/jobs", json={
        "model": "tiny-llama", "training_file": file_id, "seed": 1, **extra,
        "method": {"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": n_epochs, "batch_size": 2, "save_steps": save_steps, "learning_rate": 1e-3,
            **(hyperparameters_extra or {})}}}})
    assert response.status_code == 200, response.text
    return response.json()


def metric_steps(client: httpx.Client, job_id: str) -> list[int]:
    return sorted(e["data"]["step"] for e in all_events(client, job_id) if e["type"] == "metrics")


def assert_invariants(service: Service) -> None:
    """RELIABILITY.md invariants, read straight from the database."""
    engine = create_engine(service.env["TUNEFORGE_DATABASE_URL"])
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT id, status, lease_expires_at, extract(epoch from now()) AS now "
                                 "FROM fine_tuning_jobs")).all()
        for row in rows:
            assert row.status in TERMINAL | {"paused"} or (
                row.status in ("queued", "validating_files")) or (
                row.status == "running" and row.lease_expires_at is not None), row
        # Every registered checkpoint has stored bytes of the recorded size.
        bad = conn.execute(text("SELECT c.id FROM job_checkpoints c LEFT JOIN blobs b ON b.key = c.blob_key "
                                "WHERE b.key IS NULL OR b.bytes <> c.bytes OR b.sha256 <> c.sha256")).all()
        assert not bad
        keys = conn.execute(text("SELECT idempotency_key, count(*) FROM fine_tuning_jobs WHERE idempotency_key "
                                 "IS NOT NULL GROUP BY project_pk, idempotency_key HAVING count(*) > 1")).all()
        assert not keys
        # Nothing of the server's inside reaches a client: no path under the service's root in any event or error.
        leaked = conn.execute(text("SELECT e.message, e.data::text FROM job_events e WHERE e.message LIKE :root "
                                   "OR e.data::text LIKE :root UNION ALL SELECT j.id, j.error::text FROM "
                                   "fine_tuning_jobs j WHERE j.error::text LIKE :root"),
                              {"root": f"%{service.root}%"}).all()
        assert not leaked, leaked
    engine.dispose()


def test_cancel_running_job_stops_training_within_ten_seconds(service: Service) -> None:
    with service.client() as client:
        job = long_job(client, n_epochs=30)
        wait_for_step(client, job["id"], 3)
        assert training_processes(job["id"])
        started = time.monotonic()
        cancelled = client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").json()
        assert cancelled["status"] == "cancelled"
        while training_processes(job["id"]) and time.monotonic() - started < 10:
            time.sleep(0.2)
        assert not training_processes(job["id"]), "training process still alive 10 s after cancel"
        time.sleep(1)
        final = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
        assert final["status"] == "cancelled" and final["fine_tuned_model"] is None
    assert_invariants(service)


def test_killed_training_process_resumes_from_its_checkpoint(service: Service) -> None:
    with service.client() as client:
        job = long_job(client)
        killed_step = wait_for_step(client, job["id"], 14)["progress"]["step"]  # past the checkpoint at 10
        for process in training_processes(job["id"]):
            process.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        while True:  # until the second attempt reports its first step
            current = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
            if current["attempt"] >= 2 and current["progress"]["step"] != killed_step or current["status"] in TERMINAL:
                break
            time.sleep(0.2)
        sys.stderr.write(f"SIGKILL at step {killed_step}: training resumed {time.monotonic() - killed_at:.1f}s later "
                         "from the last registered checkpoint\n")
        final = wait_for_status(client, job["id"], TERMINAL)
        assert final["status"] == "succeeded", final
        assert final["attempt"] == 2
        assert final["progress"]["step"] == final["progress"]["total_steps"] == 240
        steps = metric_steps(client, job["id"])
        # The second attempt restarts from the latest registered checkpoint (every 10 steps; step k's metrics come
        # before step k's checkpoint, so the one before killed_step at least), and nothing up to it is redone.
        # (Killed right after a checkpoint, nothing at all is redone.)
        events = all_events(client, job["id"])
        resumed = [e["data"]["step"] for e in events if e["message"].startswith("resumed from checkpoint at step")]
        assert len(resumed) == 1 and resumed[0] % 10 == 0 and resumed[0] >= (killed_step - 1) // 10 * 10, resumed
        # The steps the first attempt trained past the checkpoint are trained again: their first metrics are
        # superseded (not listed), so the job has one loss curve, one metrics event a step, each from the attempt
        # whose weights it ended with.
        assert steps == list(range(1, 241))
        redone = [e["data"] for e in events if e["message"].startswith(f"Steps after {resumed[0]} are trained again")]
        if killed_step > resumed[0]:  # at least the steps it had reported when it was killed
            assert len(redone) == 1 and redone[0]["superseded_metrics"] >= killed_step - resumed[0], redone
            assert redone[0]["reached"]["1"] >= killed_step, redone
        assert all(e["data"]["attempt"] == (1 if e["data"]["step"] <= resumed[0] else 2) for e in events
                   if e["type"] == "metrics")
    assert_invariants(service)


def owner_of(client: httpx.Client, service: Service, job_id: str, attempt: int) -> Any:
    """The worker process (Popen) running the given attempt of a job."""
    started = next(e for e in all_events(client, job_id) if e["message"].startswith(f"Attempt {attempt} started"))
    return next(w for w in service.workers if w.poll() is None and _worker_name(w) == started["data"]["worker"])


def ensure_workers(service: Service, count: int) -> None:
    while len([w for w in service.workers if w.poll() is None]) < count:
        service.start_worker(f"worker-{len(service.workers) + 1}")


def test_killed_worker_is_replaced_by_another_worker(service: Service) -> None:
    ensure_workers(service, 2)
    with service.client() as client:
        job = long_job(client)
        wait_for_step(client, job["id"], 12)
        victim = owner_of(client, service, job["id"], attempt=1)
        os.killpg(victim.pid, signal.SIGKILL)  # the worker and its training child, like an OOM kill of the pod
        victim.wait()
        final = wait_for_status(client, job["id"], TERMINAL)
        assert final["status"] == "succeeded", final
        assert final["attempt"] == 2 and final["progress"]["step"] == 240
        assert metric_steps(client, job["id"]) == list(range(1, 241))  # one a step: redone ones superseded
    assert_invariants(service)


@pytest.mark.parametrize("whom", ["worker", "process group"])
def test_terminated_worker_checkpoints_and_hands_the_job_to_another(service: Service, whom: str) -> None:
    """SIGTERM to the worker alone (its supervisor asks the training process to release) or to its whole process
    group, as `systemctl stop` and container runtimes send it (the training process hears it first)."""
    ensure_workers(service, 2)
    with service.client() as client:
        job = long_job(client, save_steps=1000)  # only the shutdown itself checkpoints mid-run
        wait_for_step(client, job["id"], 25)
        victim = owner_of(client, service, job["id"], attempt=1)
        if whom == "worker":
            victim.send_signal(signal.SIGTERM)
        else:
            os.killpg(victim.pid, signal.SIGTERM)
        assert victim.wait(timeout=60) == 0
        final = wait_for_status(client, job["id"], TERMINAL)
        assert final["status"] == "succeeded" and final["attempt"] == 2 and final["crashes"] == 0, final
        steps = metric_steps(client, job["id"])
        assert set(steps) == set(range(1, 241)) and len(steps) == 240  # nothing lost, nothing redone
        assert any("shutting down" in e["message"] for e in all_events(client, job["id"]))
    assert_invariants(service)


def _worker_name(process: Any) -> str:
    return str(psutil.Process(process.pid).environ().get("TUNEFORGE_WORKER_NAME", ""))


def test_stopped_worker_past_its_lease_loses_the_job_and_its_writes_are_rejected(service: Service) -> None:
    ensure_workers(service, 2)
    with service.client() as client:
        job = long_job(client, n_epochs=20)
        wait_for_step(client, job["id"], 5)
        first = training_processes(job["id"])
        assert first
        parent = first[0].parent()  # the worker, or the warm-start process the worker forks attempts from
        frozen = [worker_of_attempt(first[0]), parent, *first] if is_warm_start_process(parent) else [parent, *first]
        for process in frozen:
            process.send_signal(signal.SIGSTOP)
        try:
            # Lease is 8 s; the reaper runs every 2 s in the other worker. The stopped worker's consumer may still
            # hold a pending broker read, which Redis can hand the requeued job's message to; the reaper sends a job
            # still waiting max(lease, 60 s) after its dispatch again (app/services/attempts.py), so the other
            # worker takes it over within about 75 s either way (a CI run that gave up at 60 s most likely lost it so).
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                current = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
                if current["attempt"] >= 2 and current["status"] == "running":
                    break
                time.sleep(0.5)
            assert current["attempt"] >= 2, current
        finally:
            for process in frozen:
                process.send_signal(signal.SIGCONT)
        # The stale attempt wakes up, its writes are refused, and it stops.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                                                  for p in first):
            time.sleep(0.5)
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in first)
        final = wait_for_status(client, job["id"], TERMINAL)
        assert final["status"] == "succeeded", final
        steps = metric_steps(client, job["id"])
        assert steps == list(range(1, final["progress"]["total_steps"] + 1))
    assert_invariants(service)


def test_pause_checkpoints_and_resume_continues_to_the_same_end(service: Service) -> None:
    with service.client() as client:
        job = long_job(client, n_epochs=10)
        wait_for_step(client, job["id"], 4)
        client.post(f"/v1/fine_tuning/jobs/{job['id']}/pause")
        paused = wait_for_status(client, job["id"], {"paused"} | TERMINAL, timeout=60)
        assert paused["status"] == "paused", paused
        deadline = time.monotonic() + 10  # the attempt records `paused`, then its process exits
        while training_processes(job["id"]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not training_processes(job["id"])
        checkpoints = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]
        assert checkpoints and checkpoints[0]["step_number"] == paused["progress"]["step"]
        resumed = client.post(f"/v1/fine_tuning/jobs/{job['id']}/resume").json()
        assert resumed["status"] == "queued"
        final = wait_for_status(client, job["id"], TERMINAL)
        assert final["status"] == "succeeded" and final["progress"]["step"] == 200
        assert set(metric_steps(client, job["id"])) == set(range(1, 201))
        # Retention: of the 20 checkpoints taken, a finished job keeps the latest 3 (no validation set).
        kept = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints", params={"limit": 50}).json()["data"]
        assert [c["step_number"] for c in kept] == [200, 190, 180]
    assert_invariants(service)


def test_a_load_best_at_end_job_paused_after_its_best_step_ends_on_that_step(service: Service) -> None:
    """A resumed attempt starts in a fresh directory with the latest checkpoint: the best one, which the final
    weights come from, must be kept by retention and fetched too."""
    with service.client() as client:
        validation = client.post("/v1/files", files={"file": ("v.jsonl", jsonl(chat_lines(12, offset=100)))},
                                 data={"purpose": "fine-tune"}).json()["id"]
        # An improvement must beat the best by 10 nats: the first evaluation (step 2) stays the best.
        job = long_job(client, n_epochs=6, validation_file=validation, hyperparameters_extra={
            "eval_steps": 2, "load_best_at_end": True, "early_stopping_threshold": 10.0,
            "early_stopping_patience": 500})
        wait_for_step(client, job["id"], 12)
        client.post(f"/v1/fine_tuning/jobs/{job['id']}/pause")
        paused = wait_for_status(client, job["id"], {"paused"} | TERMINAL, timeout=60)
        assert paused["status"] == "paused", paused
        assert client.post(f"/v1/fine_tuning/jobs/{job['id']}/resume").json()["status"] == "queued"
        final = wait_for_status(client, job["id"], TERMINAL)
        assert final["status"] == "succeeded", final
        loaded = [e for e in all_events(client, job["id"]) if e["message"].startswith("loaded the best checkpoint")]
        assert [e["data"]["step"] for e in loaded] == [2]
    assert_invariants(service)


def test_a_job_paused_and_resumed_three_times_succeeds(service: Service) -> None:
    """Pauses and resumes are claims, not crashes: more of them than max_attempts (3) must not fail the job."""
    with service.client() as client:
        job = long_job(client, n_epochs=10)
        for pause in range(3):
            wait_for_step(client, job["id"], 4 + 10 * pause)
            client.post(f"/v1/fine_tuning/jobs/{job['id']}/pause")
            paused = wait_for_status(client, job["id"], {"paused"} | TERMINAL, timeout=60)
            assert paused["status"] == "paused", paused
            assert client.post(f"/v1/fine_tuning/jobs/{job['id']}/resume").json()["status"] == "queued"
        final = wait_for_status(client, job["id"], TERMINAL)
        assert final["status"] == "succeeded" and final["attempt"] == 4 and final["crashes"] == 0, final
        assert set(metric_steps(client, job["id"])) == set(range(1, 201))
    assert_invariants(service)


def test_concurrent_retried_posts_with_one_idempotency_key_create_one_job(service: Service) -> None:
    with service.client() as client:
        file_id = client.post("/v1/files", files={"file": ("t.jsonl", jsonl(chat_lines(12)))},
                              data={"purpose": "fine-tune"}).json()["id"]
    body = {"model": "tiny-llama", "training_file": file_id, "hyperparameters": {"n_epochs": 1}}
    ids: list[str] = []

    def post() -> None:
        with service.client() as client:
            response = client.post("/v1/fine_tuning/jobs", json=body, headers={"Idempotency-Key": "same-key"})
            assert response.status_code == 200, response.text
            ids.append(response.json()["id"])

    threads = [threading.Thread(target=post) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(ids) == 8 and len(set(ids)) == 1
    with service.client() as client:
        assert wait_for_status(client, ids[0], TERMINAL)["status"] == "succeeded"
    assert_invariants(service)


def test_a_job_message_delivered_twice_starts_one_attempt(service: Service) -> None:
    from celery import Celery

    with service.client() as client:
        file_id = client.post("/v1/files", files={"file": ("t.jsonl", jsonl(chat_lines(12)))},
                              data={"purpose": "fine-tune"}).json()["id"]
        job = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_id,
                                                        "hyperparameters": {"n_epochs": 2}}).json()
        # The same task message again, as a broker redelivery or a second reaper would send it.
        broker = Celery(broker=service.env["TUNEFORGE_BROKER_URL"])
        for _ in range(2):
            broker.send_task("tuneforge.run_job", args=[job["id"]], queue=service.env["TUNEFORGE_TRAINING_QUEUE"])
        final = wait_for_status(client, job["id"], TERMINAL)
        assert final["status"] == "succeeded" and final["attempt"] == 1, final
        time.sleep(3)  # let the duplicates be consumed
        starts = [e for e in all_events(client, job["id"]) if " started on " in e["message"]]
        assert len(starts) == 1
        assert client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["attempt"] == 1
    assert_invariants(service)


def _final_weights(client: httpx.Client, job: dict) -> dict[str, Any]:
    import io
    import tarfile

    from safetensors.torch import load

    from app.services.artifacts import weights_artifact

    name = weights_artifact(job["method"]["dpo"]["adapter"]["type"])
    archive = client.get(f"/v1/fine_tuning/jobs/{job['id']}/artifacts/{name}").content
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".safetensors"))
        file = tar.extractfile(member)
        assert file is not None
        return dict(load(file.read()))


def test_a_killed_dpo_job_resumes_to_the_same_weights_as_an_uninterrupted_one(service: Service) -> None:
    import torch

    from tests.worker.training.factories import preference_records

    with service.client() as client:
        file_id = client.post("/v1/files", files={"file": ("p.jsonl", jsonl(preference_records(20, seed=1)))},
                              data={"purpose": "fine-tune"}).json()["id"]
        body = {"model": "tiny-llama", "training_file": file_id, "seed": 3, "method": {"type": "dpo", "dpo": {
            "adapter": {"type": "full"},
            "hyperparameters": {"n_epochs": 8, "batch_size": 2, "save_steps": 10, "learning_rate": 1e-4,
                                "beta": 0.5}}}}
        whole = client.post("/v1/fine_tuning/jobs", json=body).json()
        whole = wait_for_status(client, whole["id"], TERMINAL)
        assert whole["status"] == "succeeded", whole
        job = client.post("/v1/fine_tuning/jobs", json=body).json()
        killed_step = wait_for_step(client, job["id"], 14)["progress"]["step"]  # past the checkpoint at 10
        for process in training_processes(job["id"]):
            process.send_signal(signal.SIGKILL)
        final = wait_for_status(client, job["id"], TERMINAL)
        assert final["status"] == "succeeded", final
        assert final["attempt"] == 2 and killed_step < final["progress"]["total_steps"] == 80
        messages = [e["message"] for e in all_events(client, job["id"])]
        # The resumed attempt scored nothing again: its reference came with the checkpoint.
        assert sum("reference log-probabilities" in m for m in messages) == 1, messages
        assert any(m.startswith("resumed from checkpoint at step") for m in messages)
        ours, theirs = _final_weights(client, final), _final_weights(client, whole)
        assert sorted(ours) == sorted(theirs)
        assert all(torch.allclose(ours[k], theirs[k], atol=1e-5) for k in ours)
    assert_invariants(service)
