from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import text

from app.api.deps import SessionDep, SettingsDep
from app.core.config import Settings

router = APIRouter(tags=["health"])


class Readiness(BaseModel):
    status: Literal["ok", "unavailable"]
    database: str
    broker: str


@router.get("/healthz")
def read_health() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


def broker_status(settings: Settings) -> str:
    """"ok", or why the broker is not reachable: Redis answers a PING; the folder broker's folder exists."""
    if settings.embedded_broker:
        folder = settings.data_dir / "broker"
        return "ok" if folder.is_dir() else f"missing folder {folder}"
    if settings.broker_url.startswith(("redis://", "rediss://", "unix://")):
        import redis

        client = redis.Redis.from_url(settings.broker_url, socket_connect_timeout=2, socket_timeout=2)
        try:
            client.ping()
        except Exception as exc:
            return type(exc).__name__
        finally:
            client.close()
    return "ok"  # other Celery transports are not probed here


@router.get("/readyz", responses={200: {"model": Readiness}, 503: {
    "model": Readiness, "description": "The database or the broker is not reachable (the body says which)."}})
def read_readiness(session: SessionDep, settings: SettingsDep) -> JSONResponse:
    """The database answers and the broker is reachable."""
    body = {"status": "ok", "database": "ok", "broker": broker_status(settings)}
    try:
        session.execute(text("SELECT 1"))
    except Exception as exc:
        body["database"] = type(exc).__name__
    if body["database"] != "ok" or body["broker"] != "ok":
        body["status"] = "unavailable"
        return JSONResponse(body, status_code=503)
    return JSONResponse(body)
