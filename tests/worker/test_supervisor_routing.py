"""Messages versus queued jobs: a message that did not start its own job sends it on, and an ended
attempt wakes the next jobs (real Postgres, real Redis)."""

from __future__ import annotations

import time

import pytest
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.services import attempts
from app.services.workers import WorkerSpec, register_worker
from tests.factories import create_job, create_project
from worker import registration, supervisor

SETTINGS = Settings(lease_seconds=10, heartbeat_seconds=1, max_running_jobs_per_project=1)
ME = WorkerSpec(name="w-me", hostname="host", pid=1, queue="training.w-me", version="test")


@pytest.fixture(autouse=True)
def this_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registration, "_spec", ME)


def test_a_message_that_started_another_job_sends_its_own_job_on(session: Session) -> None:
    mine = create_job(session, project=create_project(session, "team-a"))
    urgent = create_job(session, project=create_project(session, "team-b"), priority=5)
    claimed = attempts.claim_next_job(session, worker=ME, settings=SETTINGS, message_job_id=mine.id)
    assert claimed is not None and claimed.id == urgent.id
    supervisor._pass_on(session, message_job_id=mine.id, claimed_job_id=urgent.id, settings=SETTINGS)
    session.refresh(mine)
    assert mine.dispatched_at is not None and mine.dispatch_queue == SETTINGS.training_queue


def test_a_message_for_a_job_this_worker_does_not_fit_routes_it_to_one_that_does(session: Session) -> None:
    register_worker(session, spec=WorkerSpec(name="w-a100", hostname="h", pid=2, queue="training.w-a100",
                                             version="t", labels=("a100",)))
    needs_a100 = create_job(session, resources={"gpus": 0, "labels": ["a100"], "processes": 1})
    assert attempts.claim_next_job(session, worker=ME, settings=SETTINGS, message_job_id=needs_a100.id) is None
    supervisor._pass_on(session, message_job_id=needs_a100.id, claimed_job_id=None, settings=SETTINGS)
    session.refresh(needs_a100)
    assert needs_a100.dispatch_queue == "training.w-a100"


def test_a_job_waiting_for_its_projects_slot_is_not_sent_around(session: Session) -> None:
    team = create_project(session, "team-a")
    create_job(session, project=team, status="running", attempt=1, lease_expires_at=time.time() + 60)
    waiting = create_job(session, project=team)
    assert attempts.claim_next_job(session, worker=ME, settings=SETTINGS, message_job_id=waiting.id) is None
    supervisor._pass_on(session, message_job_id=waiting.id, claimed_job_id=None, settings=SETTINGS)
    session.refresh(waiting)
    assert waiting.dispatched_at is None


def test_an_ended_attempt_wakes_this_workers_next_job_and_its_projects_next(session: Session) -> None:
    team_a, team_b = create_project(session, "team-a"), create_project(session, "team-b")
    a_next = create_job(session, project=team_a, resources={"gpus": 0, "labels": ["elsewhere"], "processes": 1})
    b_next = create_job(session, project=team_b)
    register_worker(session, spec=WorkerSpec(name="w-else", hostname="h", pid=3, queue="training.w-else",
                                             version="t", labels=("elsewhere",)))
    supervisor._wake_next(session, project_pk=team_a.pk, settings=SETTINGS)
    session.refresh(a_next)
    session.refresh(b_next)
    assert b_next.dispatch_queue == "training.w-me"  # the best job this worker can run, to its own queue
    assert a_next.dispatch_queue == "training.w-else"  # the project's freed slot, routed where it fits
