"""Service benchmark: a job through the whole service beside the same training run called directly, and queue pickup.

    python -m bench.service            # the figures in docs/benchmarks.md (~26M-parameter model, ~15 min on 2 cores)
    python -m bench.service --quick    # CI smoke run on the tests' tiny model (< 60 s; no timing assertion)

It creates a Postgres database of its own (tuneforge_bench_svc_<pid>, migrated, dropped at the end), a Redis
queue of its own, and starts `tuneforge api` and one `tuneforge worker` as separate processes, as the
integration tests do (database storage backend; every other setting at its default but the rate limit,
lifted for the fast polling below). Then, with the same model, data and resolved TrainingConfig (the API's
own resolve_training_config), alternating the two `--repeats` times (the service's processes stay up, idle,
while a direct run goes):

- direct: `worker.training.recipe.train` in a fresh Python process (the service's attempt process starts
  fresh too), timed by the parent from the spawn to the reaped exit; inside it, train() and the wall-clock
  times of the first and the last step's metrics;
- service: POST /v1/fine_tuning/jobs until a GET shows "succeeded" (dispatch, file validation and token
  statistics, claim, the attempt process, model load, per-step events, checkpoint and artifact uploads to
  the database); the client polls every 20 ms until step 1 is done, then every 250 ms (progress.step gives
  the first and the last step); the job's own events give a coarser breakdown (created_at: whole seconds);
- pickup: each service job plus small jobs on the tiny model (a new file each), one at a time, posted only
  when the worker is idle (no attempt process left): POST -> "queued" (delivered, files validated) ->
  "running" (claimed: the "Attempt 1 started" event). "worker busy after succeeded" is how long the
  attempt process lives on after the job says succeeded (the next queued job waits for it).

CPU seconds: direct = the child process's rusage; service = the API and worker processes' CPU over the job,
including the worker's reaped children (the attempt process). Torch's threads spin while they wait for
cores, so on a shared machine CPU seconds move with the load as well.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
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

from app.core.processes import stop_process
from app.schemas.training import HYPERPARAMETER_FIELDS
from tests.support.databases import create_database, drop_database
from tests.support.processes import free_port, wait_until_up
from tests.support.service import TERMINAL, is_warm_start_process

REDIS = os.environ.get("TUNEFORGE_TEST_REDIS", "redis://127.0.0.1:6379")
# The recipe's event said as its training loop starts (worker/training/recipe.py setup_model): set-up is over.
LOOP_EVENT = "training "
WORDS = tuple(" ".join([
    "the a of to and in is for on with as by at from it this that be are have not but or one all there what so",
    "up out if about who can will make like time just know take people into year good some could see other than",
    "then now look only come over think also back after use two how work first well way new want because any",
    "these give day most model data train answer question code value number system user tool message result text",
    "word line file test run step loss learn rate small large fast slow red blue green apple river stone cloud",
    "music city house water light paper window garden"]).split(" "))


@dataclass(frozen=True)
class Setup:
    """What one benchmark mode trains."""

    model: dict[str, Any]  # make_tiny_model keyword arguments ({} = the tests' tiny model)
    n_examples: int
    median_words: int  # assistant answer length, lognormal around this
    hyperparameters: dict[str, Any]
    adapter: dict[str, Any]
    pickup_jobs: int  # extra small jobs for the pickup figure (each main job is one more sample)
    warmup_job: bool  # run one unmeasured small job first
    repeats: int  # direct and service runs, alternated
    # Seconds between status polls once the job runs: the service's "steps 2.." is measured to this resolution, so a
    # run whose steps take less than a poll (the quick one) polls faster.
    poll_after: float = 0.25


# ~26M parameters (bench/train.py's model): steps of a few seconds, so the run lasts a few minutes here.
FULL = Setup(model={"hidden": 512, "layers": 8, "heads": 8, "kv_heads": 4, "intermediate": 1536,
                    "initializer_range": 0.04},
             n_examples=192, median_words=120,
             hyperparameters={"n_epochs": 3, "batch_size": 8, "learning_rate": 1e-3, "n_checkpoints": 3},
             adapter={"type": "lora", "r": 16, "alpha": 32, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]},
             pickup_jobs=5, warmup_job=True, repeats=2)
QUICK = Setup(model={}, n_examples=24, median_words=4,
              hyperparameters={"n_epochs": 2, "batch_size": 4, "learning_rate": 2e-3, "n_checkpoints": 2},
              adapter={"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
              pickup_jobs=0, warmup_job=False, repeats=1, poll_after=0.01)
PICKUP_HYPERPARAMETERS = {"n_epochs": 1, "batch_size": 4, "learning_rate": 2e-3}


# ---------------------------------------------------------------- data
def chat_examples(n: int, *, median_words: int, seed: int) -> list[dict[str, Any]]:
    """n chat examples with answers of lognormal length around median_words (deterministic)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = max(2, min(8 * median_words, round(rng.lognormvariate(0, 0.6) * median_words)))
        answer = " ".join(rng.choice(WORDS) for _ in range(words))
        rows.append({"messages": [{"role": "system", "content": "You answer in the house style."},
                                  {"role": "user", "content": f"question {i}: " + " ".join(rng.sample(WORDS, 6))},
                                  {"role": "assistant", "content": answer.capitalize() + "."}]})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- direct run (child process)
def direct_child(config_file: str, model_dir: str, train_file: str, output_dir: str) -> None:
    """Run train() once in this fresh process and print its timings (wall-clock times) as one JSON line."""
    from app.schemas.training import TrainingConfig
    from tests.support.reporters import RecordingReporter
    from worker.training.recipe import train

    class TimedReporter(RecordingReporter):
        """Notes when the first and the last step's metrics arrive."""

        loop_at: float = 0.0
        first_step_at: float = 0.0
        last_step_at: float = 0.0

        def event(self, message: str, **kwargs: Any) -> None:
            super().event(message, **kwargs)
            if message.startswith(LOOP_EVENT) and not self.loop_at:
                self.loop_at = time.time()

        def metrics(self, data: dict[str, Any]) -> None:
            super().metrics(data)
            self.last_step_at = time.time()
            self.first_step_at = self.first_step_at or self.last_step_at

    config = TrainingConfig.model_validate_json(Path(config_file).read_text())
    reporter = TimedReporter()
    called_at = time.time()
    result = train(config, model_path=Path(model_dir), train_file=Path(train_file), validation_file=None,
                   output_dir=Path(output_dir), reporter=reporter)
    print(json.dumps({"called_at": called_at, "returned_at": time.time(), "loop_at": reporter.loop_at,
                      "first_step_at": reporter.first_step_at,
                      "last_step_at": reporter.last_step_at, "steps": result.steps,
                      "checkpoints": len(reporter.checkpoints), "tokens": result.trained_tokens}), flush=True)


def run_direct(config_file: Path, model_dir: Path, train_file: Path, output_dir: Path) -> dict[str, float]:
    """The direct run in a fresh process: wall and CPU seconds end to end, and its phases."""
    with tempfile.TemporaryFile() as err:
        started_at = time.time()
        child = subprocess.Popen([sys.executable, "-m", "bench.service", "--direct-child", str(config_file),
                                  str(model_dir), str(train_file), str(output_dir)], stdout=subprocess.PIPE,
                                 stderr=err)
        assert child.stdout is not None
        out = child.stdout.read()
        _pid, status, usage = os.wait4(child.pid, 0)
        exited_at = time.time()
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            err.seek(0)
            tail = err.read().decode(errors="replace")[-3000:]
            raise RuntimeError(f"direct run failed ({child.returncode}):\n{tail}")
    t = json.loads(out.decode().strip().splitlines()[-1])
    return {"wall": exited_at - started_at, "cpu": usage.ru_utime + usage.ru_stime,
            "train": t["returned_at"] - t["called_at"], "to_loop": t["loop_at"] - started_at,
            "to_first_step": t["first_step_at"] - started_at, "first_step": t["first_step_at"] - t["loop_at"],
            "later_steps": t["last_step_at"] - t["first_step_at"], "after_last_step": exited_at - t["last_step_at"],
            "exit": exited_at - t["returned_at"], "steps": t["steps"], "checkpoints": t["checkpoints"],
            "tokens": t["tokens"]}


# ---------------------------------------------------------------- service
def _cpu_seconds(process: psutil.Process) -> float:
    """User + system CPU of the process and of its children that it has waited for."""
    t = process.cpu_times()
    return t.user + t.system + t.children_user + t.children_system


@dataclass
class ServiceRun:
    post_to_queued: float
    post_to_running: float
    post_to_first_step: float  # until a GET first shows progress.step >= 1
    running_to_loop: float  # claimed (a GET first shows running) -> a GET of the events first shows LOOP_EVENT
    running_to_first_step: float  # claimed -> the GET that first shows step 1
    later_steps: float  # from that GET to the first one showing the last step
    post_to_terminal: float
    cpu: float
    status: str
    events: list[dict[str, Any]]  # oldest first
    config: dict[str, Any]
    worker_busy_after: float  # from the job's terminal status until its attempt process had exited


def attempt_processes(worker: psutil.Process) -> list[psutil.Process]:
    """The worker's training processes: its children and their children, but its warm-start process itself
    (worker/zygote.py), which lives as long as the worker."""
    return [process for process in worker.children(recursive=True) if not is_warm_start_process(process)]


def wait_until_idle(worker: psutil.Process, *, quiet: float = 1.0, timeout: float = 120.0) -> float:
    """Wait until the worker has had no training process for `quiet` seconds; returns when the last one exited."""
    deadline = time.perf_counter() + timeout
    last_seen = time.perf_counter()
    while time.perf_counter() < deadline:
        if attempt_processes(worker):
            last_seen = time.perf_counter()
        elif time.perf_counter() - last_seen >= quiet:
            return last_seen
        time.sleep(0.05)
    raise TimeoutError(f"the worker still had a child process after {timeout} s")


def run_service_job(client: httpx.Client, body: dict[str, Any], *, api: psutil.Process, worker: psutil.Process,
                    poll_running: float = 0.02, poll_after: float = 0.25, timeout: float = 1800.0) -> ServiceRun:
    """POST one job to an idle worker and poll it to the end: fast until it runs, then as a client following a
    job would; returns once the worker is idle again."""
    # A warm-started attempt is the child of the worker's zygote, which reaps it: its CPU is the zygote's.
    processes = [api, worker, *(p for p in worker.children() if is_warm_start_process(p))]
    cpu_before = sum(_cpu_seconds(p) for p in processes)
    started = time.perf_counter()
    response = client.post("/v1/fine_tuning/jobs", json=body)
    response.raise_for_status()
    job_id = response.json()["id"]
    queued = running = loop = first_step = last_step = None
    deadline = started + timeout
    while time.perf_counter() < deadline:
        job = client.get(f"/v1/fine_tuning/jobs/{job_id}").raise_for_status().json()
        now = time.perf_counter()
        if job["status"] != "validating_files" and queued is None:
            queued = now
        if job["status"] not in ("validating_files", "queued") and running is None:
            running = now
        step, total = job["progress"]["step"], job["progress"]["total_steps"]
        if running is not None and loop is None:  # set-up over: the loop's event (or step 1) is there
            newest = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 20}).raise_for_status()
            if step >= 1:  # seen with step 1 in the same poll: no later than step 1
                loop = now
            elif any(e["message"].startswith(LOOP_EVENT) for e in newest.json()["data"]):
                loop = time.perf_counter()
        if step >= 1 and first_step is None:
            first_step = now
        if total and step >= total and last_step is None:
            last_step = now
        if job["status"] in TERMINAL:
            break
        time.sleep(poll_running if first_step is None else poll_after)
    else:
        raise TimeoutError(f"job {job_id} still {job['status']} after {timeout} s")
    finished = time.perf_counter()
    # The attempt process exits after it has recorded the outcome; its CPU counts once the worker reaped it.
    exited = wait_until_idle(worker)
    cpu = sum(_cpu_seconds(p) for p in processes) - cpu_before
    events = all_events(client, job_id)
    assert queued is not None and running is not None and loop is not None and first_step is not None
    assert last_step is not None
    return ServiceRun(post_to_queued=queued - started, post_to_running=running - started,
                      post_to_first_step=first_step - started, running_to_loop=loop - running,
                      running_to_first_step=first_step - running,
                      later_steps=last_step - first_step,
                      post_to_terminal=finished - started, cpu=cpu, status=job["status"], events=events[::-1],
                      config=job["method"]["supervised"], worker_busy_after=max(0.0, exited - finished))


def all_events(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    """Every event of a job, newest first."""
    events: list[dict[str, Any]] = []
    after = None
    while True:
        page = client.get(f"/v1/fine_tuning/jobs/{job_id}/events",
                          params={"limit": 100, **({"after": after} if after else {})}).raise_for_status().json()
        events += page["data"]
        if not page["has_more"]:
            return events
        after = page["data"][-1]["id"]


def event_breakdown(events: list[dict[str, Any]]) -> dict[str, float]:
    """Phases of a job from its events' created_at (whole seconds): start of each phase to the next."""

    def first(prefix: str) -> int:
        return next(e["created_at"] for e in events if e["message"].startswith(prefix))

    created = first("Created fine-tuning job")
    running = first("Attempt 1 started")
    loop = first(LOOP_EVENT)
    last_step = [e["created_at"] for e in events if e["type"] == "metrics"][-1]
    done = events[-1]["created_at"]
    return {"created -> running": running - created, "running -> training loop": loop - running,
            "training loop": last_step - loop, "loop end -> succeeded": done - last_step}


def run_pickup_job(client: httpx.Client, path: Path, *, seed: int, api: psutil.Process, worker: psutil.Process
                   ) -> ServiceRun:
    """A small job on the tiny model with a file of its own (token statistics are computed per file)."""
    file_id = upload(client, write_jsonl(path, chat_examples(12, median_words=4, seed=seed)))
    run = run_service_job(client, {"model": "tiny-llama", "training_file": file_id,
                                   "hyperparameters": PICKUP_HYPERPARAMETERS}, api=api, worker=worker)
    assert run.status == "succeeded", run.events[-3:]
    return run


def wait_for_line(log: Path, text: str, process: subprocess.Popen[bytes], timeout: float = 90.0) -> None:
    """Wait until `text` appears in the log (the Celery worker's "ready." line)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode}; see {log}")
        if log.exists() and text in log.read_text(errors="replace"):
            return
        time.sleep(0.1)
    raise TimeoutError(f"{text!r} did not appear in {log} within {timeout} s")


def upload(client: httpx.Client, path: Path) -> str:
    with open(path, "rb") as f:
        response = client.post("/v1/files", files={"file": (path.name, f)}, data={"purpose": "fine-tune"})
    response.raise_for_status()
    file = response.json()
    assert file["status"] == "processed", file
    return str(file["id"])


# ---------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="tuneforge service overhead and queue pickup benchmark.")
    parser.add_argument("--quick", action="store_true", help="CI smoke run on the tests' tiny model (< 60 s)")
    parser.add_argument("--dir", type=Path, default=None, help="scratch directory (default: a temp dir, removed)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="direct and service runs, alternated (default 2, --quick 1); the report shows medians")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (API and worker logs)")
    parser.add_argument("--direct-child", nargs=4, metavar=("CONFIG", "MODEL", "TRAIN", "OUTPUT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.direct_child:
        direct_child(*args.direct_child)
        return
    setup = QUICK if args.quick else FULL

    from app.schemas.jobs import JobCreate
    from app.services.jobs import resolve_training_config
    from worker.training.tiny_model import make_tiny_model

    root = Path(tempfile.mkdtemp(prefix="bench-service-", dir=args.dir))
    name = f"tuneforge_bench_svc_{os.getpid()}"
    processes: list[subprocess.Popen[bytes]] = []
    try:
        database_url = create_database(name)
        tiny_dir = make_tiny_model(root / "models" / "tiny-llama")
        model_dir = make_tiny_model(root / "models" / "bench-model", **setup.model) if setup.model else tiny_dir
        train_file = write_jsonl(root / "train.jsonl", chat_examples(setup.n_examples,
                                                                       median_words=setup.median_words, seed=0))
        catalogue = root / "catalogue.json"
        catalogue.write_text(json.dumps({"tiny-llama": {"path": str(tiny_dir)},
                                         "bench-model": {"path": str(model_dir)}}))
        body = {"model": "bench-model", "training_file": "", "seed": 42,
                "method": {"type": "supervised", "supervised": {"hyperparameters": setup.hyperparameters,
                                                                "adapter": setup.adapter}}}
        config = resolve_training_config(JobCreate.model_validate({**body, "training_file": "file-x"}),
                                         n_examples=setup.n_examples)
        config_file = root / "config.json"
        config_file.write_text(config.model_dump_json())

        env = {**{k: v for k, v in os.environ.items() if not k.startswith("WANDB_")},
               "TUNEFORGE_DATABASE_URL": database_url, "TUNEFORGE_BROKER_URL": f"{REDIS}/11",
               "TUNEFORGE_DATA_DIR": str(root / "data"), "TUNEFORGE_CATALOGUE_FILE": str(catalogue),
               "TUNEFORGE_STORAGE_BACKEND": "database", "TUNEFORGE_REQUIRE_API_KEYS": "true",
               "TUNEFORGE_TRAINING_QUEUE": f"bench-svc-{os.getpid()}",
               # The pickup figure polls every 20 ms; the default 600 requests/minute would answer 429.
               "TUNEFORGE_RATE_LIMIT_PER_MINUTE": "100000", "TUNEFORGE_RATE_LIMIT_BURST": "10000"}
        from app.cli import run_migrations

        run_migrations(env["TUNEFORGE_DATABASE_URL"])
        created = subprocess.run([sys.executable, "-m", "app.cli", "keys", "create", "bench"], env=env, check=True,
                                 capture_output=True, text=True)
        key = json.loads(created.stdout.strip().splitlines()[-1])["key"]

        # ---- the service: API and worker processes, idle while the direct runs go ----
        port = free_port()
        with open(root / "api.log", "ab") as log:
            api = subprocess.Popen([sys.executable, "-m", "app.cli", "api", "--port", str(port)], env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
        processes.append(api)
        with open(root / "worker.log", "ab") as log:
            worker = subprocess.Popen([sys.executable, "-m", "app.cli", "worker"], env=env, stdout=log,
                                      stderr=subprocess.STDOUT)
        processes.append(worker)
        base = f"http://127.0.0.1:{port}"
        wait_until_up(f"{base}/healthz", process=api, timeout=90.0)
        wait_for_line(root / "worker.log", " ready.", worker)
        procs = {"api": psutil.Process(api.pid), "worker": psutil.Process(worker.pid)}
        directs: list[dict[str, float]] = []
        services: list[ServiceRun] = []
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60) as client:
            if setup.warmup_job:
                # The first job after a worker starts pays first-use costs (imports, connections): not measured.
                run_pickup_job(client, root / "warmup.jsonl", seed=99, **procs)
            service_file = upload(client, train_file)
            for repeat in range(args.repeats or setup.repeats):
                directs.append(run_direct(config_file, model_dir, train_file, root / f"direct-{repeat}"))
                run = run_service_job(client, {**body, "training_file": service_file}, poll_after=setup.poll_after,
                                      **procs)
                assert run.status == "succeeded", run.events[-3:]
                resolved = config.model_dump(mode="json", include=set(HYPERPARAMETER_FIELDS))
                assert run.config["hyperparameters"] == resolved, \
                    "the service resolved a different training config than the direct run used"
                services.append(run)
            pickups = list(services)
            for i in range(setup.pickup_jobs):
                pickups.append(run_pickup_job(client, root / f"pickup-{i}.jsonl", seed=100 + i, **procs))
        print_report(setup, directs=directs, services=services, pickups=pickups, model_dir=model_dir)
    finally:
        for process in processes:
            stop_process(process, grace=30)
        drop_database(name)
        _forget_queue(f"bench-svc-{os.getpid()}")
        if args.keep:
            print(f"scratch directory kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def _forget_queue(queue: str) -> None:
    """Remove the Celery queue's bookkeeping keys (kombu bindings) from the bench's Redis database."""
    import redis

    client = redis.Redis.from_url(f"{REDIS}/11")
    try:
        keys = list(client.scan_iter(match=f"*{queue}*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def _parameters(model_dir: Path) -> int:
    import math

    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118


def print_report(setup: Setup, *, directs: list[dict[str, float]], services: list[ServiceRun],
                 pickups: list[ServiceRun], model_dir: Path) -> None:
    import torch
    import transformers

    def median(values: list[float]) -> float:
        return float(statistics.median(values))

    direct = {k: median([d[k] for d in directs]) for k in directs[0]}
    phases = [event_breakdown(run.events) for run in services]
    service = {"wall": median([r.post_to_terminal for r in services]), "cpu": median([r.cpu for r in services]),
               "pickup": median([r.post_to_running for r in services]),
               "to_first_step": median([r.post_to_first_step for r in services]),
               "claimed_to_loop": median([r.running_to_loop for r in services]),
               "claimed_to_first_step": median([r.running_to_first_step for r in services]),
               "later_steps": median([r.later_steps for r in services]),
               "after_last_step": median([r.post_to_terminal - r.post_to_first_step - r.later_steps
                                          for r in services]),
               **{k: median([p[k] for p in phases]) for k in phases[0]}}
    checkpoints = sum(1 for e in services[0].events if e["message"].startswith("Checkpoint saved"))
    print(f"machine: {os.cpu_count()} CPUs ({platform.machine()}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, python "
          f"{platform.python_version()}; load average {os.getloadavg()[0]:.1f}")
    print(f"model: {_parameters(model_dir):,} parameters; data: {setup.n_examples} chat examples, "
          f"{int(direct['tokens']):,} trained tokens; {int(direct['steps'])} steps, {checkpoints} checkpoints "
          f"(direct: {int(direct['checkpoints'])}); hyperparameters {json.dumps(setup.hyperparameters)}, "
          f"adapter {json.dumps(setup.adapter)}; {len(directs)} direct and {len(services)} service run(s), "
          "medians below")
    header = f"{'measure':<46}{'seconds':>10}{'cpu s':>9}"
    print(header)
    print("-" * len(header))
    steps = int(direct["steps"])
    rows: list[tuple[str, float, float | None]] = [
        ("direct: fresh process, end to end", direct["wall"], direct["cpu"]),
        ("direct: train() in that process", direct["train"], None),
        ("direct: start -> training loop starts", direct["to_loop"], None),
        ("direct: step 1 (from the loop's start)", direct["first_step"], None),
        ("direct: start -> step 1 done", direct["to_first_step"], None),
        (f"direct: steps 2..{steps}", direct["later_steps"], None),
        ("direct: last step -> process exit", direct["after_last_step"], None),
        ("direct: interpreter exit after train()", direct["exit"], None),
        ("service: POST -> succeeded", service["wall"], service["cpu"]),
        ("service: POST -> running (pickup)", service["pickup"], None),
        ("service: POST -> step 1 done", service["to_first_step"], None),
        ("service: claimed -> training loop (warm start)", service["claimed_to_loop"], None),
        ("service: claimed -> step 1 done", service["claimed_to_first_step"], None),
        (f"service: steps 2..{steps}", service["later_steps"], None),
        ("service: last step -> succeeded", service["after_last_step"], None),
        *((f"service events: {phase}", service[phase], None) for phase in phases[0]),
    ]
    running = [p.post_to_running for p in pickups]
    rows += [
        (f"pickup POST -> running, {len(running)} jobs: median", median(running), None),
        (f"pickup POST -> running, {len(running)} jobs: max", max(running), None),
        (f"pickup POST -> queued, {len(running)} jobs: median", median([p.post_to_queued for p in pickups]), None),
        ("worker busy after succeeded (attempt exit)", median([p.worker_busy_after for p in pickups]), None),
    ]
    for label, seconds, cpu in rows:
        print(f"{label:<46}{seconds:>10.2f}{(f'{cpu:.2f}' if cpu is not None else '-'):>9}")
    if len(services) > 1:
        print("each run: " + "; ".join(f"direct {d['wall']:.1f} s / service {r.post_to_terminal:.1f} s = "
                                       f"{r.post_to_terminal / d['wall']:.3f}" for d, r in zip(directs, services,
                                                                                              strict=True)))
    overhead = service["wall"] / direct["wall"]
    fixed = (service["wall"] - service["later_steps"]) - (direct["wall"] - direct["later_steps"])
    print(f"ratios: service/direct fresh process wall {overhead:.3f} (target <= 1.15), CPU "
          f"{service['cpu'] / direct['cpu']:.3f}; service/in-process train() {service['wall'] / direct['train']:.3f}; "
          f"steps 2..{steps} service/direct {service['later_steps'] / direct['later_steps']:.3f}; outside those "
          f"steps the service takes {fixed:+.1f} s more")
    one_step = direct["later_steps"] / max(steps - 1, 1)
    print(f"targets: overhead <= 1.15x: {overhead:.3f}x; pickup < 2 s: median {median(running):.2f} s, max "
          f"{max(running):.2f} s; claimed -> first step starts <= 2 s: {service['claimed_to_loop']:.2f} s "
          f"(runs {', '.join(f'{r.running_to_loop:.2f}' for r in services)}) "
          f"(tiny-model jobs: median {median([p.running_to_loop for p in pickups]):.2f} s; direct fresh process: "
          f"{direct['to_loop']:.2f} s); claimed -> step 1 done {service['claimed_to_first_step']:.2f} s, step 1 "
          f"itself {direct['first_step']:.2f} s in the direct run (its batch; the mean step {one_step:.2f} s)")


if __name__ == "__main__":
    main()
