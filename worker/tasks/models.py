"""Fetching a registered hub model into this worker's cache ahead of the jobs that will need it."""

from __future__ import annotations

import logging

from sqlalchemy import select

from app.core.broker import PULL_MODEL_TASK
from app.core.config import get_settings
from app.core.db import session_scope
from app.models import RegisteredModel
from worker import registration
from worker.celery_app import celery_app
from worker.model_cache import ModelRef, ModelUnavailable, RegistryLog, local_model

logger = logging.getLogger("tuneforge.worker")


@celery_app.task(name=PULL_MODEL_TASK)
def pull_model(name: str) -> str:
    """Download (or check) the model in this host's cache; "ready", or why not."""
    with session_scope() as session:
        row = session.scalar(select(RegisteredModel).where(RegisteredModel.name == name))
        if row is None:
            return "not registered"
        model = ModelRef.of(row)
    try:
        settings = get_settings()
        path = local_model(model, settings=settings, progress=logger.info,
                           log=RegistryLog(model, worker=registration.worker_name(settings)))
    except ModelUnavailable as exc:
        logger.warning("pull of %s failed: %s", name, exc)
        return str(exc)
    logger.info("model %s is ready in %s", name, path)
    return "ready"
