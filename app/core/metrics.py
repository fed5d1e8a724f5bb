"""Prometheus exposition: job series computed from the database at scrape, HTTP latency by route.

Job series (counts by status, queue depth, tokens trained, job durations, worker heartbeats) are read
from Postgres on every scrape, so every API process reports the same numbers and nothing is lost when
a process restarts. HTTP latency is measured in each API process (one series per process: with
`tuneforge api --workers N`, scrape each process or run one worker per container).
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.deps import SessionDep, SettingsDep
from app.core.config import Settings
from app.models import FineTuningJob, JobStatus
from app.models.job import TERMINAL_STATUSES, WAITING_STATUSES

STATUSES = tuple(JobStatus)
# Fine-tuning runs take minutes to days: buckets from 1 minute to 2 days.
DURATION_BUCKETS = (60.0, 300.0, 900.0, 1800.0, 3600.0, 3 * 3600.0, 6 * 3600.0, 12 * 3600.0, 24 * 3600.0,
                    48 * 3600.0)

HTTP_REGISTRY = CollectorRegistry()
HTTP_LATENCY = Histogram("tuneforge_http_request_duration_seconds",
                         "HTTP request latency until the response starts, by route template.",
                         ["method", "route", "status"], registry=HTTP_REGISTRY)

router = APIRouter(tags=["health"])


class RecordLatency:
    """ASGI middleware: observe each request, until its response starts, under its route template
    (/v1/files/{file_id}), never the raw path. Plain ASGI: no extra task or body stream per request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        observed = False

        def observe(status: int) -> None:
            nonlocal observed
            observed = True
            # Routes of included routers keep their own path; FastAPI records the prefixed template.
            context = (scope.get("fastapi") or {}).get("effective_route_context")
            template = getattr(context, "path", None) or getattr(scope.get("route"), "path", None) or "unmatched"
            HTTP_LATENCY.labels(scope["method"], template, str(status)).observe(time.perf_counter() - start)

        async def send_observed(message: Message) -> None:
            if message["type"] == "http.response.start" and not observed:
                observe(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        finally:
            if not observed:  # an error no handler turned into a response: the server answers 500
                observe(500)


def job_families(session: Session, *, settings: Settings, now: float | None = None) -> list[object]:
    """The database-backed series, computed now (a few aggregate queries, whatever the job count)."""
    now = time.time() if now is None else now
    counts: dict[str, int] = {status: count for status, count in session.execute(
        select(FineTuningJob.status, func.count()).group_by(FineTuningJob.status))}
    jobs = GaugeMetricFamily("tuneforge_jobs", "Fine-tuning jobs by status.", labels=["status"])
    for status in sorted(set(STATUSES) | set(counts)):
        jobs.add_metric([status], counts.get(status, 0))
    queue = GaugeMetricFamily("tuneforge_queue_depth", "Jobs waiting for a worker (validating_files or queued).",
                              value=sum(counts.get(status, 0) for status in WAITING_STATUSES))

    tokens = session.scalar(select(func.coalesce(func.sum(FineTuningJob.trained_tokens), 0)))
    trained = GaugeMetricFamily("tuneforge_trained_tokens", "Tokens trained by succeeded jobs, all time.",
                                value=float(tokens or 0))

    # Duration of finished jobs (started to finished), bucketed in SQL from the job rows.
    duration = FineTuningJob.finished_at - FineTuningJob.started_at
    finished = (FineTuningJob.status.in_(TERMINAL_STATUSES) & FineTuningJob.started_at.is_not(None)
                & FineTuningJob.finished_at.is_not(None))
    columns: list[Any] = [func.count(), func.coalesce(func.sum(duration), 0)]
    columns += [func.coalesce(func.sum(case((duration <= b, 1), else_=0)), 0) for b in DURATION_BUCKETS]
    total, total_sum, *cumulative = session.execute(select(*columns).where(finished)).one()
    histogram = HistogramMetricFamily(
        "tuneforge_job_duration_seconds", "Run time of finished jobs (started_at to finished_at), from the database.",
        buckets=[*[(str(b), int(c)) for b, c in zip(DURATION_BUCKETS, cumulative, strict=True)],
                 ("+Inf", int(total))], sum_value=float(total_sum))

    # A lease renewal sets lease_expires_at = renewal time + lease_seconds.
    renewals = session.execute(select(FineTuningJob.lease_owner, func.max(FineTuningJob.lease_expires_at))
                               .where(FineTuningJob.status == JobStatus.RUNNING, FineTuningJob.lease_owner.is_not(None))
                               .group_by(FineTuningJob.lease_owner)).all()
    heartbeat = GaugeMetricFamily("tuneforge_worker_heartbeat_age_seconds",
                                  "Seconds since each busy worker last renewed a job lease.", labels=["worker"])
    for owner, expires in renewals:
        if owner and expires is not None:
            heartbeat.add_metric([owner], max(0.0, now - (expires - settings.lease_seconds)))
    return [jobs, queue, trained, histogram, heartbeat]


class _Families:
    def __init__(self, families: list[object]) -> None:
        self.families = families

    def collect(self) -> list[object]:
        return self.families


@router.get("/metrics", include_in_schema=False)
def read_metrics(session: SessionDep, settings: SettingsDep) -> Response:
    """Prometheus metrics: jobs by status, queue depth, durations, tokens, worker heartbeats, HTTP latency."""
    registry = CollectorRegistry()
    registry.register(_Families(job_families(session, settings=settings)))  # type: ignore[arg-type]
    body = generate_latest(registry) + generate_latest(HTTP_REGISTRY)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
