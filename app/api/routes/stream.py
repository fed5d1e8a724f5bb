"""Live job events as Server-Sent Events, polled from the database (no extra infrastructure).

Each poll is a short session of its own (keyset on JobEvent.pk), so an open stream holds no
transaction and no pooled connection between polls. Clients resume with Last-Event-ID.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header
from fastapi.responses import StreamingResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.api.deps import CallerDep, SessionDep
from app.api.streaming import in_stream_thread
from app.core.db import get_sessionmaker
from app.core.errors import InvalidRequest
from app.models import ApiKey, FineTuningJob, JobEvent
from app.models.job import TERMINAL_STATUSES
from app.services import jobs as job_service

router = APIRouter(prefix="/fine_tuning/jobs", tags=["fine-tuning"])
EVENT_STREAM: dict[int | str, dict[str, Any]] = {200: {
    "description": "Server-Sent Events: `event:` is a job event's level or `status`, `data:` its JSON.",
    "content": {"text/event-stream": {"schema": {"type": "string"}}}}}

# Half a second feels live in a terminal or a chart and costs two indexed queries per stream.
POLL_SECONDS = 0.5
# A comment line now and then keeps proxies and load balancers from closing an idle stream.
KEEPALIVE_SECONDS = 15.0
# Events per poll; a long backlog (a resumed dashboard) drains without waiting between batches.
BATCH = 500
# How often an open stream checks that its API key was not revoked meanwhile (it then ends; reconnecting gets 401).
KEY_CHECK_SECONDS = 5.0

SessionFactory = Callable[[], AbstractContextManager[Session]]


def get_poll_sessions() -> SessionFactory:
    """Where each poll gets its session (tests bind it to their rolled-back transaction)."""
    return get_sessionmaker()


PollSessions = Annotated[SessionFactory, Depends(get_poll_sessions)]


def _job_state(row: Any) -> dict[str, Any]:
    return {"id": row.id, "object": "fine_tuning.job.status", "status": row.status,
            "progress": {"step": row.step, "total_steps": row.total_steps},
            "estimated_finish": row.estimated_finish, "finished_at": row.finished_at,
            "fine_tuned_model": row.fine_tuned_model, "trained_tokens": row.trained_tokens, "error": row.error}


def poll_job(sessions: SessionFactory, *, job_pk: int, after_pk: int) -> tuple[dict[str, Any], list[tuple[int, str]]]:
    """The job's state and its events after after_pk, oldest first, as (pk, JSON) pairs."""
    with sessions() as session:
        row = session.execute(select(
            FineTuningJob.id, FineTuningJob.status, FineTuningJob.step, FineTuningJob.total_steps,
            FineTuningJob.estimated_finish, FineTuningJob.finished_at, FineTuningJob.fine_tuned_model,
            FineTuningJob.trained_tokens, FineTuningJob.error).where(FineTuningJob.pk == job_pk)).one()
        events = session.scalars(select(JobEvent).where(JobEvent.job_pk == job_pk, JobEvent.pk > after_pk,
                                                        JobEvent.superseded.is_(False))
                                 .order_by(JobEvent.pk).limit(BATCH))
        return _job_state(row), [(e.pk, job_service.event_public(e).model_dump_json()) for e in events]


def key_revoked(sessions: SessionFactory, *, key_pk: int) -> bool:
    """Whether the API key was revoked (or deleted)."""
    with sessions() as session:
        return session.scalar(select(ApiKey.pk).where(ApiKey.pk == key_pk, ApiKey.revoked_at.is_(None))) is None


def _frame(event: str, data: str, *, id_: str | None = None) -> str:
    return (f"id: {id_}\n" if id_ else "") + f"event: {event}\ndata: {data}\n\n"


async def job_frames(sessions: SessionFactory, *, job_pk: int, after_pk: int,
                     key_pk: int | None = None) -> AsyncIterator[str]:
    """`event` frames for each job event, a `status` frame on every change; ends once terminal, or once the API key
    `key_pk` that opened it is revoked ("stops working at once", as for every other request)."""
    last_state: dict[str, Any] | None = None
    last_sent = last_key_check = time.monotonic()
    while True:
        if key_pk is not None and time.monotonic() - last_key_check >= KEY_CHECK_SECONDS:
            if await in_stream_thread(key_revoked, sessions, key_pk=key_pk):
                return
            last_key_check = time.monotonic()
        state, events = await in_stream_thread(poll_job, sessions, job_pk=job_pk, after_pk=after_pk)
        changed = state != last_state
        for pk, payload in events:
            yield _frame("event", payload, id_=json.loads(payload)["id"])
            after_pk = pk
        if changed:
            yield _frame("status", json.dumps(state))
            last_state = state
        if events or changed:
            last_sent = time.monotonic()
        if len(events) == BATCH:
            continue
        # The terminal transition commits with its last event, so this poll has already read them.
        if state["status"] in TERMINAL_STATUSES:
            return
        if time.monotonic() - last_sent >= KEEPALIVE_SECONDS:
            yield ": keep-alive\n\n"
            last_sent = time.monotonic()
        await asyncio.sleep(POLL_SECONDS)


@router.get("/{fine_tuning_job_id}/events/stream", responses=EVENT_STREAM)
def stream_job_events(session: SessionDep, caller: CallerDep, sessions: PollSessions,
                      fine_tuning_job_id: str,
                      last_event_id: Annotated[str | None, Header()] = None) -> StreamingResponse:
    """Server-Sent Events: the job's events oldest first and its status changes, until it is terminal (or its API
    key is revoked)."""
    job = job_service.get_job(session, project=caller.project, job_id=fine_tuning_job_id)
    after_pk = 0
    if last_event_id:
        found = session.scalar(select(JobEvent.pk).where(JobEvent.id == last_event_id.strip(),
                                                         JobEvent.job_pk == job.pk))
        if found is None:
            raise InvalidRequest(f"Invalid Last-Event-ID: no event with id {last_event_id!r} in this job.",
                                 param="Last-Event-ID", code="invalid_value")
        after_pk = found
    job_pk, key_pk = job.pk, caller.api_key.pk if caller.api_key is not None else None
    # End the request session's transaction now: the stream may stay open for hours.
    session.commit()
    return StreamingResponse(job_frames(sessions, job_pk=job_pk, after_pk=after_pk, key_pk=key_pk),
                             media_type="text/event-stream",
                             headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
