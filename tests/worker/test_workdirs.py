"""A worker host's scratch space: the sweep removes what ended attempts left and keeps what live ones use."""

from __future__ import annotations

import os
import time
from pathlib import Path

from sqlalchemy.orm import Session

from app.core.config import Settings
from tests.factories import create_job
from worker.workdirs import SWEEP_MIN_AGE_SECONDS, remove_attempt_dir, sweep


def make_dir(path: Path, *, age: float) -> Path:
    path.mkdir(parents=True)
    (path / "train.jsonl").write_text("{}\n")
    then = time.time() - age
    os.utime(path, (then, then))
    return path


def test_the_sweep_removes_ended_attempts_and_old_logs_and_keeps_live_ones(session: Session, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, attempt_log_retention_days=1)
    running = create_job(session, status="running", attempt=2)
    finished = create_job(session, status="succeeded", attempt=1)
    old = SWEEP_MIN_AGE_SECONDS + 60
    live = make_dir(settings.attempt_work_dir(running.id, 2), age=old)
    superseded = make_dir(settings.attempt_work_dir(running.id, 1), age=old)
    ended = make_dir(settings.attempt_work_dir(finished.id, 1), age=old)
    just_claimed = make_dir(settings.attempt_work_dir(finished.id + "x", 1), age=1)  # claimed after the read
    settings.log_root.mkdir()
    stale_log, fresh_log = settings.attempt_log_path(finished.id, 1), settings.attempt_log_path(running.id, 2)
    stale_log.write_text("old")
    fresh_log.write_text("new")
    two_days_ago = time.time() - 2 * 86400
    os.utime(stale_log, (two_days_ago, two_days_ago))

    removed = sweep(session, settings=settings)

    assert set(removed) == {superseded, ended, stale_log}
    assert live.is_dir() and just_claimed.is_dir() and fresh_log.exists()
    assert not ended.parent.exists()  # the finished job's directory went with its last attempt


def test_an_ended_attempts_directory_goes_and_its_jobs_once_empty(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    first = make_dir(settings.attempt_work_dir("ftjob-a", 1), age=0)
    second = make_dir(settings.attempt_work_dir("ftjob-a", 2), age=0)
    remove_attempt_dir(settings, job_id="ftjob-a", attempt=1)
    assert not first.exists() and second.exists()
    remove_attempt_dir(settings, job_id="ftjob-a", attempt=2)
    assert not settings.work_root.joinpath("ftjob-a").exists()
