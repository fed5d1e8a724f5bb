"""The Celery app, built from the same Settings as the API. Celery only delivers work: job state,
leases and retries live in the database (see app/services/attempts.py), so every option below is
chosen for delivery, not for correctness."""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import worker_ready, worker_shutdown, worker_shutting_down

from app.core.config import Settings, get_settings

RUN_JOB_TASK = "tuneforge.run_job"


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


def build_celery(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    url, transport_options = broker_options(settings)
    app = Celery("tuneforge", broker=url, include=["worker.tasks.training"])
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


celery_app = build_celery()


@worker_ready.connect
def _start_reaper(**_kwargs: Any) -> None:
    from worker import registry
    from worker.reaper import start_reaper
    from worker.supervisor import shutting_down

    settings = get_settings()
    start_reaper(settings=settings)
    registry.this_worker(settings)  # detect GPUs once, before any job needs the answer
    registry.start(settings, draining=shutting_down())


@worker_shutting_down.connect
def _release_running_job(**_kwargs: Any) -> None:
    from worker.supervisor import request_shutdown

    # Only sets a flag: this runs inside the signal handler. The heartbeat thread marks the worker
    # draining in the registry and the supervisor asks the running attempt to hand its job back.
    request_shutdown()


@worker_shutdown.connect
def _leave_registry(**_kwargs: Any) -> None:
    from worker import registry

    registry.stop(get_settings())
