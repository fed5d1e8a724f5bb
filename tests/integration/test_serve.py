"""`tuneforge serve`: the embedded mode a newcomer runs (SQLite, folder broker, demo model)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import chat_lines, jsonl
from tests.integration.conftest import free_port, stop_process, wait_for_status, wait_until_up

pytestmark = pytest.mark.integration


def test_serve_runs_a_job_end_to_end_with_no_servers_and_no_key(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEFORGE_")}
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115
    started = time.monotonic()
    serve = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port),
                              "--data-dir", str(tmp_path / "data")], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/healthz", process=serve, timeout=120)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["tiny-llama"]
            file_id = client.post("/v1/files", files={"file": ("t.jsonl", jsonl(chat_lines(12)))},
                                  data={"purpose": "fine-tune"}).json()["id"]
            job = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_id,
                                                            "hyperparameters": {"n_epochs": 1}}).json()
            final = wait_for_status(client, job["id"], {"succeeded", "failed", "cancelled"}, timeout=180)
            assert final["status"] == "succeeded", final
            adapter = client.get(f"/v1/fine_tuning/jobs/{job['id']}/artifacts/adapter")
            assert adapter.status_code == 200 and len(adapter.content) > 1000
        sys.stderr.write(f"serve: demo job finished {time.monotonic() - started:.1f}s after start\n")
        assert (tmp_path / "data" / "tuneforge.db").exists()  # embedded SQLite, not Postgres
    finally:
        stop_process(serve, grace=20)
        sys.stderr.write((tmp_path / "serve.log").read_text(errors="replace")[-3000:])
    assert serve.returncode is not None
