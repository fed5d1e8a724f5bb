"""Builds the FastAPI app: error handlers and routers. Nothing else."""

from __future__ import annotations

from fastapi import FastAPI

from app.api.routes import files, health, jobs, models
from app.core.errors import install_error_handlers


def create_app() -> FastAPI:
    app = FastAPI(title="tuneforge", version="0.1.0",
                  description="Self-hosted LLM fine-tuning with an OpenAI-compatible API.")
    install_error_handlers(app)
    for router in (files.router, jobs.router, models.router):
        app.include_router(router, prefix="/v1")
    app.include_router(health.router)
    return app


app = create_app()
