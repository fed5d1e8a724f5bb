"""API benchmark: job-status polling under concurrent load beside a bare FastAPI endpoint, and list-jobs
latency with a small and a large jobs table, measured side by side in one run.

    python -m bench.api               # the figures in docs/benchmarks.md (1k vs 100k jobs, 8 s per phase, ~2 min)
    python -m bench.api --quick       # CI smoke run (200 vs 2k jobs, 1.5 s per phase, ~30 s; no timing assertion)
    python -m bench.api --workers 2   # both servers with uvicorn --workers 2 (`tuneforge api --workers`)

It creates a Postgres database of its own (tuneforge_bench_api_<pid>, migrated with `alembic upgrade head`,
dropped at the end) and starts two servers the same way (uvicorn, --workers 1 by default, the access log
on): `tuneforge api` (keys and the Redis rate limiter on, its limit far above the load) and
`uvicorn bench.api:bare_app`, a bare FastAPI app whose one sync endpoint returns the same JSON body as the
real job-status route, without auth, rate limiting, database or middleware.

List: GET /v1/fine_tuning/jobs (limit 20) one request at a time, first page and a deep keyset page
(after= the job in the middle), with the small table and again after filling it up to the large size.

Polling: a keep-alive HTTP/1.1 load generator on raw asyncio sockets (lighter than httpx, so the client
takes as little of the two cores from the servers as it can) holds C connections open and
- "saturating": each connection sends its next request as soon as the previous answer arrives (closed
  loop): the server's maximum throughput, and latency = C / throughput by Little's law;
- "1/s each": each connection polls once per second, started at spread offsets (open loop: latency
  counted from the scheduled send time, so a slow answer is not hidden by the next send waiting for it):
  C clients each following a job;
- "stalled": requests still unanswered a few seconds after the phase ended (they count as slower than any
  answer in the percentiles). The saturating phase at 100 connections runs last: it can stall the API.

Server CPU ms/req = the server processes' CPU time over the phase / requests served: less sensitive than
wall-clock figures to other processes on a shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
from fastapi import FastAPI

from tests.support.databases import create_database, drop_database
from tests.support.processes import free_port, wait_until_up

REDIS = os.environ.get("TUNEFORGE_TEST_REDIS", "redis://127.0.0.1:6379")
BODY_ENV = "TUNEFORGE_BENCH_BARE_BODY"
BARE_ROUTE = "/v1/fine_tuning/jobs/{fine_tuning_job_id}"


@dataclass(frozen=True)
class Setup:
    """What one benchmark mode loads."""

    connections: int
    phase_seconds: float
    warmup_seconds: float
    small_jobs: int
    large_jobs: int
    list_requests: int
    grace_seconds: float  # how long past a phase's end an unanswered request is waited for


FULL = Setup(connections=100, phase_seconds=8.0, warmup_seconds=2.0, small_jobs=1_000, large_jobs=100_000,
             list_requests=300, grace_seconds=5.0)
QUICK = Setup(connections=100, phase_seconds=1.5, warmup_seconds=0.5, small_jobs=200, large_jobs=2_000,
              list_requests=40, grace_seconds=2.0)


# ---------------------------------------------------------------- the bare comparison app
def _bare_body() -> dict[str, Any]:
    raw = os.environ.get(BODY_ENV)
    return json.loads(raw) if raw else {"id": "ftjob-bare", "object": "fine_tuning.job", "status": "running"}


bare_app = FastAPI(title="bare")
_BARE_BODY = _bare_body()


@bare_app.get(BARE_ROUTE)
def read_bare_job(fine_tuning_job_id: str) -> dict[str, Any]:
    """The same JSON body as tuneforge's job-status route: FastAPI and uvicorn alone."""
    return {**_BARE_BODY, "id": fine_tuning_job_id}


# ---------------------------------------------------------------- load generator
@dataclass
class PhaseResult:
    latencies: list[float]  # seconds, of the requests sent inside the measured span
    errors: int  # answers other than 200
    stalled: int  # requests (sent at any time) still unanswered `grace` seconds after the span ended
    seconds: float
    server_cpu_seconds: float

    @property
    def requests(self) -> int:
        return len(self.latencies)

    def percentile(self, q: float) -> float:
        """The q-th percentile latency in ms (nearest rank); a stalled request counts as slower than any answer."""
        ordered = sorted(self.latencies) + [math.inf] * self.stalled
        if not ordered:
            return math.nan
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))] * 1000


def _request_bytes(path: str, headers: dict[str, str]) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items()), "", ""]
    return "\r\n".join(lines).encode()


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    """Send one request on a keep-alive connection and read the whole answer; returns the status code."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return status


async def _load(port: int, request: bytes, *, connections: int, seconds: float, warmup: float,
                interval: float | None, grace: float) -> tuple[list[float], int, int]:
    """Drive one phase; returns (latencies, errors, stalled)."""
    latencies: list[float] = []
    errors = 0
    outstanding: set[int] = set()
    start = time.perf_counter() + warmup
    end = start + seconds

    async def connection(index: int) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            # Paced clients start at spread offsets, so that C clients polling every interval send evenly.
            scheduled = time.perf_counter() + (interval * index / connections if interval else 0.0)
            while True:
                if interval:
                    await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
                sent = scheduled if interval else time.perf_counter()
                if sent >= end:
                    return
                outstanding.add(index)
                status = await _exchange(reader, writer, request)
                outstanding.discard(index)
                if sent >= start:
                    latencies.append(time.perf_counter() - sent)
                    errors += status != 200
                if interval:
                    scheduled += interval
        finally:
            writer.close()

    tasks = [asyncio.ensure_future(connection(i)) for i in range(connections)]
    _done, pending = await asyncio.wait(tasks, timeout=end - time.perf_counter() + grace)
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return latencies, errors, len(outstanding)


def _tree_cpu(process: psutil.Process) -> float:
    """User + system CPU seconds of a server and its worker processes (uvicorn --workers N)."""
    total = 0.0
    for p in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += sum(p.cpu_times()[:2])
    return total


def run_phase(port: int, server_pid: int, path: str, headers: dict[str, str], *, connections: int,
              seconds: float, warmup: float, interval: float | None = None, grace: float = 5.0) -> PhaseResult:
    """One load phase against one server, with that server's CPU time over the measured span."""
    process = psutil.Process(server_pid)
    request = _request_bytes(path, headers)
    cpu_marks: list[float] = []

    async def main() -> tuple[list[float], int, int]:
        async def mark_cpu() -> None:
            # The server's CPU time at the start and end of the measured span (the warm-up is left out).
            await asyncio.sleep(warmup)
            cpu_marks.append(_tree_cpu(process))
            await asyncio.sleep(seconds)
            cpu_marks.append(_tree_cpu(process))

        marker = asyncio.ensure_future(mark_cpu())
        result = await _load(port, request, connections=connections, seconds=seconds, warmup=warmup,
                             interval=interval, grace=grace)
        await marker
        return result

    latencies, errors, stalled = asyncio.run(main())
    return PhaseResult(latencies=latencies, errors=errors, stalled=stalled, seconds=seconds,
                       server_cpu_seconds=cpu_marks[1] - cpu_marks[0])


def sequential_latencies(base: str, path: str, headers: dict[str, str], *, n: int,
                         params: dict[str, Any]) -> list[float]:
    """n requests one after another on one keep-alive connection (after 5 unmeasured), in ms."""
    out: list[float] = []
    with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
        for i in range(n + 5):
            started = time.perf_counter()
            response = client.get(path, params=params)
            elapsed = time.perf_counter() - started
            response.raise_for_status()
            if i >= 5:
                out.append(elapsed * 1000)
    return out


# ---------------------------------------------------------------- database setup
def insert_jobs(project_pk: int, *, count: int, start: int) -> float:
    """Bulk-insert `count` finished jobs (numbered from start) through the ORM table; returns seconds taken."""
    from sqlalchemy import insert

    from app.core.db import session_scope
    from app.models import FineTuningJob
    from app.schemas.training import TrainingConfig

    config = TrainingConfig(n_epochs=3, batch_size=4, learning_rate=2e-4).model_dump(mode="json")
    now = int(time.time())
    started = time.perf_counter()
    batch = 5_000
    for first in range(start, start + count, batch):
        rows = [{"id": f"ftjob-bench{i:012d}", "project_pk": project_pk, "model": "tiny-llama",
                 "base_model": "tiny-llama", "training_file": "file-bench", "status": "succeeded", "config": config,
                 "seed": 42, "created_at": now - 100_000 + i, "started_at": now - 100_000 + i,
                 "finished_at": now - 99_000 + i, "step": 30, "total_steps": 30, "trained_tokens": 12_345,
                 "attempt": 1, "fine_tuned_model": f"ft:tiny-llama:bench::{i:08d}"}
                for i in range(first, min(start + count, first + batch))]
        with session_scope() as session:
            session.execute(insert(FineTuningJob), rows)
    from sqlalchemy import text

    with session_scope() as session:
        session.execute(text("ANALYZE fine_tuning_jobs"))
    return time.perf_counter() - started


def create_polled_job(project_pk: int) -> str:
    """A running job with progress, as a polling client sees it mid-run."""
    from app.core.db import session_scope
    from app.models import FineTuningJob
    from app.models.base import new_id
    from app.schemas.training import TrainingConfig

    now = int(time.time())
    with session_scope() as session:
        job = FineTuningJob(id=new_id("ftjob-"), project_pk=project_pk, model="tiny-llama", base_model="tiny-llama",
                            training_file="file-bench", status="running", seed=42, attempt=1, step=120,
                            total_steps=300, started_at=now - 60, estimated_finish=now + 90,
                            metadata_={"team": "bench"},
                            config=TrainingConfig(n_epochs=3, batch_size=4).model_dump(mode="json"))
        session.add(job)
        session.flush()
        return job.id


def list_plan(database_url: str) -> str:
    """Postgres' plan for the deep list page's query, one line (which index it walks)."""
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            project_pk = conn.scalar(text("SELECT project_pk FROM fine_tuning_jobs LIMIT 1"))
            after_pk = conn.scalar(text("SELECT pk FROM fine_tuning_jobs ORDER BY pk DESC OFFSET "
                                        "(SELECT count(*) / 2 FROM fine_tuning_jobs) LIMIT 1"))
            plan = conn.execute(text("EXPLAIN SELECT * FROM fine_tuning_jobs WHERE project_pk = :p AND pk < :a "
                                     "ORDER BY pk DESC LIMIT 21"), {"p": project_pk, "a": after_pk}).scalars().all()
    finally:
        engine.dispose()
    return " / ".join(line.strip().split("  (")[0] for line in plan[:2])


# ---------------------------------------------------------------- main
def _phase_row(label: str, r: PhaseResult) -> str:
    cpu = r.server_cpu_seconds / r.requests * 1000 if r.requests else math.nan
    return (f"{label:<28}{r.requests:>9}{r.requests / r.seconds:>8.0f}{r.percentile(50):>9.1f}{r.percentile(90):>9.1f}"
            f"{r.percentile(99):>9.1f}{r.percentile(100):>9.1f}{r.errors:>7}{r.stalled:>8}{cpu:>11.2f}")


def _start_server(command: list[str], env: dict[str, str], log: Path, ready: str) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        server = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    wait_until_up(ready, process=server)
    return server


def _stop(server: subprocess.Popen[bytes]) -> None:
    # A server whose threads wait on a stalled connection pool does not stop by itself until the pool
    # times out (30 s): a short grace, then SIGKILL for it and its worker processes.
    children = psutil.Process(server.pid).children(recursive=True)
    server.terminate()
    try:
        server.wait(timeout=5)
    except subprocess.TimeoutExpired:
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        server.kill()
        server.wait()


def _ms(times: list[float], q: float) -> float:
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="tuneforge API benchmark: polling under load and list-jobs depth.")
    parser.add_argument("--quick", action="store_true", help="CI smoke run (small tables, short phases)")
    parser.add_argument("--seconds", type=float, default=None, help="measured seconds per load phase")
    parser.add_argument("--workers", type=int, default=1,
                        help="uvicorn worker processes for both servers (`tuneforge api --workers`, default 1)")
    args = parser.parse_args(argv)
    setup = QUICK if args.quick else FULL
    seconds = args.seconds or setup.phase_seconds

    name = f"tuneforge_bench_api_{os.getpid()}"
    database_url = create_database(name)
    root = Path(tempfile.mkdtemp(prefix="tuneforge-bench-api-"))
    # The rate limit stays on (its Redis round trip is part of every request), far above this load.
    env = {**os.environ, "TUNEFORGE_DATABASE_URL": database_url, "TUNEFORGE_DATA_DIR": str(root / "data"),
           "TUNEFORGE_STORAGE_BACKEND": "database", "TUNEFORGE_REQUIRE_API_KEYS": "true",
           "TUNEFORGE_BROKER_URL": f"{REDIS}/12", "TUNEFORGE_RATE_LIMIT_PER_MINUTE": "10000000",
           "TUNEFORGE_RATE_LIMIT_BURST": "1000000", "TUNEFORGE_TRAINING_QUEUE": f"bench-api-{os.getpid()}"}
    os.environ.update({k: v for k, v in env.items() if k.startswith("TUNEFORGE_")})
    servers: list[subprocess.Popen[bytes]] = []
    try:
        from app.cli import run_migrations
        from app.core.db import session_scope
        from app.services.projects import create_api_key

        run_migrations()
        with session_scope() as session:
            key_row, key = create_api_key(session, project_name="bench")
            project_pk = key_row.project_pk
        job_id = create_polled_job(project_pk)
        small_seconds = insert_jobs(project_pk, count=setup.small_jobs, start=0)

        api_port, bare_port = free_port(), free_port()
        api = _start_server([sys.executable, "-m", "app.cli", "api", "--port", str(api_port), "--workers",
                             str(args.workers)], env,
                            root / "api.log", f"http://127.0.0.1:{api_port}/healthz")
        servers.append(api)
        base = f"http://127.0.0.1:{api_port}"
        auth = {"Authorization": f"Bearer {key}"}
        path = f"/v1/fine_tuning/jobs/{job_id}"
        body = httpx.get(base + path, headers=auth).raise_for_status().json()
        bare = _start_server([sys.executable, "-m", "uvicorn", "bench.api:bare_app", "--host", "127.0.0.1", "--port",
                              str(bare_port), "--workers", str(args.workers), "--log-level", "info"],
                             {**env, BODY_ENV: json.dumps(body)}, root / "bare.log",
                             f"http://127.0.0.1:{bare_port}/docs")
        servers.append(bare)
        assert httpx.get(f"http://127.0.0.1:{bare_port}{path}").json() == body

        import fastapi
        import sqlalchemy
        import starlette
        import uvicorn

        print(f"machine: {os.cpu_count()} CPUs ({platform.machine()}), load average {os.getloadavg()[0]:.1f}; python "
              f"{platform.python_version()}, fastapi {fastapi.__version__}, starlette {starlette.__version__}, "
              f"uvicorn {uvicorn.__version__} (h11, asyncio loop), sqlalchemy {sqlalchemy.__version__}, psycopg "
              f"{_version('psycopg')}", flush=True)

        # ---- list-jobs: the small table, then the same project grown to the large size ----
        list_rows: list[tuple[str, str, list[float]]] = []

        def measure_lists(total: int) -> None:
            middle = f"ftjob-bench{total // 2:012d}"  # bulk jobs are numbered in insertion (pk) order
            for page, params in (("first", {"limit": 20}), (f"after=#{total // 2:,}", {"limit": 20, "after": middle})):
                times = sequential_latencies(base, "/v1/fine_tuning/jobs", auth, n=setup.list_requests, params=params)
                list_rows.append((f"{total:,} jobs", page, times))

        measure_lists(setup.small_jobs)
        large_seconds = insert_jobs(project_pk, count=setup.large_jobs - setup.small_jobs, start=setup.small_jobs)
        measure_lists(setup.large_jobs)
        print(f"list GET /v1/fine_tuning/jobs?limit=20, one request at a time, {setup.list_requests} per row (jobs "
              f"bulk-inserted in {small_seconds:.1f} s + {large_seconds:.1f} s; load average {os.getloadavg()[0]:.1f})")
        header = f"{'database':<16}{'page':<16}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'mean ms':>9}"
        print(header)
        print("-" * len(header))
        for database, page, times in list_rows:
            print(f"{database:<16}{page:<16}{_ms(times, 50):>9.1f}{_ms(times, 90):>9.1f}{_ms(times, 99):>9.1f}"
                  f"{statistics.fmean(times):>9.1f}")
        p50 = [statistics.median(times) for _, _, times in list_rows]
        print(f"ratios large/small p50: first page {p50[2] / p50[0]:.2f}, deep page {p50[3] / p50[1]:.2f}")
        print(f"plan (deep page, large table): {list_plan(database_url)}", flush=True)

        # ---- polling ----
        few = max(1, setup.connections // 4)
        many = setup.connections
        # (label, port, pid, headers, connections, seconds between a connection's requests or None = saturating).
        # The saturating run at `many` connections goes last: it can stall the API's connection pool.
        phases = [
            (f"bare {few} conns saturating", bare_port, bare.pid, {}, few, None),
            (f"tuneforge {few} conns saturating", api_port, api.pid, auth, few, None),
            (f"bare {many} conns 1/s each", bare_port, bare.pid, {}, many, 1.0),
            (f"tuneforge {many} conns 1/s each", api_port, api.pid, auth, many, 1.0),
            (f"bare {many} conns saturating", bare_port, bare.pid, {}, many, None),
            (f"tuneforge {many} conns saturating", api_port, api.pid, auth, many, None),
        ]
        print(f"polling GET /v1/fine_tuning/jobs/{{id}} ({setup.large_jobs:,} jobs in the table): {seconds:g} s "
              f"measured per phase after {setup.warmup_seconds:g} s warm-up; both servers: uvicorn --workers "
              f"{args.workers} (`tuneforge api` defaults to 1), access log on; stalled = unanswered "
              f"{setup.grace_seconds:g} s after the phase")
        header = (f"{'phase':<28}{'requests':>9}{'req/s':>8}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'max ms':>9}"
                  f"{'errors':>7}{'stalled':>8}{'cpu ms/req':>11}")
        print(header)
        print("-" * len(header))
        results: list[PhaseResult] = []
        for label, port, pid, headers, connections, interval in phases:
            result = run_phase(port, pid, path, headers, connections=connections, seconds=seconds,
                               warmup=setup.warmup_seconds, interval=interval, grace=setup.grace_seconds)
            results.append(result)
            print(_phase_row(label, result), flush=True)
        bare_few, tf_few, bare_paced, tf_paced, _bare_many, tf_many = results
        cpu = (tf_few.server_cpu_seconds / max(tf_few.requests, 1)) / (bare_few.server_cpu_seconds / bare_few.requests)
        print(f"ratios tuneforge/bare: throughput at {few} conns {tf_few.requests / bare_few.requests:.2f}, "
              f"server CPU per request {cpu:.2f}, p99 at {many} conns 1/s each "
              f"{tf_paced.percentile(99) / bare_paced.percentile(99):.2f}")
        print(f"targets: polling p99 < 50 ms at {many} connections: {tf_paced.percentile(99):.1f} ms polling 1/s each, "
              f"{tf_many.percentile(99):.1f} ms saturating ({tf_many.stalled} stalled); list-jobs flat from "
              f"{setup.small_jobs:,} to {setup.large_jobs:,} jobs: p50 x{p50[2] / p50[0]:.2f} first page, "
              f"x{p50[3] / p50[1]:.2f} deep page")
    finally:
        for server in servers:
            _stop(server)
        from app.core.db import get_engine

        get_engine().dispose()
        drop_database(name)
        shutil.rmtree(root, ignore_errors=True)


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    main()
