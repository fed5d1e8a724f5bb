"""The worker side of Celery: the app with its task module, and the signals that start the reaper, register the
worker and turn a shutdown into a hand-over. The client side (task name, broker options, delivery settings) is
app/core/broker.py, which the API uses too."""

from __future__ import annotations

from typing import Any

from celery.signals import worker_ready, worker_shutdown, worker_shutting_down

from app.core.broker import RUN_JOB_TASK, build_celery
from app.core.config import get_settings

__all__ = ["RUN_JOB_TASK", "celery_app"]

celery_app = build_celery(include=["worker.tasks.training", "worker.tasks.models"])


@worker_ready.connect
def _start_reaper(**_kwargs: Any) -> None:
    from worker import registration
    from worker.reaper import start_reaper
    from worker.supervisor import shutting_down

    settings = get_settings()
    if settings.worker_warm_start:  # its imports run while the worker waits for its first job
        from worker.zygote import zygote

        zygote().start()
    start_reaper(settings=settings)
    registration.this_worker(settings)  # detect GPUs once, before any job needs the answer
    registration.start(settings, draining=shutting_down())


@worker_shutting_down.connect
def _release_running_job(**_kwargs: Any) -> None:
    from worker.supervisor import request_shutdown

    # Only sets a flag: this runs inside the signal handler. The heartbeat thread marks the worker
    # draining in the registry and the supervisor asks the running attempt to hand its job back.
    request_shutdown()


@worker_shutdown.connect
def _leave_registry(**_kwargs: Any) -> None:
    from worker import registration

    registration.stop(get_settings())
