"""The reaper: requeues jobs whose lease expired and re-sends jobs whose dispatch was lost (and routes
again jobs that no live worker fitted, so they start once one registers); sends due webhooks; removes this
host's leftovers of ended attempts.

Every worker runs it in a background thread; the claims are transactional, so several reapers at
once do no harm (embedded mode needs no separate beat process)."""

from __future__ import annotations

import logging
import threading

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
    configure_logging(settings.log_format)  # worker_ready: Celery's handlers exist; JSON them if asked
    stop = threading.Event()

    def loop() -> None:
        # The first pass at start: jobs left queued by a stopped worker (or by a whole `tuneforge serve`)
        # continue at once rather than one interval later.
        while True:
            try:
                sent = reap_once(settings=settings)
                if sent:
                    logger.info("reaper re-dispatched %s", sent)
                send_due_webhooks(settings=settings)
                with session_scope() as session:
                    sweep(session, settings=settings)  # this host's leftovers of ended attempts
            except Exception:  # database or broker down: try again next round
                logger.exception("reaper pass failed")
            if stop.wait(settings.reaper_interval_seconds):
                return

    thread = threading.Thread(target=loop, name="tuneforge-reaper", daemon=True)
    thread.start()
    return thread
