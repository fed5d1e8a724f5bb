from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import CurrentProject, SessionDep, SettingsDep
from app.api.routes.files import check_limit
from app.models import WebhookDelivery, WebhookEndpoint
from app.schemas.webhooks import (
    DeliveryList,
    DeliveryPublic,
    WebhookCreate,
    WebhookCreated,
    WebhookDeleted,
    WebhookList,
    WebhookPublic,
)
from app.services import webhooks as webhook_service

router = APIRouter(prefix="/webhooks", tags=["webhooks"])


def webhook_public(endpoint: WebhookEndpoint) -> WebhookPublic:
    return WebhookPublic(id=endpoint.id, url=endpoint.url, event_types=endpoint.event_types,
                         created_at=endpoint.created_at)


def delivery_public(delivery: WebhookDelivery) -> DeliveryPublic:
    return DeliveryPublic(
        id=delivery.id, event_id=delivery.event_id, event_type=delivery.event_type,
        status=delivery.status,  # type: ignore[arg-type]
        attempts=delivery.attempts, last_status_code=delivery.last_status_code, last_error=delivery.last_error,
        next_attempt_at=int(delivery.next_attempt_at) if delivery.status == "pending" else None,
        created_at=delivery.created_at, delivered_at=delivery.delivered_at, payload=delivery.payload)


@router.post("", response_model=WebhookCreated)
def create_webhook(session: SessionDep, project: CurrentProject, body: WebhookCreate) -> WebhookCreated:
    """Register a URL for signed job events; the response shows its signing secret, once."""
    endpoint = webhook_service.create_endpoint(session, project=project, url=body.url, event_types=body.event_types)
    return WebhookCreated(**webhook_public(endpoint).model_dump(), secret=endpoint.secret)


@router.get("", response_model=WebhookList)
def list_webhooks(session: SessionDep, project: CurrentProject) -> WebhookList:
    """The project's webhook endpoints (secrets are never shown again)."""
    return WebhookList(data=[webhook_public(e) for e in webhook_service.list_endpoints(session, project=project)],
                       has_more=False)


@router.get("/{webhook_id}", response_model=WebhookPublic)
def read_webhook(session: SessionDep, project: CurrentProject, webhook_id: str) -> WebhookPublic:
    """Retrieve a webhook endpoint."""
    return webhook_public(webhook_service.get_endpoint(session, project=project, endpoint_id=webhook_id))


@router.delete("/{webhook_id}", response_model=WebhookDeleted)
def delete_webhook(session: SessionDep, project: CurrentProject, webhook_id: str) -> WebhookDeleted:
    """Delete a webhook endpoint and its delivery history."""
    webhook_service.delete_endpoint(session, project=project, endpoint_id=webhook_id)
    return WebhookDeleted(id=webhook_id)


@router.get("/{webhook_id}/deliveries", response_model=DeliveryList)
def list_webhook_deliveries(session: SessionDep, project: CurrentProject, settings: SettingsDep, webhook_id: str,
                            limit: int = 20) -> DeliveryList:
    """The endpoint's deliveries, newest first: status, attempts and the last error."""
    check_limit(limit, settings.list_limit_max)
    endpoint = webhook_service.get_endpoint(session, project=project, endpoint_id=webhook_id)
    rows, has_more = webhook_service.list_deliveries(session, endpoint=endpoint, limit=limit)
    return DeliveryList(data=[delivery_public(d) for d in rows], has_more=has_more)
