"""Builds the FastAPI app: middleware, error handlers and routers. Nothing else."""

from __future__ import annotations

from fastapi import FastAPI

from app.api.openapi import install_openapi
from app.api.routes import admin, evaluations, files, health, inference, jobs, models
from app.api.routes import dashboard as dashboard_routes
from app.api.routes import stream as stream_routes
from app.api.routes import webhooks as webhook_routes
from app.core import metrics
from app.core.config import get_settings
from app.core.errors import install_error_handlers
from app.core.logging import configure_logging, install_log_redaction
from app.core.security import BodySizeLimit


def _body_limits() -> tuple[int, int]:
    settings = get_settings()
    return settings.max_json_body_bytes, settings.max_upload_bytes


def create_app() -> FastAPI:
    app = FastAPI(title="tuneforge", version="0.1.0",
                  description="Self-hosted LLM fine-tuning with an OpenAI-compatible API.")
    install_log_redaction()
    configure_logging(get_settings().log_format)
    install_error_handlers(app)
    install_openapi(app)
    app.add_middleware(BodySizeLimit, limits=_body_limits)
    for router in (files.router, jobs.router, evaluations.router, models.router, inference.router, admin.router):
        app.include_router(router, prefix="/v1")
    app.include_router(health.router)
    app.include_router(stream_routes.router, prefix="/v1")
    app.include_router(webhook_routes.router, prefix="/v1")
    app.include_router(dashboard_routes.router)
    app.include_router(dashboard_routes.root_router)
    app.include_router(metrics.router)
    app.add_middleware(metrics.RecordLatency)
    return app


app = create_app()
