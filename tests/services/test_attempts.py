from __future__ import annotations

import time

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.models import FineTuningJob, JobEvent
from app.services import attempts
from app.services.workers import WorkerSpec
from tests.factories import create_job

SETTINGS = Settings(lease_seconds=10, heartbeat_seconds=1, max_attempts=2)


def claim(session: Session, job: FineTuningJob, owner: str) -> FineTuningJob | None:
    """What a worker named owner does when job's message reaches it."""
    worker = WorkerSpec(name=owner, hostname="host", pid=1, queue=f"training.{owner}", version="test")
    return attempts.claim_next_job(session, worker=worker, settings=SETTINGS, message_job_id=job.id)


def test_claim_takes_a_queued_job_once(session: Session) -> None:
    job = create_job(session)
    claimed = claim(session, job, "w1")
    assert claimed is not None and claimed.status == "running" and claimed.attempt == 1
    assert claimed.lease_owner == "w1" and claimed.lease_expires_at > time.time()
    assert claim(session, job, "w2") is None


def test_writes_of_a_stale_attempt_are_rejected(session: Session) -> None:
    job = create_job(session)
    claim(session, job, "w1")
    # The lease expires and the reaper requeues; a second attempt claims the job.
    job.lease_expires_at = time.time() - 1
    session.commit()
    assert attempts.reap_expired_leases(session, settings=SETTINGS) == [job.id]
    second = claim(session, job, "w2")
    assert second is not None and second.attempt == 2
    with pytest.raises(attempts.StaleAttempt):
        attempts.record_event(session, job_pk=job.pk, attempt=1, message="late metrics")
    assert not attempts.renew_lease(session, job_pk=job.pk, attempt=1, settings=SETTINGS)
    with pytest.raises(attempts.StaleAttempt):
        attempts.finish_job(session, job_pk=job.pk, attempt=1, fine_tuned_model="ft:x", trained_tokens=1,
                            artifacts=[])
    assert attempts.requested_action(session, job_pk=job.pk, attempt=1) == "cancel"
    attempts.record_event(session, job_pk=job.pk, attempt=2, message="fresh metrics")
    messages = list(session.scalars(select(JobEvent.message).where(JobEvent.job_pk == job.pk)))
    assert "fresh metrics" in messages and "late metrics" not in messages


def crash(session: Session, job: FineTuningJob, reason: str = "killed") -> str:
    session.refresh(job)
    return attempts.requeue_after_crash(session, job_pk=job.pk, attempt=job.attempt, reason=reason, settings=SETTINGS)


def checkpoint(session: Session, job: FineTuningJob, step: int) -> None:
    session.refresh(job)
    attempts.register_checkpoint(session, job_pk=job.pk, attempt=job.attempt, step=step, metrics={"step": step},
                                 blob_key=f"k{step}-{job.attempt}", sha256="0" * 64, size=1)


def test_crashed_attempts_requeue_until_the_limit_then_fail(session: Session) -> None:
    job = create_job(session)
    claim(session, job, "w1")
    assert crash(session, job) == "queued"
    session.refresh(job)
    assert job.crashes == 1 and job.status == "queued"
    claim(session, job, "w1")
    assert crash(session, job, "the training process was killed (SIGKILL)") == "failed"
    session.refresh(job)
    assert job.status == "failed" and job.error is not None and job.error["code"] == "too_many_attempts"
    assert job.crashes == 2
    assert "died 2 times in a row" in job.error["message"]
    assert "the training process was killed (SIGKILL)" in job.error["message"]


def test_pauses_resumes_and_hand_offs_never_count_as_crashes(session: Session) -> None:
    from app.models import Project
    from app.services.jobs import pause_job, resume_job

    job = create_job(session)
    project = session.get(Project, job.project_pk)
    assert project is not None
    for _ in range(3):  # max_attempts is 2: three claims used to fail the job
        claim(session, job, "w1")
        pause_job(session, project=project, job_id=job.id)
        assert attempts.stop_after_checkpoint(session, job_pk=job.pk, attempt=job.attempt) == "paused"
        resume_job(session, project=project, job_id=job.id, settings=SETTINGS)
    for _ in range(3):  # a worker's graceful shutdown hands the job on
        claim(session, job, "w1")
        assert attempts.request_release(session, job_pk=job.pk, attempt=job.attempt)
        assert attempts.stop_after_checkpoint(session, job_pk=job.pk, attempt=job.attempt) == "queued"
    for _ in range(3):  # a worker host that died: the reaper takes the lease back
        claim(session, job, "w1")
        job.lease_expires_at = time.time() - 1
        session.commit()
        assert attempts.reap_expired_leases(session, settings=SETTINGS) == [job.id]
    claimed = claim(session, job, "w1")
    assert claimed is not None and claimed.status == "running" and claimed.attempt == 10 and claimed.crashes == 0


def test_a_new_checkpoint_resets_the_crash_count_and_a_repeated_one_does_not(session: Session) -> None:
    job = create_job(session)
    claim(session, job, "w1")
    checkpoint(session, job, 10)
    assert crash(session, job) == "queued"
    claim(session, job, "w1")
    checkpoint(session, job, 10)  # the resumed attempt saved the step it resumed from again: no progress
    session.refresh(job)
    assert job.crashes == 1
    checkpoint(session, job, 20)  # progress
    session.refresh(job)
    assert job.crashes == 0
    assert crash(session, job) == "queued"
    claim(session, job, "w1")
    assert crash(session, job) == "failed"


def test_a_release_does_not_override_a_users_pause(session: Session) -> None:
    from app.models import Project
    from app.services.jobs import pause_job

    job = create_job(session)
    claim(session, job, "w1")
    project = session.get(Project, job.project_pk)
    assert project is not None
    pause_job(session, project=project, job_id=job.id)
    assert not attempts.request_release(session, job_pk=job.pk, attempt=job.attempt)
    assert attempts.stop_after_checkpoint(session, job_pk=job.pk, attempt=job.attempt) == "paused"


def test_cancelled_job_tells_its_running_attempt_to_stop(session: Session) -> None:
    from app.models import Project
    from app.services.jobs import cancel_job

    job = create_job(session)
    claim(session, job, "w1")
    assert attempts.requested_action(session, job_pk=job.pk, attempt=1) == "continue"
    project = session.get(Project, job.project_pk)
    assert project is not None
    cancel_job(session, project=project, job_id=job.id)
    assert attempts.requested_action(session, job_pk=job.pk, attempt=1) == "cancel"
    assert not attempts.renew_lease(session, job_pk=job.pk, attempt=1, settings=SETTINGS)


def test_reaper_redispatches_jobs_whose_dispatch_was_lost(session: Session) -> None:
    waiting = create_job(session, status="queued", dispatched_at=None)
    recent = create_job(session, status="queued", dispatched_at=time.time())
    found = attempts.reap_expired_leases(session, settings=SETTINGS)
    assert waiting.id in found and recent.id not in found


def test_a_pause_asked_for_while_the_attempt_dies_holds(session: Session) -> None:
    """Found by the fault soak: a pause requested just before the worker died was forgotten by the next claim."""
    from app.models import Project
    from app.services.jobs import pause_job

    job = create_job(session)
    project = session.get(Project, job.project_pk)
    assert project is not None
    claim(session, job, "w1")
    pause_job(session, project=project, job_id=job.id)
    job.lease_expires_at = time.time() - 1  # the worker host died before the attempt could checkpoint
    session.commit()
    assert attempts.reap_expired_leases(session, settings=SETTINGS) == []  # nothing to dispatch: it is paused
    session.refresh(job)
    assert job.status == "paused" and job.requested_action is None
    for end in ("crash", "database"):  # the same when the attempt crashes or loses the database
        from app.services.jobs import resume_job

        resume_job(session, project=project, job_id=job.id, settings=SETTINGS)
        claim(session, job, "w1")
        pause_job(session, project=project, job_id=job.id)
        outcome = crash(session, job) if end == "crash" else attempts.requeue_after_database_loss(
            session, job_pk=job.pk, attempt=job.attempt)
        session.refresh(job)
        assert outcome == "paused" and job.status == "paused", end
