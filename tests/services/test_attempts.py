from __future__ import annotations

import json
import time

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.models import FineTuningJob, JobEvent
from app.services import attempts
from app.services.workers import WorkerSpec
from tests.factories import create_job
from tests.support.races import landing_before

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


def _worker_moves_it_after_the_read(monkeypatch: pytest.MonkeyPatch, **values: object) -> None:
    """The API reads the job, then a worker writes `values` to its row before the API writes: the API's copy is
    stale, as in a request racing a worker's transition."""
    from sqlalchemy import update

    from app.services import jobs

    real = jobs.get_job

    def read_then_worker_writes(session: Session, **kwargs: object) -> FineTuningJob:
        found = real(session, **kwargs)  # type: ignore[arg-type]
        session.execute(update(FineTuningJob).where(FineTuningJob.pk == found.pk).values(**values)
                        .execution_options(synchronize_session=False))
        return found

    monkeypatch.setattr(jobs, "get_job", read_then_worker_writes)


def _project(session: Session, job: FineTuningJob) -> object:
    from app.models import Project

    project = session.get(Project, job.project_pk)
    assert project is not None
    return project


def test_a_cancel_racing_the_jobs_success_is_refused_and_keeps_the_model(session: Session,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from app.core.errors import InvalidRequest
    from app.services.jobs import cancel_job

    job = create_job(session)
    claim(session, job, "w1")
    _worker_moves_it_after_the_read(monkeypatch, status="succeeded", fine_tuned_model="ft:tiny:race",
                                    lease_owner=None)
    with pytest.raises(InvalidRequest) as refused:
        cancel_job(session, project=_project(session, job), job_id=job.id)  # type: ignore[arg-type]
    assert refused.value.code == "job_not_cancellable" and "already succeeded" in str(refused.value)
    session.refresh(job)
    assert job.status == "succeeded" and job.fine_tuned_model == "ft:tiny:race"


def test_a_pause_racing_a_claim_asks_the_running_attempt_to_pause(session: Session,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from app.services.jobs import pause_job

    job = create_job(session)  # queued when the API reads it; a worker claims it before the API writes
    _worker_moves_it_after_the_read(monkeypatch, status="running", attempt=1, lease_owner="w1",
                                    lease_expires_at=time.time() + 10)
    paused = pause_job(session, project=_project(session, job), job_id=job.id)  # type: ignore[arg-type]
    assert paused.status == "running" and paused.requested_action == "pause" and paused.lease_owner == "w1"
    assert attempts.requested_action(session, job_pk=job.pk, attempt=1) == "pause"


def test_a_pause_racing_a_hand_off_pauses_the_queued_job(session: Session, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.services.jobs import pause_job

    job = create_job(session)
    claim(session, job, "w1")  # running when the API reads it; its worker hands it back before the API writes
    _worker_moves_it_after_the_read(monkeypatch, status="queued", lease_owner=None, lease_expires_at=None)
    paused = pause_job(session, project=_project(session, job), job_id=job.id)  # type: ignore[arg-type]
    assert paused.status == "paused"
    assert claim(session, job, "w2") is None  # the next claim does not run it


def test_a_second_resume_racing_the_first_is_refused(session: Session, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.core.errors import InvalidRequest
    from app.services.jobs import resume_job

    job = create_job(session, status="paused")
    _worker_moves_it_after_the_read(monkeypatch, status="queued")  # the first resume, committed meanwhile
    with pytest.raises(InvalidRequest) as refused:
        resume_job(session, project=_project(session, job), job_id=job.id, settings=SETTINGS)  # type: ignore[arg-type]
    assert refused.value.code == "job_not_paused"
    events = list(session.scalars(select(JobEvent.message).where(JobEvent.job_pk == job.pk)))
    assert not any(m.startswith("Job resumed") for m in events)


def test_a_pause_that_comes_after_the_training_loop_is_not_left_on_the_finished_job(session: Session) -> None:
    from app.services.jobs import job_public, pause_job

    for end in ("finish", "fail"):
        job = create_job(session)
        claim(session, job, "w1")
        project = _project(session, job)
        pause_job(session, project=project, job_id=job.id)  # type: ignore[arg-type]
        if end == "finish":  # the attempt was saving the final adapter: the loop no longer looks
            attempts.finish_job(session, job_pk=job.pk, attempt=1, fine_tuned_model=f"ft:tiny:{job.id}",
                                trained_tokens=1, artifacts=[])
        else:
            attempts.fail_job(session, job_pk=job.pk, attempt=1, code="training_error", message="boom")
        session.refresh(job)
        assert job.requested_action is None
        assert job_public(session, job, project=project).pause_requested is False  # type: ignore[arg-type]
        said = list(session.scalars(select(JobEvent.message).where(JobEvent.job_pk == job.pk)))
        assert ("The pause came after training had ended; the job finished instead." in said) == (end == "finish")


def test_metrics_an_attempt_trains_again_are_superseded_and_cursors_naming_them_still_page(session: Session) -> None:
    """One metrics event a step after a crash-resume; a client holding a superseded event's id (a stream's
    Last-Event-ID, a page's `after`) goes on from it."""
    from app.api.routes.stream import poll_job
    from app.services.jobs import list_events

    job = create_job(session)
    claim(session, job, "w1")
    for step in range(1, 6):
        attempts.record_event(session, job_pk=job.pk, attempt=1, message=f"Step {step}", type_="metrics",
                              data={"step": step, "attempt": 1})
    checkpoint(session, job, 3)
    crash(session, job)
    claim(session, job, "w2")
    held = session.scalar(select(JobEvent.id).where(JobEvent.job_pk == job.pk, JobEvent.type == "metrics")
                          .order_by(JobEvent.pk.desc()).limit(1))  # the newest a client saw: step 5's
    assert attempts.train_again_after(session, job_pk=job.pk, attempt=2, step=3) == 2
    assert attempts.train_again_after(session, job_pk=job.pk, attempt=2, step=3) == 0  # nothing twice
    session.refresh(job)
    assert job.step == 3
    events, _ = list_events(session, job=job, after=None, limit=100)
    assert sorted(e.data["step"] for e in events if e.type == "metrics") == [1, 2, 3]
    said = next(e for e in events if e.message.startswith("Steps after 3 are trained again"))
    assert said.data == {"step": 3, "superseded_metrics": 2, "reached": {"1": 5}}
    newer, _ = list_events(session, job=job, after=held, limit=100)  # newest first: what came before it
    assert [e.data["step"] for e in newer if e.type == "metrics"] == [3, 2, 1]
    attempts.record_event(session, job_pk=job.pk, attempt=2, message="Step 4", type_="metrics",
                          data={"step": 4, "attempt": 2})
    _state, streamed = poll_job(lambda: session, job_pk=job.pk, after_pk=0)  # type: ignore[arg-type]
    sent = [json.loads(text) for _, text in streamed]
    assert [(e["message"], e["data"]["attempt"]) for e in sent if e["type"] == "metrics"] == [
        ("Step 1", 1), ("Step 2", 1), ("Step 3", 1), ("Step 4", 2)]


@pytest.mark.parametrize("handing_back", ["crash", "release"])
def test_a_pause_landing_while_the_attempt_hands_the_job_back_holds(session: Session, monkeypatch: pytest.MonkeyPatch,
                                                                   handing_back: str) -> None:
    """Found by a review: the hand-back read "no pause", the user's pause landed, then the hand-back wrote queued and
    cleared it; the user had been told the pause was requested, and the job ran on."""
    from app.services.jobs import pause_job

    job = create_job(session)
    claim(session, job, "w1")
    project = _project(session, job)
    if handing_back == "release":
        assert attempts.request_release(session, job_pk=job.pk, attempt=1)
    real_execute = attempts._execute
    landed: list[str] = []

    def pause_before_the_hand_back(session: Session, statement: object) -> object:
        if not landed and "lease_owner" in str(statement) and "requested_action" in str(statement):
            landed.append(str(pause_job(session, project=project, job_id=job.id).requested_action))  # type: ignore[arg-type]
        return real_execute(session, statement)

    monkeypatch.setattr(attempts, "_execute", pause_before_the_hand_back)
    if handing_back == "crash":
        outcome = attempts.requeue_after_crash(session, job_pk=job.pk, attempt=1, reason="killed", settings=SETTINGS)
    else:
        outcome = attempts.stop_after_checkpoint(session, job_pk=job.pk, attempt=1)
    session.refresh(job)
    assert landed == ["pause"] and outcome == "paused" and job.status == "paused" and job.requested_action is None
    said = session.scalars(select(JobEvent.message).where(JobEvent.job_pk == job.pk).order_by(JobEvent.pk.desc()))
    assert next(iter(said)).endswith("A pause was asked for meanwhile: the job is paused instead; resume it to "
                                     "continue.")


@pytest.mark.parametrize("landing", ["pause", "renewal"])
def test_a_pause_or_renewal_landing_while_the_reaper_hands_the_job_back_holds(session: Session, landing: str) -> None:
    """Found by a review: the reaper read the expired job, then wrote queued over it. On SQLite, where a read takes no
    lock, a pause landing between them was wiped (the job ran on), and a lease renewed between them was taken from
    its running attempt. The write lands here, in the reaper's transaction, just before the reaper's own UPDATE."""
    job = create_job(session)
    claim(session, job, "w1")
    job.lease_expires_at = time.time() - 1
    session.commit()
    change = ("requested_action = 'pause'" if landing == "pause"
              else f"lease_expires_at = {time.time() + 60}")
    with landing_before(session, "UPDATE fine_tuning_jobs",
                        f"UPDATE fine_tuning_jobs SET {change} WHERE pk = {job.pk}") as landed:
        attempts.reap_expired_leases(session, settings=SETTINGS)
    session.refresh(job)
    assert landed
    if landing == "pause":
        assert job.status == "paused" and job.requested_action is None and job.lease_owner is None
        said = session.scalars(select(JobEvent.message).where(JobEvent.job_pk == job.pk).order_by(JobEvent.pk.desc()))
        assert "paused, as requested" in next(iter(said))
    else:
        assert job.status == "running" and job.lease_owner == "w1" and job.attempt == 1


def test_a_cancel_landing_before_a_waiting_job_is_failed_stands(session: Session) -> None:
    """Found by an audit: failing a queued job whose model cannot be had read it, then wrote failed over it; on SQLite
    a cancel landing between them was overwritten (and a second webhook sent)."""
    job = create_job(session)
    with landing_before(session, "UPDATE fine_tuning_jobs",
                        f"UPDATE fine_tuning_jobs SET status = 'cancelled' WHERE pk = {job.pk}") as landed:
        failed = attempts.fail_waiting_job(session, job=job, code="model_not_available", message="gone")
        session.commit()
    session.refresh(job)
    assert landed and failed is False and job.status == "cancelled" and job.error is None
    assert "gone" not in list(session.scalars(select(JobEvent.message).where(JobEvent.job_pk == job.pk)))
