"""Webhooks: endpoints per project, deliveries enqueued with a job's terminal transition, signed sends.

Signatures follow Standard Webhooks, as OpenAI's do (so `openai.OpenAI().webhooks.unwrap()` verifies
them): `webhook-id`, `webhook-timestamp` and `webhook-signature: v1,<base64 HMAC-SHA256 of
"{id}.{timestamp}.{body}">` keyed with the endpoint's secret. A delivery row is written in the same
transaction as the job's final status, so no event is lost or sent for a rolled-back transition.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.db import move_row, session_scope
from app.core.errors import NotFound
from app.models import FineTuningJob, Project, WebhookDelivery, WebhookEndpoint
from app.models.base import new_id, now_seconds

logger = logging.getLogger("tuneforge.webhooks")

EVENT_TYPES = ("fine_tuning.job.succeeded", "fine_tuning.job.failed", "fine_tuning.job.cancelled")
# A sender owns a claimed delivery this long (or four tries' deadline, if longer); a sender that dies mid-post is
# retried after it.
CLAIM_SECONDS = 60.0
# One try is given up after this many times TUNEFORGE_WEBHOOK_TIMEOUT_SECONDS in all: httpx's timeout bounds each read,
# and a receiver answering a byte at a time would otherwise hold the sender for as long as it liked.
TRY_DEADLINE_TIMEOUTS = 3
# Deliveries one reaper pass sends at most (each waits up to the timeout): keeps the pass short.
BATCH = 20
MAX_BACKOFF_SECONDS = 3600.0


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def sign(*, secret: str, event_id: str, timestamp: int, body: bytes) -> str:
    """The webhook-signature header value for a body (Standard Webhooks v1)."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{event_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def create_endpoint(session: Session, *, project: Project, url: str, event_types: Sequence[str] | None
                    ) -> WebhookEndpoint:
    endpoint = WebhookEndpoint(id=new_id("wh_"), project_pk=project.pk, url=url, secret=new_secret(),
                               event_types=list(dict.fromkeys(event_types or EVENT_TYPES)))
    session.add(endpoint)
    session.commit()
    return endpoint


def get_endpoint(session: Session, *, project: Project, endpoint_id: str) -> WebhookEndpoint:
    endpoint = session.scalar(select(WebhookEndpoint).where(WebhookEndpoint.id == endpoint_id,
                                                            WebhookEndpoint.project_pk == project.pk))
    if endpoint is None:
        raise NotFound(f"No such webhook endpoint: {endpoint_id}", param="webhook_id")
    return endpoint


def list_endpoints(session: Session, *, project: Project) -> list[WebhookEndpoint]:
    return list(session.scalars(select(WebhookEndpoint).where(WebhookEndpoint.project_pk == project.pk)
                                .order_by(WebhookEndpoint.pk)))


def delete_endpoint(session: Session, *, project: Project, endpoint_id: str) -> None:
    session.delete(get_endpoint(session, project=project, endpoint_id=endpoint_id))
    session.commit()


def list_deliveries(session: Session, *, endpoint: WebhookEndpoint, limit: int) -> tuple[list[WebhookDelivery], bool]:
    rows = list(session.scalars(select(WebhookDelivery).where(WebhookDelivery.endpoint_pk == endpoint.pk)
                                .order_by(WebhookDelivery.pk.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def enqueue_job_event(session: Session, *, job: FineTuningJob) -> None:
    """Add a delivery per subscribed endpoint for the job's terminal status (the caller commits)."""
    event_type = f"fine_tuning.job.{job.status}"
    if event_type not in EVENT_TYPES:
        return
    endpoints = session.scalars(select(WebhookEndpoint).where(WebhookEndpoint.project_pk == job.project_pk))
    event_id, created_at = new_id("evt_"), now_seconds()
    payload = {"id": event_id, "object": "event", "created_at": created_at, "type": event_type,
               "data": {"id": job.id}}
    for endpoint in endpoints:
        if event_type in endpoint.event_types:
            session.add(WebhookDelivery(id=new_id("whdel_"), endpoint_pk=endpoint.pk, event_id=event_id,
                                        event_type=event_type, payload=payload, status="pending", attempts=0,
                                        next_attempt_at=time.time()))


@dataclass
class _Send:
    pk: int
    url: str
    secret: str
    event_id: str
    payload: dict[str, Any]
    attempts: int


def _claim_due(session: Session, *, now: float, sent: Collection[int], claim_seconds: float) -> _Send | None:
    """The next due delivery (not one of `sent`, this pass's), claimed for `claim_seconds`: one at a time, right
    before it is sent, so a claim never lapses while the deliveries before it in the pass wait on slow receivers.
    The claim is an UPDATE guarded by the due time it read: of two senders (SKIP LOCKED locks nothing on SQLite),
    the second finds it claimed and takes the next."""
    while True:
        found = session.execute(
            select(WebhookDelivery, WebhookEndpoint)
            .join(WebhookEndpoint, WebhookDelivery.endpoint_pk == WebhookEndpoint.pk)
            .where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now,
                   WebhookDelivery.pk.not_in(sent))
            .order_by(WebhookDelivery.next_attempt_at).limit(1)
            .with_for_update(of=WebhookDelivery, skip_locked=True)).first()
        if found is None:
            session.commit()
            return None
        delivery, endpoint = found
        claimed = _Send(delivery.pk, endpoint.url, endpoint.secret, delivery.event_id, delivery.payload,
                        delivery.attempts)
        won = move_row(session, delivery, WebhookDelivery.status == "pending",
                       WebhookDelivery.next_attempt_at == delivery.next_attempt_at,
                       next_attempt_at=now + claim_seconds)
        session.commit()
        if won:
            return claimed


def _send(send: _Send, *, timeout: float) -> tuple[int | None, str | None]:
    """One try (_post) within TRY_DEADLINE_TIMEOUTS x `timeout` in all: past it the try is given up and its
    connection closed, which ends the stuck read within one more `timeout`."""
    deadline = TRY_DEADLINE_TIMEOUTS * timeout
    outcome: list[tuple[int | None, str | None]] = []
    # Redirects are not followed: a signed event goes only to the URL the user registered.
    client = httpx.Client(timeout=timeout, follow_redirects=False)
    trying = threading.Thread(target=lambda: outcome.append(_post(send, client=client)), daemon=True,
                              name="tuneforge-webhook-try")
    trying.start()
    trying.join(deadline)
    client.close()
    return outcome[0] if outcome else (None, f"Timeout: no complete answer within {deadline:g} s")


def backoff_seconds(attempts: int, *, settings: Settings) -> float:
    """Wait before the next try after `attempts` failures: the base, doubling, at most an hour."""
    return min(MAX_BACKOFF_SECONDS, settings.webhook_retry_seconds * 2 ** (attempts - 1))


def _post(send: _Send, *, client: httpx.Client) -> tuple[int | None, str | None]:
    """One try: the receiver's status code and, unless it is a 2xx, what went wrong. The reply's body is never read:
    a receiver cannot hold the sender by trickling it or fill its memory with it, and a URL naming a service inside
    the network (which the sender can reach and the user cannot) shows the user only a status code (and where a
    redirect points). Any failure, whatever raises it, is this delivery's: the other deliveries are sent."""
    body = json.dumps(send.payload, separators=(",", ":")).encode()
    timestamp = int(time.time())
    headers = {"content-type": "application/json", "user-agent": "tuneforge-webhooks",
               "webhook-id": send.event_id, "webhook-timestamp": str(timestamp),
               "webhook-signature": sign(secret=send.secret, event_id=send.event_id, timestamp=timestamp, body=body)}
    try:
        with client.stream("POST", send.url, content=body, headers=headers) as response:
            status, reason, location = response.status_code, response.reason_phrase, response.headers.get("location")
    except Exception as exc:  # noqa: BLE001 - a connection error, a timeout, a URL the client cannot use, ...
        return None, f"{type(exc).__name__}: {exc}"[:500]
    if 200 <= status < 300:
        return status, None
    error = f"HTTP {status} {reason}".rstrip()
    if 300 <= status < 400 and location is not None:
        error += f": redirects are not followed (to {location[:200]})"
    return status, error


def send_due_deliveries(session: Session, *, settings: Settings, now: float | None = None) -> int:
    """Send the deliveries that are due (claimed first, so reapers on other hosts skip them); returns sent."""
    sent: list[int] = []
    timeout = settings.webhook_timeout_seconds
    claim_seconds = max(CLAIM_SECONDS, 4 * TRY_DEADLINE_TIMEOUTS * timeout)
    while len(sent) < BATCH:
        send = _claim_due(session, now=time.time() if now is None else now, sent=sent, claim_seconds=claim_seconds)
        if send is None:
            break
        sent.append(send.pk)
        status_code, error = _send(send, timeout=timeout)
        attempts = send.attempts + 1
        values: dict[str, Any] = {"attempts": attempts, "last_status_code": status_code, "last_error": error}
        if error is None:
            values.update(status="succeeded", delivered_at=now_seconds())
        elif attempts >= settings.webhook_max_attempts:
            values.update(status="failed")
            logger.warning("webhook delivery to %s failed %s times; giving up: %s", send.url, attempts, error)
        else:
            values.update(next_attempt_at=time.time() + backoff_seconds(attempts, settings=settings))
        session.execute(update(WebhookDelivery).where(WebhookDelivery.pk == send.pk).values(**values))
        session.commit()
    return len(sent)


def send_due_webhooks(*, settings: Settings) -> int:
    """One sending pass in its own session (the workers' reaper loop calls this)."""
    with session_scope() as session:
        return send_due_deliveries(session, settings=settings)
