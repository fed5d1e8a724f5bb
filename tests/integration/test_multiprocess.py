"""A job asking for two training processes runs under torchrun on its worker, pauses and resumes there,
and learns the same curve as the one-process job."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from tests.integration.conftest import Service, all_events, wait_for_status
from tests.support.data import chat_lines, jsonl
from tests.support.service import TERMINAL

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _create(client: httpx.Client, file_id: str, **resources: Any) -> str:
    response = client.post("/v1/fine_tuning/jobs", json={
        "model": "tiny-llama", "training_file": file_id, "seed": 11, "resources": resources,
        "method": {"type": "supervised", "supervised": {
            # fp32: on a CPU with bf16 instructions "auto" is bf16, where two processes' sums round apart by 0.3%.
            "hyperparameters": {"n_epochs": 16, "batch_size": 4, "learning_rate": 5e-3, "save_steps": 100,
                                "precision": "fp32"},
            "adapter": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0}}}})  # fmt: skip
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


def _losses(client: httpx.Client, job_id: str) -> dict[int, float]:
    return {e["data"]["step"]: e["data"]["train_loss"] for e in all_events(client, job_id) if e["type"] == "metrics"}


def test_two_process_job_pauses_resumes_and_matches_the_one_process_job(service: Service) -> None:
    with service.client() as client:
        file_id = client.post("/v1/files", files={"file": ("t.jsonl", jsonl(chat_lines(48)))},
                              data={"purpose": "fine-tune"}).json()["id"]
        single = _create(client, file_id)
        double = _create(client, file_id, processes=2)
        assert client.get(f"/v1/fine_tuning/jobs/{double}").json()["resources"]["processes"] == 2

        # 192 steps of a few tens of ms each on the tiny model: time enough to see the pause (read once a
        # second) well before the end, even on a fast machine (48 steps once finished first).
        deadline = time.monotonic() + 240
        while (job := client.get(f"/v1/fine_tuning/jobs/{double}").json())["progress"]["step"] < 3:
            assert job["status"] not in TERMINAL and time.monotonic() < deadline, job
            time.sleep(0.2)
        client.post(f"/v1/fine_tuning/jobs/{double}/pause")
        paused = wait_for_status(client, double, {"paused"} | TERMINAL, timeout=120)
        assert paused["status"] == "paused", paused
        assert client.post(f"/v1/fine_tuning/jobs/{double}/resume").json()["status"] == "queued"

        finals = [wait_for_status(client, job_id, TERMINAL) for job_id in (single, double)]
        assert [f["status"] for f in finals] == ["succeeded", "succeeded"], finals
        messages = [e["message"] for e in all_events(client, double)]
        assert sum(m.startswith("training lora on 2 cpu processes (ddp)") for m in messages) == 2  # both attempts
        assert any(m.startswith("resumed from checkpoint at step") for m in messages)
        one, two = _losses(client, single), _losses(client, double)
        assert sorted(two) == sorted(one) == list(range(1, 193))
        assert [two[s] for s in sorted(two)] == pytest.approx([one[s] for s in sorted(one)], rel=1e-4)
        artifacts = client.get(f"/v1/fine_tuning/jobs/{double}/artifacts").json()["data"]
        assert "adapter" in {a["name"] for a in artifacts}
