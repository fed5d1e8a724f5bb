"""`tuneforge serve`: the embedded mode a newcomer runs (SQLite, folder broker, demo model)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.integration.conftest import free_port, stop_process, wait_for_status, wait_until_up
from tests.support.data import chat_lines, jsonl
from tests.support.service import TERMINAL

pytestmark = pytest.mark.integration


def start_serve(tmp_path: Path, port: int, *, data_dir_from_env: bool = False) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEFORGE_")}
    where = ["--data-dir", str(tmp_path / "data")]
    if data_dir_from_env:  # the setting's environment variable, as for every other setting
        env["TUNEFORGE_DATA_DIR"], where = str(tmp_path / "data"), []
    log = open(tmp_path / "serve.log", "ab")  # noqa: SIM115 - lives as long as the process
    # A session of its own: nothing here may signal serve's children for it.
    serve = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port), *where], env=env,
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    wait_until_up(f"http://127.0.0.1:{port}/healthz", process=serve, timeout=120)
    return serve


def test_serve_runs_a_job_end_to_end_with_no_servers_and_no_key(tmp_path: Path) -> None:
    port = free_port()
    started = time.monotonic()
    serve = start_serve(tmp_path, port, data_dir_from_env=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["tiny-llama"]
            file_id = client.post("/v1/files", files={"file": ("t.jsonl", jsonl(chat_lines(12)))},
                                  data={"purpose": "fine-tune"}).json()["id"]
            job = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_id,
                                                            "hyperparameters": {"n_epochs": 1}}).json()
            final = wait_for_status(client, job["id"], TERMINAL, timeout=180)
            assert final["status"] == "succeeded", final
            adapter = client.get(f"/v1/fine_tuning/jobs/{job['id']}/artifacts/adapter")
            assert adapter.status_code == 200 and len(adapter.content) > 1000
            # serve's inference worker answers with the model just trained (503 until it has registered).
            ask = {"model": final["fine_tuned_model"], "messages": [{"role": "user", "content": "code 1"}],
                   "max_tokens": 4}
            deadline = time.monotonic() + 60
            while (answer := client.post("/v1/chat/completions", json=ask)).status_code == 503:
                assert time.monotonic() < deadline, answer.text
                time.sleep(0.5)
            assert answer.status_code == 200, answer.text
            assert answer.json()["choices"][0]["message"]["role"] == "assistant"
            assert 1 <= answer.json()["usage"]["completion_tokens"] <= 4
        sys.stderr.write(f"serve: demo job finished {time.monotonic() - started:.1f}s after start\n")
        assert (tmp_path / "data" / "tuneforge.db").exists()  # embedded SQLite, not Postgres, in TUNEFORGE_DATA_DIR
        log = (tmp_path / "serve.log").read_text(errors="replace")
        if os.geteuid() == 0:  # one line about running as root, not Celery's screenful
            assert "superuser privileges" not in log and "the worker runs as root" in log
    finally:
        stop_process(serve, grace=60)
        sys.stderr.write((tmp_path / "serve.log").read_text(errors="replace")[-3000:])
    assert serve.returncode == 0  # a clean stop


def test_sigterm_to_serve_stops_its_worker_which_hands_the_running_job_back(tmp_path: Path) -> None:
    port = free_port()
    serve = start_serve(tmp_path, port)
    try:
        children = psutil.Process(serve.pid).children(recursive=True)
        assert children, "serve started no worker"
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            file_id = client.post("/v1/files", files={"file": ("t.jsonl", jsonl(chat_lines(40)))},
                                  data={"purpose": "fine-tune"}).json()["id"]
            job = client.post("/v1/fine_tuning/jobs", json={
                "model": "tiny-llama", "training_file": file_id, "method": {"type": "supervised", "supervised": {
                    # 800 steps: long enough to be running still when serve has stopped its API and asks the worker
                    # (at 200, a fast CPU finished the job in that window).
                    "hyperparameters": {"n_epochs": 40, "batch_size": 2, "save_steps": 1000}}}}).json()
            deadline = time.monotonic() + 120
            while client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["progress"]["step"] < 3:
                assert time.monotonic() < deadline, "the job did not start"
                time.sleep(0.2)
            children = psutil.Process(serve.pid).children(recursive=True)  # now with the training process
        serve.send_signal(signal.SIGTERM)  # to serve alone, as `kill PID` or a supervisor does
        assert serve.wait(timeout=60) == 0
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, f"serve left {[p.cmdline() for p in alive]} running"
        with sqlite3.connect(tmp_path / "data" / "tuneforge.db") as db:
            status, step, crashes = db.execute("SELECT status, step, crashes FROM fine_tuning_jobs WHERE id = ?",
                                               (job["id"],)).fetchone()
            checkpoints = [row[0] for row in db.execute(
                "SELECT step_number FROM job_checkpoints c JOIN fine_tuning_jobs j ON j.pk = c.job_pk "
                "WHERE j.id = ?", (job["id"],))]
        assert status == "queued" and crashes == 0 and checkpoints == [step], (status, crashes, checkpoints)

        serve = start_serve(tmp_path, port)  # the job continues from that checkpoint
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            final = wait_for_status(client, job["id"], TERMINAL, timeout=240)
            assert final["status"] == "succeeded" and final["crashes"] == 0, final
    finally:
        stop_process(serve, grace=60)
        sys.stderr.write((tmp_path / "serve.log").read_text(errors="replace")[-3000:])
