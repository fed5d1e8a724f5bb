from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from app.schemas.common import REQUEST_MODEL, ListPage

EventType = Literal["fine_tuning.job.succeeded", "fine_tuning.job.failed", "fine_tuning.job.cancelled"]


# An http(s) URL whose host starts with a letter, a digit or "[" (IPv6): the validator's rule, documented as the
# field's pattern. ASCII classes only, so every regex engine that reads the document agrees with this one.
HTTP_URL = re.compile(r"^https?://[A-Za-z0-9\[]")


class WebhookCreate(BaseModel):
    model_config = REQUEST_MODEL

    url: str = Field(max_length=2048, json_schema_extra={"pattern": HTTP_URL.pattern})
    # Omitted: all three job events.
    event_types: list[EventType] | None = Field(default=None, min_length=1)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if HTTP_URL.match(value) is None:
            raise ValueError("url must be an http:// or https:// URL")
        return value


class WebhookPublic(BaseModel):
    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    url: str
    event_types: list[str]
    created_at: int


class WebhookCreated(WebhookPublic):
    # Shown once: verify deliveries with it (openai's client.webhooks.unwrap(..., secret=...) works).
    secret: str


class WebhookList(ListPage[WebhookPublic]):
    pass


class WebhookDeleted(BaseModel):
    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    deleted: bool = True


class DeliveryPublic(BaseModel):
    id: str
    object: Literal["webhook.delivery"] = "webhook.delivery"
    event_id: str
    event_type: str
    status: Literal["pending", "succeeded", "failed"]
    attempts: int
    last_status_code: int | None
    last_error: str | None
    next_attempt_at: int | None
    created_at: int
    delivered_at: int | None
    payload: dict[str, Any]


class DeliveryList(ListPage[DeliveryPublic]):
    pass
