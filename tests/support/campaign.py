"""A random fault campaign on real processes: jobs on two workers while faults of every kind land on them.

Faults are drawn from a seeded generator and printed as they land, so a failing run can be replayed with the same
seed (timing still varies: a replay draws the same kinds in the same order). After the faults every job must have
succeeded, no step may come from an attempt older than the newest one started (fencing), every resume must start
at the last registered checkpoint, and every faulted job's final adapter must equal a fault-free run of the same
job. Used by tests/faults/test_campaign.py (short) and bench/faults.py (the soak).
"""

from __future__ import annotations

import io
import os
import random
import signal
import tarfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import psutil
from sqlalchemy import create_engine, text

from tests.support.data import chat_lines, jsonl
from tests.support.servers import PrivatePostgres, PrivateRedis
from tests.support.service import TERMINAL, Service, training_processes, worker_of_attempt

# Each kind, with what it does to the service.
FAULT_KINDS = {
    "training_sigkill": "SIGKILL to a job's training process (an OOM kill): a crash, counted",
    "worker_sigkill": "SIGKILL to a worker's whole process group (the host dies): the lease expires",
    "worker_sigstop": "SIGSTOP to a worker and its training process past the lease, then SIGCONT: fenced out",
    "worker_sigterm": "SIGTERM to a worker process alone (`kill PID`): checkpoint and hand over",
    "group_sigterm": "SIGTERM to a worker's process group (`systemctl stop`): checkpoint and hand over",
    "redis_restart": "Redis killed and started again (queued messages lost)",
    "postgres_restart": "PostgreSQL restarted (fast shutdown: every connection cut)",
    "connections_terminated": "every database connection of the service terminated (pg_terminate_backend)",
    "pause_resume": "a job paused, then resumed",
}
WORKERS = 2
# The kinds aimed at one job (the others hit the whole service).
TARGETED = ("training_sigkill", "worker_sigkill", "worker_sigstop", "worker_sigterm", "group_sigterm", "pause_resume")


@dataclass
class Fault:
    number: int
    kind: str
    at: float
    # The attempt each affected job was on when the fault landed: the next attempt is this fault's doing.
    attempts: dict[str, int] = field(default_factory=dict)
    skipped: str | None = None


@dataclass
class CampaignReport:
    seed: int
    faults: list[Fault]
    jobs: list[dict[str, Any]]
    reference: dict[str, Any]
    problems: list[str]
    lost_steps: dict[str, list[int]]
    seconds: float

    def summary(self) -> str:
        landed = [f for f in self.faults if f.skipped is None]
        lines = [f"seed {self.seed}: {len(landed)} faults on {len(self.jobs)} jobs in {self.seconds:.0f} s; "
                 f"{sum(j['status'] == 'succeeded' for j in self.jobs)} succeeded; {len(self.problems)} problems"]
        counts: dict[str, int] = defaultdict(int)
        for fault in landed:
            counts[fault.kind] += 1
        for kind in [*FAULT_KINDS, *(["unattributed"] if "unattributed" in self.lost_steps else [])]:
            lost = self.lost_steps.get(kind, [])
            mean = sum(lost) / len(lost) if lost else 0.0
            lines.append(f"  {kind:24s} {counts[kind]:3d} survived; hand-overs {len(lost):3d}, steps lost per "
                         f"hand-over mean {mean:5.1f} max {max(lost, default=0):3d}")
        lines += [f"  PROBLEM: {p}" for p in self.problems]
        return "\n".join(lines)


class Resilient:
    """API calls that wait out a database or API restart (503s, refused connections) instead of failing."""

    def __init__(self, service: Service) -> None:
        self.client = service.client()

    def call(self, method: str, url: str, *, timeout: float = 90, **kwargs: Any) -> httpx.Response:
        deadline = time.monotonic() + timeout
        while True:
            try:
                response = self.client.request(method, url, **kwargs)
                if response.status_code != 503:
                    return response
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{method} {url} failed for {timeout} s")
            time.sleep(0.5)

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(self.call("GET", f"/v1/fine_tuning/jobs/{job_id}").json())

    def events(self, job_id: str) -> list[dict[str, Any]]:
        """Oldest first."""
        events: list[dict[str, Any]] = []
        after = None
        while True:
            page = self.call("GET", f"/v1/fine_tuning/jobs/{job_id}/events",
                             params={"limit": 100, **({"after": after} if after else {})}).json()
            events += page["data"]
            if not page["has_more"]:
                return events[::-1]
            after = page["data"][-1]["id"]


class Campaign:
    def __init__(self, service: Service, postgres: PrivatePostgres, redis: PrivateRedis, *, seed: int,
                 say: Callable[[str], None] = print) -> None:
        self.service, self.postgres, self.redis = service, postgres, redis
        self.random, self.seed, self.say = random.Random(seed), seed, say
        self.api = Resilient(service)
        self.faults: list[Fault] = []
        self.body: dict[str, Any] = {}
        self.started_workers = len(service.workers)
        self.database = service.env["TUNEFORGE_DATABASE_URL"].rsplit("/", 1)[1]

    # ---- jobs ----
    def prepare(self, *, steps: int) -> None:
        """Upload the training file every job uses: the same job, so every final adapter must be the same."""
        file_id = self.api.call("POST", "/v1/files", files={"file": ("t.jsonl", jsonl(chat_lines(40)))},
                                data={"purpose": "fine-tune"}).json()["id"]
        self.body = {"model": "tiny-llama", "training_file": file_id, "seed": 7, "method": {
            "type": "supervised", "supervised": {"hyperparameters": {
                "n_epochs": max(1, steps // 20), "batch_size": 2, "save_steps": 10, "learning_rate": 1e-3}}}}

    def submit(self) -> str:
        response = self.api.call("POST", "/v1/fine_tuning/jobs", json=self.body)
        assert response.status_code == 200, response.text
        return str(response.json()["id"])

    def running(self, job_ids: list[str]) -> list[dict[str, Any]]:
        return [job for job in (self.api.job(j) for j in job_ids) if job["status"] == "running"]

    def stepping(self, job: dict[str, Any]) -> bool:
        """Whether the job's current attempt has reported a step."""
        page = self.api.call("GET", f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 10}).json()
        return any(e["type"] == "metrics" and (e.get("data") or {}).get("attempt") == job["attempt"]
                   for e in page["data"])

    # ---- workers ----
    def keep_workers(self) -> None:
        while len(self.service.live_workers()) < WORKERS:
            self.started_workers += 1
            self.service.start_worker(f"worker-{self.started_workers}")

    def worker_of(self, job_id: str) -> psutil.Process | None:
        for process in training_processes(job_id):
            worker = worker_of_attempt(process)
            if worker is not None and any(w.pid == worker.pid for w in self.service.live_workers()):
                return worker
        return None

    def _wait_gone(self, pid: int, timeout: float) -> None:
        worker = next((w for w in self.service.workers if w.pid == pid), None)
        if worker is not None:
            try:
                worker.wait(timeout=timeout)
            except Exception:  # noqa: BLE001 - a worker that will not stop is killed, and the campaign goes on
                os.killpg(pid, signal.SIGKILL)
                worker.wait()

    # ---- faults ----
    def inject(self, kind: str, job_ids: list[str]) -> Fault:
        fault = Fault(number=len(self.faults) + 1, kind=kind, at=time.monotonic())
        running = self.running(job_ids)
        fault.attempts = {job["id"]: job["attempt"] for job in running}
        target: dict[str, Any] | None = None
        if kind in TARGETED:
            # A crash counts against a job until it registers a new checkpoint: never three in a row on purpose.
            candidates = [j for j in running if kind != "training_sigkill" or j["crashes"] == 0]
            # Aimed at attempts that are training (not still loading), so the steps a fault costs are measured.
            candidates = [j for j in candidates if self.stepping(j)]
            candidates = [j for j in candidates if kind == "pause_resume" or self.worker_of(j["id"]) is not None]
            if not candidates:
                fault.skipped = "no running job to aim at"
                return fault
            target = self.random.choice(candidates)
            fault.attempts = {target["id"]: target["attempt"]} if kind == "training_sigkill" else fault.attempts
        if kind == "training_sigkill":
            assert target is not None
            for process in training_processes(target["id"]):
                process.send_signal(signal.SIGKILL)
        elif kind in ("worker_sigkill", "worker_sigterm", "group_sigterm", "worker_sigstop"):
            assert target is not None
            worker = self.worker_of(target["id"])
            if worker is None:
                fault.skipped = "the job's worker moved on"
                return fault
            # Every job on that worker is affected; with one job per worker, that is the target.
            fault.attempts = {target["id"]: target["attempt"]}
            if kind == "worker_sigkill":
                os.killpg(worker.pid, signal.SIGKILL)
                self._wait_gone(worker.pid, 10)
            elif kind == "worker_sigterm":
                worker.send_signal(signal.SIGTERM)
                self._wait_gone(worker.pid, 90)
            elif kind == "group_sigterm":
                os.killpg(worker.pid, signal.SIGTERM)
                self._wait_gone(worker.pid, 90)
            else:
                frozen = [worker, *worker.children(recursive=True)]
                for process in frozen:
                    process.send_signal(signal.SIGSTOP)
                lease = float(self.service.env["TUNEFORGE_LEASE_SECONDS"])
                timer = threading.Timer(lease + 4, lambda: [p.send_signal(signal.SIGCONT) for p in frozen
                                                            if p.is_running()])
                timer.start()
                timer.join()
        elif kind == "redis_restart":
            self.redis.restart(down_seconds=self.random.uniform(0.5, 3))
        elif kind == "postgres_restart":
            self.postgres.restart()
        elif kind == "connections_terminated":
            engine = create_engine(f"{self.postgres.url}/postgres", isolation_level="AUTOCOMMIT")
            with engine.connect() as conn:
                conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :db"),
                             {"db": self.database})
            engine.dispose()
        elif kind == "pause_resume":
            assert target is not None
            fault.attempts = {target["id"]: target["attempt"]}
            self.api.call("POST", f"/v1/fine_tuning/jobs/{target['id']}/pause")
            deadline = time.monotonic() + 90
            while self.api.job(target["id"])["status"] not in {"paused"} | TERMINAL:
                assert time.monotonic() < deadline, f"job {target['id']} did not pause"
                time.sleep(0.3)
            self.api.call("POST", f"/v1/fine_tuning/jobs/{target['id']}/resume")
        self.keep_workers()
        return fault

    def run(self, *, jobs: int, faults: int, steps: int, timeout: float = 1800) -> CampaignReport:
        """Keep `jobs` jobs in flight until `faults` faults have landed, then let them finish and check them."""
        started = time.monotonic()
        self.prepare(steps=steps)
        job_ids = [self.submit() for _ in range(jobs)]
        # Every kind once in each round of len(FAULT_KINDS), in a seeded order: a short run still has them all.
        kinds: list[str] = []
        while len(kinds) < faults:
            kinds += self.random.sample(list(FAULT_KINDS), len(FAULT_KINDS))
        landed = 0
        while landed < faults:
            assert time.monotonic() - started < timeout, f"campaign still injecting after {timeout} s"
            time.sleep(self.random.uniform(0.5, 3.0))
            active = [j for j in job_ids if self.api.job(j)["status"] not in TERMINAL]
            job_ids += [self.submit() for _ in range(jobs - len(active))]
            fault = self.inject(kinds[landed], job_ids)  # a skipped fault is tried again next round
            self.faults.append(fault)
            if fault.skipped is None:
                landed += 1
            self.say(f"fault {fault.number} ({landed}/{faults}) {fault.kind}"
                     + (f": skipped, {fault.skipped}" if fault.skipped else f" on {sorted(fault.attempts.items())}"))
        finals = [self.wait_terminal(j, deadline=started + timeout) for j in job_ids]
        reference_id = self.submit()  # the same job with no fault: what every adapter must equal
        reference = self.wait_terminal(reference_id, deadline=time.monotonic() + 600)
        problems, lost = self.check(finals, reference)
        return CampaignReport(seed=self.seed, faults=self.faults, jobs=finals, reference=reference,
                              problems=problems, lost_steps=lost, seconds=time.monotonic() - started)

    def wait_terminal(self, job_id: str, *, deadline: float) -> dict[str, Any]:
        while True:
            job = self.api.job(job_id)
            if job["status"] in TERMINAL or time.monotonic() > deadline:
                return job
            time.sleep(0.5)

    # ---- checks ----
    def adapter(self, job_id: str) -> dict[str, Any]:
        from safetensors.torch import load

        content = self.api.call("GET", f"/v1/fine_tuning/jobs/{job_id}/artifacts/adapter").content
        with tarfile.open(fileobj=io.BytesIO(content)) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("adapter_model.safetensors"))
            extracted = tar.extractfile(member)
            assert extracted is not None
            return dict(load(extracted.read()))

    def check(self, finals: list[dict[str, Any]], reference: dict[str, Any]) -> tuple[list[str], dict[str, list[int]]]:
        import torch

        problems: list[str] = []
        lost: dict[str, list[int]] = defaultdict(list)
        if reference["status"] != "succeeded":
            return [f"the fault-free reference job {reference['id']} ended {reference['status']}"], lost
        expected = self.adapter(reference["id"])
        for job in finals:
            job_id = job["id"]
            if job["status"] != "succeeded":
                problems.append(f"{job_id} ended {job['status']}: {job.get('error')}")
                continue
            problems += self.check_history(job_id, lost)
            adapter = self.adapter(job_id)
            if sorted(adapter) != sorted(expected) or not all(
                    torch.allclose(adapter[k], expected[k], rtol=1e-4, atol=1e-6) for k in expected):
                worst = max(float((adapter[k] - expected[k]).abs().max()) for k in expected if k in adapter)
                problems.append(f"{job_id}: final adapter differs from the fault-free run's (max |diff| {worst:.2e})")
        return problems, lost

    def check_history(self, job_id: str, lost: dict[str, list[int]]) -> list[str]:
        """Fencing and resume points, from the job's own events; steps lost at each hand-over, by fault kind."""
        problems: list[str] = []
        attempt, checkpoint = 0, 0
        last_step: dict[int, int] = {}
        resumed_at: dict[int, int] = {}
        for event in self.api.events(job_id):
            message, data = event["message"], event.get("data") or {}
            if message.startswith("Attempt ") and " started on " in message:
                attempt = int(data["attempt"])
                resumed_at[attempt] = checkpoint  # what a correct resume starts from (0: the beginning)
            elif message.startswith("Checkpoint saved at step"):
                checkpoint = max(checkpoint, int(data["step"]))
            elif message.startswith("Steps after ") and "are trained again" in message:
                # how far earlier attempts went past the checkpoint: their metrics of those steps are not listed
                for number, step in data["reached"].items():
                    if number.isdigit():
                        last_step[int(number)] = max(last_step.get(int(number), 0), int(step))
            elif message.startswith("resumed from checkpoint at step"):
                if int(data["step"]) != resumed_at.get(attempt):
                    problems.append(f"{job_id}: attempt {attempt} resumed at step {data['step']}, but the last "
                                    f"registered checkpoint when it started was step {resumed_at.get(attempt)}")
            elif event["type"] == "metrics":
                if data.get("attempt") == attempt and attempt not in last_step \
                        and int(data["step"]) != resumed_at[attempt] + 1:
                    problems.append(f"{job_id}: attempt {attempt} began at step {data['step']}, not at the step "
                                    f"after its checkpoint ({resumed_at[attempt]})")
                if data.get("attempt") != attempt:
                    problems.append(f"{job_id}: step {data['step']} reported by attempt {data.get('attempt')} "
                                    f"after attempt {attempt} started")
                last_step[int(data["attempt"])] = int(data["step"])
        for number in sorted(resumed_at)[1:]:
            before = number - 1
            # The fault that ended attempt `before`: one aimed at this job if any (a fault on the whole service
            # may land while a killed attempt still looks running), the latest of them.
            hits = [f for f in self.faults if f.skipped is None and f.attempts.get(job_id) == before]
            cause = ([f for f in hits if f.kind in TARGETED] or hits or [None])[-1]
            reached = last_step.get(before, resumed_at.get(before, 0))  # an attempt killed before its first step
            lost[cause.kind if cause else "unattributed"].append(max(0, reached - resumed_at[number]))
        return problems


def run_campaign(service: Service, postgres: PrivatePostgres, redis: PrivateRedis, *, seed: int, jobs: int,
                 faults: int, steps: int, say: Callable[[str], None] = print) -> CampaignReport:
    say(f"fault campaign: seed {seed}, {jobs} jobs in flight of {steps} steps, {faults} faults "
        f"(replay: the same seed draws the same kinds in the same order)")
    return Campaign(service, postgres, redis, seed=seed, say=say).run(jobs=jobs, faults=faults, steps=steps)
