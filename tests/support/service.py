"""Real processes: `tuneforge api` and `tuneforge worker` against Postgres and Redis, for the integration and
fault tests and the fault soak (bench/faults.py)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Set
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from app.core.processes import stop_process
from app.models.job import TERMINAL_STATUSES
from tests.support.databases import PG_ADMIN_URL, REDIS_URL, drop_database, recreate_database
from tests.support.processes import free_port, wait_until_up


@dataclass
class Service:
    base_url: str
    api_key: str
    env: dict[str, str]
    root: Path
    api: subprocess.Popen[bytes] | None = None
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start_worker(self, name: str, *, own_data_dir: bool = False,
                     extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """A worker process; with own_data_dir it shares nothing on disk with the others (another host);
        extra_env sets more of its settings (TUNEFORGE_WORKER_LABELS, TUNEFORGE_WORKER_GPUS, ...)."""
        env = {**self.env, "TUNEFORGE_WORKER_NAME": name, **(extra_env or {})}
        if own_data_dir:
            env["TUNEFORGE_DATA_DIR"] = str(self.root / f"host-{name}")
        log = open(self.root / f"worker-{name}.log", "ab")  # noqa: SIM115 - lives as long as the process
        # A session of its own, like a service manager's unit: a test can signal its whole process group.
        process = subprocess.Popen([sys.executable, "-m", "app.cli", "worker"], env=env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        self.workers.append(process)
        return process

    def start_inference(self, name: str = "inference") -> subprocess.Popen[bytes]:
        """An inference worker (`tuneforge worker --inference`), stopped with the service."""
        env = {**self.env, "TUNEFORGE_WORKER_NAME": name}
        log = open(self.root / f"inference-{name}.log", "ab")  # noqa: SIM115 - lives as long as the process
        process = subprocess.Popen([sys.executable, "-m", "app.cli", "worker", "--inference"], env=env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        self.workers.append(process)
        return process

    def live_workers(self) -> list[subprocess.Popen[bytes]]:
        return [w for w in self.workers if w.poll() is None]

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers={"Authorization": f"Bearer {self.api_key}"},
                            timeout=30)


@contextmanager
def running_service(root: Path, *, tiny_model_dir: Path, name: str, pg_server: str = PG_ADMIN_URL,
                    redis_url: str = REDIS_URL, workers: int = 1, quiet: bool = False,
                    extra_env: dict[str, str] | None = None) -> Iterator[Service]:
    """API and `workers` workers as separate processes, sharing only Postgres and Redis, with a database and a
    queue of their own (called `name`); everything is stopped and dropped on exit, and the logs' tails printed
    unless quiet. extra_env adds settings for every process (a hub endpoint, a model cache, ...)."""
    database_name = f"tuneforge_{name}"
    database_url = recreate_database(database_name, server=pg_server)
    (root / "wandb").mkdir(exist_ok=True)
    catalogue = root / "catalogue.json"
    catalogue.write_text(json.dumps({"tiny-llama": {"path": str(tiny_model_dir)}}))
    # W&B leaves its service address (WANDB_SERVICE, ...) in this process's environment once a test used
    # it in-process; the service's processes must not inherit that.
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("WANDB_")},
           "TUNEFORGE_DATABASE_URL": database_url, "TUNEFORGE_BROKER_URL": f"{redis_url}/14",
           "TUNEFORGE_DATA_DIR": str(root / "data"), "TUNEFORGE_CATALOGUE_FILE": str(catalogue),
           "TUNEFORGE_STORAGE_BACKEND": "database", "TUNEFORGE_REQUIRE_API_KEYS": "true",
           "TUNEFORGE_HEARTBEAT_SECONDS": "1", "TUNEFORGE_LEASE_SECONDS": "8",
           "TUNEFORGE_REAPER_INTERVAL_SECONDS": "2", "TUNEFORGE_MIN_TRAINING_EXAMPLES": "10",
           # The scale-out test queues 20 jobs at once and tests poll hard: lift those limits here.
           "TUNEFORGE_MAX_ACTIVE_JOBS_PER_PROJECT": "100", "TUNEFORGE_RATE_LIMIT_PER_MINUTE": "100000",
           "TUNEFORGE_RATE_LIMIT_BURST": "10000",
           # W&B runs offline into the test's folder; no key, no network.
           "TUNEFORGE_WANDB_MODE": "offline", "WANDB_DIR": str(root / "wandb"), "WANDB_SILENT": "true",
           # A queue of our own: parallel test sessions share Redis but never each other's jobs.
           "TUNEFORGE_TRAINING_QUEUE": f"training-{name}",
           # Routing tests rely on what workers offer: no GPUs, even on a GPU machine.
           "TUNEFORGE_WORKER_GPUS": "0", **(extra_env or {})}
    created = subprocess.run([sys.executable, "-m", "app.cli", "keys", "create", "integration"], env=env,
                             check=True, capture_output=True, text=True)
    key = json.loads(created.stdout.strip().splitlines()[-1])["key"]
    port = free_port()
    api_log = open(root / "api.log", "ab")  # noqa: SIM115
    api = subprocess.Popen([sys.executable, "-m", "app.cli", "api", "--port", str(port)], env=env,
                           stdout=api_log, stderr=subprocess.STDOUT)
    svc = Service(base_url=f"http://127.0.0.1:{port}", api_key=key, env=env, root=root, api=api)
    for k in range(workers):
        svc.start_worker(f"worker-{k + 1}")
    try:
        wait_until_up(f"{svc.base_url}/healthz", process=api)
        yield svc
    finally:
        for process in [api, *svc.workers]:
            stop_process(process, grace=20)
        drop_database(database_name, server=pg_server)
        if not quiet:
            for log in sorted(root.glob("*.log")):
                sys.stderr.write(f"--- {log.name} (tail) ---\n{log.read_text(errors='replace')[-3000:]}\n")


TERMINAL = frozenset(status.value for status in TERMINAL_STATUSES)  # as plain strings, as the API answers


def wait_for_step(client: httpx.Client, job_id: str, step: int, timeout: float = 120) -> dict:
    """The job once it runs at `step` or later (AssertionError if it ends first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        if job["status"] == "running" and job["progress"]["step"] >= step:
            return job
        assert job["status"] not in TERMINAL, job
        time.sleep(0.2)
    raise TimeoutError(f"job {job_id} did not reach step {step}")


def wait_for_status(client: httpx.Client, job_id: str, statuses: Set[str], timeout: float = 240.0) -> dict:
    deadline = time.monotonic() + timeout
    job: dict = {}
    while time.monotonic() < deadline:
        job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id} still {job.get('status')} after {timeout}s: {job}")


def all_events(client: httpx.Client, job_id: str) -> list[dict]:
    """Every event of a job, newest first, following the list's pages."""
    events: list[dict] = []
    after = None
    while True:
        page = client.get(f"/v1/fine_tuning/jobs/{job_id}/events",
                          params={"limit": 100, **({"after": after} if after else {})}).json()
        events += page["data"]
        if not page["has_more"]:
            return events
        after = page["data"][-1]["id"]


def is_warm_start_process(process: psutil.Process) -> bool:
    """Whether this is a worker's warm-start process (`python -m worker.zygote`), which forks its attempts."""
    with contextlib.suppress(psutil.Error):
        return "worker.zygote" in process.cmdline()
    return False


def worker_of_attempt(process: psutil.Process) -> psutil.Process | None:
    """The worker running a training process: its parent, or its parent's parent when the worker's warm-start
    process forked it."""
    with contextlib.suppress(psutil.Error):
        parent = process.parent()
        return parent.parent() if parent is not None and is_warm_start_process(parent) else parent
    return None


def training_processes(job_id: str) -> list[psutil.Process]:
    """A job's running training processes: `python -m worker.attempt JOB ...` (one per rank), or an attempt
    forked from a worker's warm-start process (worker/zygote.py), known by its stdout, the job's attempt log."""
    found = []
    for process in psutil.process_iter(["cmdline", "name"]):
        cmdline = process.info["cmdline"] or []
        if "worker.attempt" in cmdline and job_id in cmdline:
            found.append(process)
        elif process.info["name"] == "tf-attempt":
            with contextlib.suppress(psutil.Error):
                if any(Path(f.path).name.startswith(f"{job_id}-attempt-") for f in process.open_files()):
                    found.append(process)
    return found
