"""The Celery client side, shared by the API (which sends "run job X") and the workers (which also consume):
the task's name, the broker's options and the app's delivery settings. The worker side (its task, signals and
reaper) is worker/celery_app.py. Celery only delivers work: job state, leases and retries live in the database
(app/services/attempts.py), so every option below is chosen for delivery, not for correctness."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from celery import Celery

from app.core.config import Settings, get_settings

RUN_JOB_TASK = "tuneforge.run_job"
# Fetch a registered hub model into one worker's cache ahead of its jobs (sent to that worker's direct queue).
PULL_MODEL_TASK = "tuneforge.pull_model"


def broker_options(settings: Settings) -> tuple[str, dict[str, Any]]:
    """The broker URL and transport options; the embedded broker is a folder (no server needed)."""
    if not settings.embedded_broker:
        return settings.broker_url, {
            # A training task holds no broker message while it runs (acks early, see below), so the
            # visibility timeout only matters for messages that wait; an hour is Redis' default.
            "visibility_timeout": 3600,
        }
    root = (settings.data_dir / "broker").resolve()
    for sub in ("out", "processed", "control"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    return "filesystem://", {
        "data_folder_in": str(root / "out"),
        "data_folder_out": str(root / "out"),
        "processed_folder": str(root / "processed"),
        # Broadcast exchanges (worker control) would otherwise land in the current directory.
        "control_folder": str(root / "control"),
        "store_processed": False,
    }


def build_celery(settings: Settings | None = None, *, include: Sequence[str] = ()) -> Celery:
    """The Celery app; a worker passes the modules holding its tasks in `include`."""
    settings = settings or get_settings()
    url, transport_options = broker_options(settings)
    app = Celery("tuneforge", broker=url, include=list(include))
    app.conf.update(
        broker_transport_options=transport_options,
        # Keep retrying the broker at startup: in compose the worker may start before Redis.
        broker_connection_retry_on_startup=True,
        # Job state lives in the database; a result backend would be a second, stale copy.
        task_ignore_result=True,
        # Ack on receipt (the default): redelivery is not how jobs survive crashes. A job whose worker
        # dies keeps an expiring lease in the database and the reaper re-dispatches it; acks_late would
        # instead re-run a 3-hour job every visibility timeout and loop on OOM kills.
        task_acks_late=False,
        # One training job at a time per worker process; never reserve a second one while training.
        # The solo pool runs the task in the worker's main process, where the SIGTERM handler runs too,
        # so a shutdown can ask the training child to checkpoint and release (worker/supervisor.py).
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_pool="solo",
        task_default_queue=settings.training_queue,
        task_routes={RUN_JOB_TASK: {"queue": settings.training_queue}},
        task_serializer="json",
        accept_content=["json"],
        # Only our log lines; Celery's hijacking of the root logger hides worker errors in tests.
        worker_hijack_root_logger=False,
    )
    return app


@lru_cache
def celery_client() -> Celery:
    """The app that sends messages (API processes, and workers sending on)."""
    return build_celery()
