"""Nothing piles up on a worker host or in storage: an attempt's work directory goes when its outputs are
registered, and a deleted fine-tuned model leaves no bytes anywhere."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.integration.conftest import Service, wait_for_status
from tests.support.data import chat_lines, jsonl
from tests.support.service import TERMINAL

pytestmark = pytest.mark.integration


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.exists() else 0


def test_a_finished_job_leaves_no_work_files_and_a_deleted_model_no_bytes(service: Service) -> None:
    work = service.root / "data" / "work"
    before = tree_bytes(work)
    with service.client() as client:
        file_id = client.post("/v1/files", files={"file": ("t.jsonl", jsonl(chat_lines(12)))},
                              data={"purpose": "fine-tune"}).json()["id"]
        job = client.post("/v1/fine_tuning/jobs", json={
            "model": "tiny-llama", "training_file": file_id, "merge": True,
            "method": {"supervised": {"hyperparameters": {"n_epochs": 2, "save_steps": 2}}}}).json()
        final = wait_for_status(client, job["id"], TERMINAL)
        assert final["status"] == "succeeded", final
        assert {a["name"] for a in client.get(f"/v1/fine_tuning/jobs/{job['id']}/artifacts").json()["data"]} >= {
            "adapter", "merged"}
        deadline = time.monotonic() + 10  # the attempt removes its directory as it exits
        while (work / job["id"]).exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not (work / job["id"]).exists()
        assert tree_bytes(work) == before

        engine = create_engine(service.env["TUNEFORGE_DATABASE_URL"])
        query = text("SELECT count(*) FROM blobs WHERE key LIKE :artifacts OR key LIKE :checkpoints")
        keys = {"artifacts": f"artifacts/{job['id']}/%", "checkpoints": f"checkpoints/{job['id']}/%"}
        with engine.connect() as conn:
            assert conn.execute(query, keys).scalar() >= 4  # adapter, merged, metrics, config, checkpoints
        assert client.delete(f"/v1/models/{final['fine_tuned_model']}").status_code == 200
        with engine.connect() as conn:
            assert conn.execute(query, keys).scalar() == 0
        engine.dispose()
