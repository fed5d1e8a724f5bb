"""Resource routing: which worker fits a job, which job a worker claims, and the no-fit event."""

from __future__ import annotations

import threading
import time
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.db import get_engine
from app.models import FineTuningJob, JobEvent, Project, Worker
from app.schemas.jobs import JobResources
from app.services import attempts
from app.services import workers as worker_service
from app.services.dispatch import dispatch_job, route
from tests.factories import create_job, create_project

SETTINGS = Settings(lease_seconds=10, heartbeat_seconds=1, max_attempts=2, max_running_jobs_per_project=0)


def needs(**values: Any) -> dict[str, Any]:
    return JobResources(**values).model_dump(mode="json")


def spec(name: str = "w1", **values: Any) -> worker_service.WorkerSpec:
    return worker_service.WorkerSpec(name=name, hostname="host", pid=1, queue=f"training.{name}", version="test",
                                     **values)


def add_worker(session: Session, name: str, **values: Any) -> Worker:
    return worker_service.register_worker(session, spec=spec(name, **values))


def events(session: Session, job: FineTuningJob) -> list[JobEvent]:
    return list(session.scalars(select(JobEvent).where(JobEvent.job_pk == job.pk).order_by(JobEvent.pk)))


def test_a_worker_fits_a_job_with_enough_gpus_memory_on_each_and_every_label() -> None:
    worker = spec(gpus=2, gpu_memory_gb=79.6, labels=("h100", "eu"))
    assert worker_service.worker_fits(JobResources(), worker)
    assert worker_service.worker_fits(JobResources(gpus=2, min_gpu_memory_gb=40, labels=["h100"]), worker)
    assert not worker_service.worker_fits(JobResources(gpus=4), worker)
    assert not worker_service.worker_fits(JobResources(gpus=1, min_gpu_memory_gb=80), worker)
    assert not worker_service.worker_fits(JobResources(labels=["h100", "us"]), worker)
    assert not worker_service.worker_fits(JobResources(gpus=1, min_gpu_memory_gb=8), spec(gpus=1))  # memory unknown


def test_claim_takes_the_highest_priority_then_the_oldest_job(session: Session) -> None:
    old_low = create_job(session, priority=0)
    new_high = create_job(session, priority=5)
    newer_high = create_job(session, priority=5)
    order = [attempts.claim_next_job(session, worker=spec(), settings=SETTINGS) for _ in range(3)]
    assert [j.id for j in order if j] == [new_high.id, newer_high.id, old_low.id]
    assert attempts.claim_next_job(session, worker=spec(), settings=SETTINGS) is None


def test_claim_prefers_the_messages_own_job_among_the_equally_best_only(session: Session) -> None:
    first = create_job(session)
    mine = create_job(session)
    claimed = attempts.claim_next_job(session, worker=spec(), settings=SETTINGS, message_job_id=mine.id)
    assert claimed is not None and claimed.id == mine.id
    urgent = create_job(session, priority=1)
    low = create_job(session, priority=-1)
    claimed = attempts.claim_next_job(session, worker=spec(), settings=SETTINGS, message_job_id=low.id)
    assert claimed is not None and claimed.id == urgent.id
    assert first.status == "queued"


def test_claim_waits_out_a_dispatch_writing_to_the_best_job_instead_of_running_a_lower_one(
        database_url: str) -> None:
    """Committed rows and real concurrent transactions: a dispatch records where the high-priority job's
    message went while the worker that got the message claims. Passing over the held row (SKIP LOCKED alone)
    ran the low-priority job first."""
    engine = get_engine()
    with Session(engine, expire_on_commit=False) as setup:
        project = create_project(setup, f"claim-race-{time.time_ns()}")
        low = create_job(setup, project=project, priority=0)
        high = create_job(setup, project=project, priority=10)
    try:
        with engine.connect() as dispatcher:
            dispatcher.execute(update(FineTuningJob).where(FineTuningJob.pk == high.pk)
                               .values(dispatched_at=time.time(), dispatch_queue="training.w1"))
            threading.Timer(0.5, dispatcher.commit).start()
            with Session(engine) as worker_session:
                claimed = attempts.claim_next_job(worker_session, worker=spec(), settings=SETTINGS)
                assert claimed is not None and claimed.id == high.id
            with Session(engine) as worker_session:  # a row held past the wait is left to its holder
                dispatcher.execute(update(FineTuningJob).where(FineTuningJob.pk == low.pk)
                                   .values(dispatched_at=time.time()))
                started = time.monotonic()
                assert attempts.claim_next_job(worker_session, worker=spec(), settings=SETTINGS) is None
                assert time.monotonic() - started < 10
            dispatcher.rollback()
    finally:
        with Session(engine) as cleanup:
            cleanup.execute(delete(JobEvent).where(JobEvent.job_pk.in_([low.pk, high.pk])))
            cleanup.execute(delete(FineTuningJob).where(FineTuningJob.pk.in_([low.pk, high.pk])))
            cleanup.execute(delete(Project).where(Project.pk == project.pk))
            cleanup.commit()


def test_claim_keeps_the_attempt_contract(session: Session) -> None:
    job = create_job(session)
    claimed = attempts.claim_next_job(session, worker=spec("gpu-a-0"), settings=SETTINGS)
    assert claimed is not None and claimed.id == job.id and claimed.attempt == 1
    assert claimed.status == "running" and claimed.lease_owner == "gpu-a-0"
    started = events(session, job)[-1]
    assert started.message == "Attempt 1 started on gpu-a-0." and started.data == {"attempt": 1, "worker": "gpu-a-0"}


def test_claim_skips_jobs_the_worker_does_not_fit(session: Session) -> None:
    needs_a100 = create_job(session, resources=needs(labels=["a100"]))
    needs_gpu = create_job(session, resources=needs(gpus=1, processes=1))
    anything = create_job(session)
    cpu = spec("cpu", labels=("cpu",))
    assert attempts.claim_next_job(session, worker=cpu, settings=SETTINGS).id == anything.id  # type: ignore[union-attr]
    assert attempts.claim_next_job(session, worker=cpu, settings=SETTINGS) is None
    a100 = spec("a100", gpus=1, gpu_memory_gb=40, labels=("a100",))
    assert attempts.claim_next_job(session, worker=a100, settings=SETTINGS).id == needs_a100.id  # type: ignore[union-attr]
    assert attempts.claim_next_job(session, worker=a100, settings=SETTINGS).id == needs_gpu.id  # type: ignore[union-attr]


def test_claim_skips_projects_at_their_running_jobs_limit(session: Session) -> None:
    limited = SETTINGS.model_copy(update={"max_running_jobs_per_project": 1})
    team_a, team_b = create_project(session, "team-a"), create_project(session, "team-b")
    create_job(session, project=team_a, status="running", attempt=1, lease_expires_at=time.time() + 60)
    a_waiting = create_job(session, project=team_a, priority=10)
    b_waiting = create_job(session, project=team_b)
    claimed = attempts.claim_next_job(session, worker=spec(), settings=limited, message_job_id=a_waiting.id)
    assert claimed is not None and claimed.id == b_waiting.id
    assert attempts.claim_next_job(session, worker=spec(), settings=limited) is None  # both projects full now
    assert [j[1] for j in attempts.claimable_jobs(session, worker=None, settings=SETTINGS)] == [a_waiting.id]


def test_a_job_with_many_attempts_but_no_crashes_is_still_claimed(session: Session) -> None:
    handed_on = create_job(session, attempt=7)  # paused, resumed and handed between workers
    claimed = attempts.claim_next_job(session, worker=spec(), settings=SETTINGS)
    assert claimed is not None and claimed.id == handed_on.id and claimed.attempt == 8


def test_a_job_no_live_worker_fits_says_so_once_until_the_workers_change(session: Session) -> None:
    job = create_job(session, resources=needs(gpus=2, min_gpu_memory_gb=40, labels=["a100"], processes=2),
                     dispatched_at=time.time())
    add_worker(session, "w1", labels=("cpu",))
    add_worker(session, "w2", gpus=1, gpu_memory_gb=24)
    assert dispatch_job(session, job_id=job.id, settings=SETTINGS) is False
    assert dispatch_job(session, job_id=job.id, settings=SETTINGS) is False
    warnings = [e for e in events(session, job) if e.level == "warn"]
    assert len(warnings) == 1
    assert warnings[0].message.startswith(
        "No worker can run this job: it asks for 2 GPUs with at least 40 GB each and label 'a100'; live workers: "
        "w1 (0 GPUs, labels cpu), w2 (1 GPU, 24 GB).")
    session.refresh(job)
    assert job.status == "queued" and job.dispatched_at is None  # the reaper routes it again next pass
    add_worker(session, "w3", gpus=1, gpu_memory_gb=80, labels=("a100",))  # still too few GPUs: reason changes
    assert dispatch_job(session, job_id=job.id, settings=SETTINGS) is False
    assert len([e for e in events(session, job) if e.level == "warn"]) == 2
    add_worker(session, "w4", gpus=2, gpu_memory_gb=80, labels=("a100",))
    assert route(session, job=job, needs=worker_service.needs_of(job.resources), settings=SETTINGS) == "training.w4"
    assert events(session, job)[-1].message == "A worker that can run this job is live: sent to w4."


def test_routing_prefers_idle_workers_then_fewer_waiting_jobs_then_the_smallest(session: Session) -> None:
    add_worker(session, "big", gpus=8, gpu_memory_gb=80)
    add_worker(session, "small", gpus=1, gpu_memory_gb=80)
    job = create_job(session, resources=needs(gpus=1, processes=1))
    job_needs = worker_service.needs_of(job.resources)
    assert route(session, job=job, needs=job_needs, settings=SETTINGS) == "training.small"
    create_job(session, resources=needs(gpus=1, processes=1), dispatch_queue="training.small")
    assert route(session, job=job, needs=job_needs, settings=SETTINGS) == "training.big"
    worker_service.set_current_job(session, name="big", job_id="ftjob-x")
    assert route(session, job=job, needs=job_needs, settings=SETTINGS) == "training.small"


def test_workers_are_live_while_they_heartbeat_and_not_draining(session: Session) -> None:
    add_worker(session, "w1", labels=("a",))
    add_worker(session, "w2")
    assert [w.name for w in worker_service.live_workers(session, settings=SETTINGS)] == ["w1", "w2"]
    assert worker_service.record_heartbeat(session, name="w2", draining=True)
    stale = worker_service.get_worker(session, name="w1")
    assert stale is not None
    stale.heartbeat_at = time.time() - SETTINGS.resolved_worker_stale_seconds - 1
    session.commit()
    assert not worker_service.is_live(stale, settings=SETTINGS)
    assert worker_service.live_workers(session, settings=SETTINGS) == []
    assert worker_service.record_heartbeat(session, name="w1")
    assert [w.name for w in worker_service.live_workers(session, settings=SETTINGS)] == ["w1"]
    assert not worker_service.record_heartbeat(session, name="never-registered")


def test_registering_again_replaces_the_row_and_forgets_long_dead_workers(session: Session) -> None:
    add_worker(session, "w1", labels=("old",))
    dead = add_worker(session, "dead")
    dead.heartbeat_at = time.time() - worker_service.FORGET_AFTER_SECONDS - 1
    session.commit()
    add_worker(session, "w1", labels=("new",), gpus=1)
    rows = worker_service.list_workers(session)
    assert [(w.name, w.labels, w.gpus, w.status) for w in rows] == [("w1", ["new"], 1, "idle")]
    worker_service.set_current_job(session, name="w1", job_id="ftjob-1")
    assert worker_service.get_worker(session, name="w1").status == "busy"  # type: ignore[union-attr]
    worker_service.remove_worker(session, name="w1")
    assert worker_service.list_workers(session) == []


def test_stale_worker_setting_defaults_to_three_heartbeats_and_at_least_fifteen_seconds() -> None:
    assert Settings(heartbeat_seconds=1).resolved_worker_stale_seconds == 15
    assert Settings(heartbeat_seconds=10, lease_seconds=60).resolved_worker_stale_seconds == 30
    assert Settings(worker_stale_seconds=5).resolved_worker_stale_seconds == 5
