"""Redis and Postgres restarts: every job still ends in a terminal state, nothing is lost."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.faults.test_faults import TERMINAL, assert_invariants, long_job, metric_steps, wait_for_step
from tests.integration.conftest import Service, wait_for_status

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REDIS_START = ["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "--port", "6379", "--save", "",
               "--appendonly", "no"]


def redis_up() -> bool:
    return subprocess.run(["redis-cli", "-h", "127.0.0.1", "ping"], capture_output=True).returncode == 0


def stop_redis() -> None:
    subprocess.run(["redis-cli", "-h", "127.0.0.1", "shutdown", "nosave"], capture_output=True)
    deadline = time.monotonic() + 10
    while redis_up() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not redis_up()


def start_redis() -> None:
    if not redis_up():
        subprocess.run(REDIS_START, check=True, capture_output=True)
    deadline = time.monotonic() + 10
    while not redis_up() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert redis_up()


def restart_postgres() -> None:
    version = sorted(p.name for p in Path("/etc/postgresql").iterdir())[-1]
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"], check=True,
                   capture_output=True)
    deadline = time.monotonic() + 30
    while subprocess.run(["pg_isready", "-h", "127.0.0.1", "-q"]).returncode != 0 and time.monotonic() < deadline:
        time.sleep(0.3)


def test_job_created_while_redis_is_down_runs_once_redis_is_back(service: Service) -> None:
    with service.client() as client:
        file_id = client.post("/v1/files", files={"file": ("t.jsonl", b"".join(
            f'{{"prompt": "code {i}", "completion": "c{i % 3}"}}\n'.encode() for i in range(12)))},
                              data={"purpose": "fine-tune"}).json()["id"]
        stop_redis()
        try:
            response = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_id,
                                                                  "hyperparameters": {"n_epochs": 1}})
            assert response.status_code == 200, response.text
            job = response.json()
            time.sleep(3)
            assert client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"] == "validating_files"
        finally:
            start_redis()
        final = wait_for_status(client, job["id"], TERMINAL, timeout=180)
        assert final["status"] == "succeeded", final
        assert final["attempt"] == 1
    assert_invariants(service)


def test_redis_restart_mid_run_does_not_disturb_training(service: Service) -> None:
    with service.client() as client:
        job = long_job(client, n_epochs=6)
        wait_for_step(client, job["id"], 5)
        stop_redis()
        time.sleep(2)
        start_redis()
        final = wait_for_status(client, job["id"], TERMINAL)
        assert final["status"] == "succeeded", final
        assert set(metric_steps(client, job["id"])) == set(range(1, 121))
    assert_invariants(service)


def test_postgres_restart_mid_run_ends_in_a_terminal_state(service: Service) -> None:
    with service.client() as client:
        job = long_job(client, n_epochs=6)
        wait_for_step(client, job["id"], 5)
    restart_postgres()
    with service.client() as client:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if client.get("/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        final = wait_for_status(client, job["id"], TERMINAL)
        assert final["status"] == "succeeded", final
        assert max(metric_steps(client, job["id"])) == 120
    assert_invariants(service)
