from __future__ import annotations

from typing import Any

from sqlalchemy import Double, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, BigIntKey, JSONType, KeyedMixin, now_seconds


class WebhookEndpoint(KeyedMixin, Base):
    """A project's URL that receives signed job events."""

    __tablename__ = "webhook_endpoints"
    __table_args__ = (Index("ix_webhook_endpoints_project_pk_pk", "project_pk", "pk"),)

    id: Mapped[str] = mapped_column(String(64), unique=True)
    project_pk: Mapped[int] = mapped_column(BigIntKey, ForeignKey("projects.pk", ondelete="CASCADE"))
    url: Mapped[str] = mapped_column(String(2048))
    # "whsec_" + base64 key (Standard Webhooks, as OpenAI's SDK verifies it). Kept readable: the
    # sender needs it to sign; shown to the user once, at creation.
    secret: Mapped[str] = mapped_column(String(128))
    # Event types this endpoint receives, e.g. ["fine_tuning.job.succeeded"].
    event_types: Mapped[list[str]] = mapped_column(JSONType)
    created_at: Mapped[int] = mapped_column(Integer, default=now_seconds)


class WebhookDelivery(KeyedMixin, Base):
    """One event for one endpoint: enqueued with the job's terminal transition, sent by worker reapers."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_status_next_attempt_at", "status", "next_attempt_at"),
        Index("ix_webhook_deliveries_endpoint_pk_pk", "endpoint_pk", "pk"),
    )

    id: Mapped[str] = mapped_column(String(64), unique=True)
    endpoint_pk: Mapped[int] = mapped_column(BigIntKey, ForeignKey("webhook_endpoints.pk", ondelete="CASCADE"))
    # The event's id (webhook-id header): the same on every retry, so receivers can de-duplicate.
    event_id: Mapped[str] = mapped_column(String(64))
    event_type: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]] = mapped_column(JSONType)
    # pending (waiting or retrying) | succeeded | failed (gave up after the last attempt)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Unix seconds (float); a sender claims a delivery by pushing this forward before it posts.
    next_attempt_at: Mapped[float] = mapped_column(Double)
    last_status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_error: Mapped[str | None] = mapped_column(String(500), nullable=True)
    created_at: Mapped[int] = mapped_column(Integer, default=now_seconds)
    delivered_at: Mapped[int | None] = mapped_column(Integer, nullable=True)
