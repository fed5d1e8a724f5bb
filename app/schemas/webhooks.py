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
        problem = webhook_url_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value


# A host name's label (after IDNA encoding), as DNS allows one.
_LABEL = re.compile(r"[A-Za-z0-9_-]{1,63}")


def webhook_url_problem(value: str) -> str | None:
    """Why `value` is no URL a delivery can be sent to, parsed as the sender (httpx) parses it; None when it is one.
    A URL the sender cannot parse would fail every delivery to it."""
    import httpx

    if HTTP_URL.match(value) is None:
        return "url must be an http:// or https:// URL"
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        return "url must not contain spaces or control characters"
    try:
        url = httpx.URL(value)
        host = url.raw_host.decode("ascii")
        port = url.port
    except (httpx.InvalidURL, UnicodeError, ValueError) as exc:
        return f"url is not a valid URL: {exc}"
    if port is not None and not 0 < port < 65536:
        return f"url's port {port} is out of range (1-65535)"
    if ":" not in host and not all(_LABEL.fullmatch(label) for label in host.removesuffix(".").split(".")):
        return f"url's host {url.host!r} is not a valid host name"
    return None


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
