"""The reaper: requeues jobs whose lease expired and re-sends jobs whose dispatch was lost (and routes
again jobs that no live worker fitted, so they start once one registers); sends due webhooks; removes this
host's leftovers of ended attempts.

Every worker runs it in a background thread; the claims are transactional, so several reapers at
once do no harm (embedded mode needs no separate beat process)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from app.core.config import Settings
from app.core.db import session_scope
from app.core.logging import configure_logging
from app.services import attempts
from app.services.dispatch import dispatch_job
from app.services.webhooks import send_due_webhooks
from worker.workdirs import sweep

logger = logging.getLogger("tuneforge.reaper")


def reap_once(*, settings: Settings) -> list[str]:
    """One pass; returns the job ids sent to the broker."""
    with session_scope() as session:
        waiting = attempts.reap_expired_leases(session, settings=settings)
    sent = []
    for job_id in waiting:
        with session_scope() as session:
            if dispatch_job(session, job_id=job_id, settings=settings):
                sent.append(job_id)
    return sent


def start_reaper(*, settings: Settings) -> threading.Thread:
    """The reaper's thread, and beside it the webhook sender's: a receiver that answers slowly delays deliveries,
    never the requeueing of jobs whose lease expired."""
    configure_logging(settings.log_format)  # worker_ready: Celery's handlers exist; JSON them if asked

    def reap() -> None:
        sent = reap_once(settings=settings)
        if sent:
            logger.info("reaper re-dispatched %s", sent)
        with session_scope() as session:
            sweep(session, settings=settings)  # this host's leftovers of ended attempts

    _every(settings.reaper_interval_seconds, lambda: send_due_webhooks(settings=settings), name="tuneforge-webhooks")
    # The first pass at start: jobs left queued by a stopped worker (or by a whole `tuneforge serve`) continue at once
    # rather than one interval later.
    return _every(settings.reaper_interval_seconds, reap, name="tuneforge-reaper")


def _every(seconds: float, work: Callable[[], object], *, name: str) -> threading.Thread:
    """Run `work` now and then every `seconds` in a daemon thread; a failed pass (database or broker down) is logged
    and tried again next round."""
    def loop() -> None:
        while True:
            try:
                work()
            except Exception:
                logger.exception("%s pass failed", name)
            time.sleep(seconds)

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    return thread
