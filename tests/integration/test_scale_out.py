"""Several workers sharing only Postgres and Redis (no common directory) run many jobs exactly once."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from tests.integration.conftest import Service, stop_process, wait_for_status
from tests.support.data import chat_lines, jsonl
from tests.support.service import TERMINAL

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_twenty_jobs_spread_over_workers_on_separate_hosts_each_run_once(service: Service) -> None:
    extra = [service.start_worker(f"host-{i}", own_data_dir=True) for i in range(2)]
    try:
        with service.client() as client:
            file_id = client.post("/v1/files", files={"file": ("t.jsonl", jsonl(chat_lines(12)))},
                                  data={"purpose": "fine-tune"}).json()["id"]
            job_ids = [client.post("/v1/fine_tuning/jobs", json={
                "model": "tiny-llama", "training_file": file_id,
                "hyperparameters": {"n_epochs": 1, "batch_size": 4}}).json()["id"] for _ in range(20)]
            started = time.monotonic()
            finals = [wait_for_status(client, job_id, TERMINAL,
                                      timeout=max(60.0, 600 - (time.monotonic() - started)))
                      for job_id in job_ids]
            assert [f["status"] for f in finals] == ["succeeded"] * 20
            assert all(f["attempt"] == 1 for f in finals)  # each ran exactly once
            runners: Counter[str] = Counter()
            for job_id in job_ids:
                events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()["data"]
                starts = [e for e in events if e["message"].startswith("Attempt ")
                          and " started on " in e["message"]]
                assert len(starts) == 1, job_id
                runners[starts[0]["data"]["worker"]] += 1
        assert len(runners) >= 2, runners  # the work spread over workers
        assert sum(runners.values()) == 20
    finally:
        for process in extra:
            stop_process(process, grace=20)
