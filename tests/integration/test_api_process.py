"""`tuneforge api` as a process: SIGTERM or SIGINT drains the requests in flight, then it exits 0."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.integration.conftest import Service, free_port, stop_process, wait_until_up
from tests.support.data import chat_lines, jsonl

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_lets_a_download_in_flight_finish_then_the_api_exits(service: Service, signum: int) -> None:
    content = jsonl(chat_lines(60_000))  # a few MB, streamed from the database in chunks
    with service.client() as client:
        file_id = client.post("/v1/files", files={"file": ("big.jsonl", content)},
                              data={"purpose": "fine-tune"}).json()["id"]
    port = free_port()
    log = open(service.root / "api-drain.log", "ab")  # noqa: SIM115 - lives as long as the process
    api = subprocess.Popen([sys.executable, "-m", "app.cli", "api", "--port", str(port)], env=service.env,
                           stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/healthz", process=api)
        received = hashlib.sha256()
        size = 0
        headers = {"Authorization": f"Bearer {service.api_key}"}
        with httpx.stream("GET", f"http://127.0.0.1:{port}/v1/files/{file_id}/content", headers=headers,
                          timeout=30) as response:
            chunks = response.iter_bytes(64 * 1024)
            first = next(chunks)
            api.send_signal(signum)  # mid-download
            time.sleep(0.5)
            for chunk in [first, *chunks]:
                received.update(chunk)
                size += len(chunk)
        assert size == len(content) and received.hexdigest() == hashlib.sha256(content).hexdigest()
        assert api.wait(timeout=30) == 0
    finally:
        stop_process(api, grace=10)
