"""Redis and Postgres restarts, on private servers this test starts and restarts (never the shared ones): every
job still ends in a terminal state, nothing is lost, and the API answers 503 while the database is away."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text

from tests.faults.test_faults import assert_invariants, long_job, metric_steps
from tests.support.data import chat_lines, jsonl
from tests.support.servers import PrivatePostgres, PrivateRedis
from tests.support.service import TERMINAL, Service, running_service, wait_for_status, wait_for_step

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.faults]


@dataclass
class Servers:
    service: Service
    postgres: PrivatePostgres
    redis: PrivateRedis


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Servers]:
    postgres, redis = PrivatePostgres(), PrivateRedis()
    postgres.start()
    redis.start()
    try:
        root = tmp_path_factory.mktemp("restarts")
        with running_service(root, tiny_model_dir=tiny_model_dir, name=f"restarts_{os.getpid()}",
                             pg_server=postgres.url, redis_url=redis.url, workers=2) as service:
            yield Servers(service, postgres, redis)
    finally:
        redis.close()
        postgres.close()


def get_job(client: httpx.Client, job_id: str, timeout: float = 60) -> dict:
    """The job, waiting out 503s while the database comes back."""
    deadline = time.monotonic() + timeout
    while True:
        response = client.get(f"/v1/fine_tuning/jobs/{job_id}")
        if response.status_code == 200 or time.monotonic() > deadline:
            assert response.status_code == 200, response.text
            return dict(response.json())
        time.sleep(0.5)


def test_job_created_while_redis_is_down_runs_once_redis_is_back(servers: Servers) -> None:
    with servers.service.client() as client:
        file_id = client.post("/v1/files", files={"file": ("t.jsonl", jsonl(chat_lines(12)))},
                              data={"purpose": "fine-tune"}).json()["id"]
        servers.redis.stop()
        try:
            response = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_id,
                                                                  "hyperparameters": {"n_epochs": 1}})
            assert response.status_code == 200, response.text
            job = response.json()
            time.sleep(3)
            waiting = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
            assert waiting["status"] == "queued" and waiting["attempt"] == 0
        finally:
            servers.redis.start()
        final = wait_for_status(client, job["id"], TERMINAL, timeout=180)
        assert final["status"] == "succeeded", final
        assert final["attempt"] == 1
    assert_invariants(servers.service)


def test_redis_restart_mid_run_does_not_disturb_training(servers: Servers) -> None:
    with servers.service.client() as client:
        job = long_job(client, n_epochs=6)
        wait_for_step(client, job["id"], 5)
        servers.redis.restart(down_seconds=2)
        final = wait_for_status(client, job["id"], TERMINAL)
        assert final["status"] == "succeeded", final
        assert set(metric_steps(client, job["id"])) == set(range(1, 121))
    assert_invariants(servers.service)


def test_api_answers_503_while_postgres_is_down_and_jobs_finish_after_its_restart(servers: Servers) -> None:
    with servers.service.client() as client:
        job = long_job(client, n_epochs=6)
        wait_for_step(client, job["id"], 5)
        servers.postgres.stop()
        try:
            started = time.monotonic()
            response = client.get(f"/v1/fine_tuning/jobs/{job['id']}")
            assert time.monotonic() - started < 10, "the API hung while the database was down"
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"] == "5"
            assert response.json()["error"]["code"] == "database_unavailable"
            time.sleep(2)
        finally:
            servers.postgres.start()
        get_job(client, job["id"])  # the API recovers by itself
        final = wait_for_status(client, job["id"], TERMINAL)
        assert final["status"] == "succeeded" and final["crashes"] == 0, final
        assert max(metric_steps(client, job["id"])) == 120
    assert_invariants(servers.service)


def test_terminated_database_connections_mid_run_lose_nothing(servers: Servers) -> None:
    with servers.service.client() as client:
        job = long_job(client, n_epochs=6)
        wait_for_step(client, job["id"], 5)
        engine = create_engine(f"{servers.postgres.url}/postgres", isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            cut = conn.execute(text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE "
                                    "datname = :db"), {"db": f"tuneforge_restarts_{os.getpid()}"}).scalar()
        engine.dispose()
        assert cut and cut > 0
        final = wait_for_status(client, job["id"], TERMINAL)
        assert final["status"] == "succeeded" and final["crashes"] == 0, final
        assert set(metric_steps(client, job["id"])) == set(range(1, 121))
    assert_invariants(servers.service)
