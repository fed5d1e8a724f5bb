"""Artifact download benchmark: throughput and the API server's memory while it streams a large file.

    python -m bench.download [--size-mb 100] [--backend database|local]

Starts a real `tuneforge api` process against a scratch Postgres database, stores SIZE MB of random
bytes as a result file (the same streaming path artifacts use), downloads it over loopback in full and
with a Range request, verifies the sha256, and prints MB/s and the server's RSS growth (sampled).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

from tests.support.databases import create_database, drop_database
from tests.support.processes import free_port


def _random_chunks(size: int, chunk: int = 1024 * 1024):  # type: ignore[no-untyped-def]
    remaining = size
    while remaining > 0:
        n = min(chunk, remaining)
        yield os.urandom(n)
        remaining -= n


def run(size_mb: int, backend: str) -> dict[str, float]:
    name = f"tuneforge_bench_{os.getpid()}"
    database_url = create_database(name)
    data_dir = Path(tempfile.mkdtemp(prefix="tuneforge-bench-"))
    env = {**os.environ, "TUNEFORGE_DATABASE_URL": database_url, "TUNEFORGE_DATA_DIR": str(data_dir),
           "TUNEFORGE_STORAGE_BACKEND": backend, "TUNEFORGE_REQUIRE_API_KEYS": "true",
           "TUNEFORGE_BROKER_URL": "redis://127.0.0.1:6379/13", "TUNEFORGE_RATE_LIMIT_PER_MINUTE": "0"}
    os.environ.update({k: v for k, v in env.items() if k.startswith("TUNEFORGE_")})
    from app.cli import run_migrations
    from app.core.db import session_scope
    from app.core.storage import get_storage
    from app.services.files import build_result_file
    from app.services.projects import create_api_key

    run_migrations()
    stored = get_storage().write("bench/blob", _random_chunks(size_mb * 1024 * 1024))
    with session_scope() as session:
        _row, key = create_api_key(session, project_name="bench")
        file = build_result_file(project_pk=_row.project_pk, filename="blob.bin", blob_key=stored.key,
                                 size=stored.bytes, sha256=stored.sha256)
        session.add(file)
        session.flush()
        file_id = file.id
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "app.cli", "api", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                if httpx.get(f"{base}/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        process = psutil.Process(server.pid)
        headers = {"Authorization": f"Bearer {key}"}
        httpx.get(f"{base}/v1/files/{file_id}", headers=headers).raise_for_status()  # warm up
        baseline = process.memory_info().rss
        peak = [baseline]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], process.memory_info().rss)
                time.sleep(0.02)

        sampler = threading.Thread(target=sample)
        sampler.start()
        digest, received = hashlib.sha256(), 0
        started = time.perf_counter()
        with httpx.stream("GET", f"{base}/v1/files/{file_id}/content", headers=headers, timeout=120) as response:
            response.raise_for_status()
            for chunk in response.iter_bytes(1024 * 1024):
                digest.update(chunk)
                received += len(chunk)
        elapsed = time.perf_counter() - started
        half = stored.bytes // 2
        ranged = httpx.get(f"{base}/v1/files/{file_id}/content", headers={**headers, "Range": f"bytes={half}-"},
                           timeout=120)
        done.set()
        sampler.join()
        assert received == stored.bytes and digest.hexdigest() == stored.sha256, "download does not match"
        assert ranged.status_code == 206 and len(ranged.content) == stored.bytes - half
        return {"size_mb": stored.bytes / 2**20, "mb_per_s": stored.bytes / 2**20 / elapsed,
                "server_rss_mb": baseline / 2**20, "server_rss_growth_mb": (peak[0] - baseline) / 2**20}
    finally:
        server.terminate()
        server.wait(timeout=20)
        from app.core.db import get_engine

        get_engine().dispose()
        drop_database(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=100)
    parser.add_argument("--backend", choices=("database", "local"), default="database")
    args = parser.parse_args()
    figures = run(args.size_mb, args.backend)
    print(f"download of {figures['size_mb']:.0f} MB ({args.backend} storage): {figures['mb_per_s']:.1f} MB/s; "
          f"server RSS {figures['server_rss_mb']:.0f} MB, growth while serving "
          f"{figures['server_rss_growth_mb']:.1f} MB; sha256 verified; Range resume verified")


if __name__ == "__main__":
    main()
