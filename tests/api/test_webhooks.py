from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.core.config import Settings
from app.services.webhooks import send_due_deliveries
from tests.factories import create_job, create_project


@dataclass
class Receiver:
    """A real HTTP server on 127.0.0.1 that records what it gets and answers `status`."""

    url: str
    status: int = 200
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    body: bytes = b"ok"
    trickle_seconds: float = 0.0  # send the body a byte at a time for this long
    header_trickle_seconds: float = 0.0  # send a header a byte at a time for this long, before any body


@contextmanager
def serve_receiver() -> Iterator[Receiver]:
    """Run a Receiver in a thread for the duration of the block."""
    state = Receiver(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            body = self.rfile.read(int(self.headers["content-length"]))
            state.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
            if state.header_trickle_seconds:
                self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                end = time.monotonic() + state.header_trickle_seconds
                while time.monotonic() < end:
                    try:
                        self.wfile.write(b"a")
                        self.wfile.flush()
                    except OSError:  # the sender gave up and closed the connection: what it should do
                        return
                    time.sleep(0.5)
                return
            self.send_response(state.status)
            self.end_headers()
            if not state.trickle_seconds:
                self.wfile.write(state.body)
                return
            end = time.monotonic() + state.trickle_seconds
            while time.monotonic() < end:
                try:
                    self.wfile.write(b".")
                    self.wfile.flush()
                except OSError:  # the sender closed the connection: what it should do
                    return
                time.sleep(0.2)

        def log_message(self, *_args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/tuneforge"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with serve_receiver() as state:
        yield state


def settings(**overrides: Any) -> Settings:
    return Settings(**{"webhook_retry_seconds": 0, "webhook_max_attempts": 3, "webhook_timeout_seconds": 2,
                       **overrides})


def test_endpoints_are_created_listed_scoped_and_deleted(client: TestClient, other_client: TestClient) -> None:
    created = client.post("/v1/webhooks", json={"url": "https://example.test/hook",
                                                "event_types": ["fine_tuning.job.succeeded"]})
    assert created.status_code == 200, created.text
    endpoint = created.json()
    assert endpoint["id"].startswith("wh_") and endpoint["secret"].startswith("whsec_")
    listed = client.get("/v1/webhooks").json()["data"]
    assert [e["id"] for e in listed] == [endpoint["id"]] and "secret" not in listed[0]
    assert other_client.get(f"/v1/webhooks/{endpoint['id']}").status_code == 404
    assert other_client.get("/v1/webhooks").json()["data"] == []
    bad = client.post("/v1/webhooks", json={"url": "ftp://example.test/x"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "url"
    wrong_type = client.post("/v1/webhooks", json={"url": "https://example.test/x", "event_types": ["job.done"]})
    assert wrong_type.status_code == 400
    deleted = client.delete(f"/v1/webhooks/{endpoint['id']}")
    assert deleted.json() == {"id": endpoint["id"], "object": "webhook_endpoint", "deleted": True}
    assert client.get(f"/v1/webhooks/{endpoint['id']}").status_code == 404


def test_cancelled_job_sends_one_signed_openai_shaped_event(client: TestClient, session: Any,
                                                             receiver: Receiver) -> None:
    import openai

    endpoint = client.post("/v1/webhooks", json={"url": receiver.url}).json()
    only_success = client.post("/v1/webhooks", json={"url": receiver.url + "/other",
                                                     "event_types": ["fine_tuning.job.succeeded"]}).json()
    job = create_job(session, project=create_project(session, "team-a"), status="queued")
    assert client.post(f"/v1/fine_tuning/jobs/{job.id}/cancel").json()["status"] == "cancelled"
    pending = client.get(f"/v1/webhooks/{endpoint['id']}/deliveries").json()["data"]
    assert [(d["status"], d["attempts"]) for d in pending] == [("pending", 0)]
    assert client.get(f"/v1/webhooks/{only_success['id']}/deliveries").json()["data"] == []

    assert send_due_deliveries(session, settings=settings()) == 1
    assert len(receiver.received) == 1
    headers, body = receiver.received[0]
    event = json.loads(body)
    assert event == {"id": headers["webhook-id"], "object": "event", "created_at": event["created_at"],
                     "type": "fine_tuning.job.cancelled", "data": {"id": job.id}}
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 60
    # OpenAI's own SDK verifies the signature (Standard Webhooks: HMAC-SHA256 of id.timestamp.body).
    sdk = openai.OpenAI(api_key="unused", base_url="http://127.0.0.1:9")
    sdk.webhooks.verify_signature(body, headers, secret=endpoint["secret"])
    with pytest.raises(openai.InvalidWebhookSignatureError):
        sdk.webhooks.verify_signature(body, headers, secret=only_success["secret"])
    delivered = client.get(f"/v1/webhooks/{endpoint['id']}/deliveries").json()["data"][0]
    assert delivered["status"] == "succeeded" and delivered["attempts"] == 1
    assert delivered["last_status_code"] == 200 and delivered["delivered_at"] is not None
    assert send_due_deliveries(session, settings=settings()) == 0  # sent once, not again


def test_failing_receiver_is_retried_with_backoff_until_the_delivery_fails(client: TestClient, session: Any,
                                                                             receiver: Receiver) -> None:
    receiver.status = 503
    endpoint = client.post("/v1/webhooks", json={"url": receiver.url}).json()
    job = create_job(session, project=create_project(session, "team-a"), status="running")
    client.post(f"/v1/fine_tuning/jobs/{job.id}/cancel")

    slow = settings(webhook_retry_seconds=30)
    assert send_due_deliveries(session, settings=slow) == 1
    first = client.get(f"/v1/webhooks/{endpoint['id']}/deliveries").json()["data"][0]
    assert (first["status"], first["attempts"], first["last_status_code"]) == ("pending", 1, 503)
    assert "HTTP 503" in first["last_error"] and 25 <= first["next_attempt_at"] - time.time() <= 31
    assert send_due_deliveries(session, settings=slow) == 0  # not due before the backoff
    later = time.time() + 31
    assert send_due_deliveries(session, settings=slow, now=later) == 1  # retried; the next wait doubles
    second = client.get(f"/v1/webhooks/{endpoint['id']}/deliveries").json()["data"][0]
    assert second["attempts"] == 2 and 55 <= second["next_attempt_at"] - time.time() <= 61
    assert send_due_deliveries(session, settings=slow, now=later + 61) == 1
    final = client.get(f"/v1/webhooks/{endpoint['id']}/deliveries").json()["data"][0]
    assert (final["status"], final["attempts"], final["next_attempt_at"]) == ("failed", 3, None)
    assert len(receiver.received) == 3
    assert len({h["webhook-id"] for h, _ in receiver.received}) == 1  # the same event id on every retry


def test_unreachable_receiver_records_the_connection_error(client: TestClient, session: Any) -> None:
    endpoint = client.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/closed"}).json()
    job = create_job(session, project=create_project(session, "team-a"), status="queued")
    client.post(f"/v1/fine_tuning/jobs/{job.id}/cancel")
    send_due_deliveries(session, settings=settings())
    delivery = client.get(f"/v1/webhooks/{endpoint['id']}/deliveries").json()["data"][0]
    assert delivery["attempts"] == 1 and delivery["last_status_code"] is None
    assert delivery["last_error"].startswith("ConnectError")


@pytest.mark.parametrize("url", ["http://a\u0000b", "http://x\nInjected: 1", "http://[::1", "http://a..b/",
                                 "http://exa mple.com/", "http://example.com:99999/", "ftp://example.com/"])
def test_a_url_the_sender_cannot_use_is_refused(client: TestClient, url: str) -> None:
    """Found by an audit: only the scheme was checked, and the sender's InvalidURL ended the whole sending pass."""
    response = client.post("/v1/webhooks", json={"url": url})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "url"


def test_a_delivery_that_cannot_be_sent_fails_alone(client: TestClient, session: Any, receiver: Receiver) -> None:
    """An endpoint registered before its URL was checked (or one the client refuses for any reason): its delivery
    records the error and the next one in the pass is sent."""
    from sqlalchemy import update

    from app.models import WebhookEndpoint

    bad = client.post("/v1/webhooks", json={"url": receiver.url + "/bad"}).json()
    good = client.post("/v1/webhooks", json={"url": receiver.url}).json()
    session.execute(update(WebhookEndpoint).where(WebhookEndpoint.id == bad["id"]).values(url="http://x\nInjected: 1/"))
    session.commit()
    job = create_job(session, project=create_project(session, "team-a"), status="queued")
    client.post(f"/v1/fine_tuning/jobs/{job.id}/cancel")
    assert send_due_deliveries(session, settings=settings()) == 2
    failed = client.get(f"/v1/webhooks/{bad['id']}/deliveries").json()["data"][0]
    sent = client.get(f"/v1/webhooks/{good['id']}/deliveries").json()["data"][0]
    assert (failed["status"], failed["attempts"]) == ("pending", 1) and failed["last_error"].startswith("InvalidURL")
    assert sent["status"] == "succeeded" and len(receiver.received) == 1


def test_a_receivers_reply_body_is_neither_read_nor_shown(client: TestClient, session: Any,
                                                         receiver: Receiver) -> None:
    """Found by an audit: the whole reply was read (a 300 MB one took the worker to 2.2 GB), a reply trickled a byte
    at a time held the sender (and the lease reaper beside it) for as long as it lasted, and the first 200 characters
    of any reply were shown to the user: from a URL inside the network, a service's answer the user cannot reach."""
    receiver.status, receiver.body = 401, b"Missing or wrong inference token."
    endpoint = client.post("/v1/webhooks", json={"url": receiver.url}).json()
    job = create_job(session, project=create_project(session, "team-a"), status="queued")
    client.post(f"/v1/fine_tuning/jobs/{job.id}/cancel")
    assert send_due_deliveries(session, settings=settings()) == 1
    delivery = client.get(f"/v1/webhooks/{endpoint['id']}/deliveries").json()["data"][0]
    assert (delivery["last_status_code"], delivery["last_error"]) == (401, "HTTP 401 Unauthorized")

    receiver.status, receiver.trickle_seconds = 200, 30.0
    other = create_job(session, project=create_project(session, "team-a"), status="queued")
    client.post(f"/v1/fine_tuning/jobs/{other.id}/cancel")
    started = time.monotonic()
    assert send_due_deliveries(session, settings=settings(), now=time.time() + 3600) == 2
    assert time.monotonic() - started < 15  # not the 30 s the reply lasts
    deliveries = client.get(f"/v1/webhooks/{endpoint['id']}/deliveries").json()["data"]
    assert [d["status"] for d in deliveries] == ["succeeded", "succeeded"]  # the 401's retry, and the new one


def test_an_event_type_named_twice_is_kept_once(client: TestClient) -> None:
    created = client.post("/v1/webhooks", json={"url": "https://example.com/hook", "event_types": [
        "fine_tuning.job.failed", "fine_tuning.job.failed", "fine_tuning.job.succeeded"]})
    assert created.status_code == 200, created.text
    assert created.json()["event_types"] == ["fine_tuning.job.failed", "fine_tuning.job.succeeded"]


def test_each_delivery_is_claimed_just_before_it_is_sent(client: TestClient, session: Any, receiver: Receiver,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A pass claimed all its deliveries at once, for 60 s: behind slow receivers the later claims lapsed, and another
    worker's sender took those deliveries too (sent twice). Now each is claimed as its turn comes."""
    from sqlalchemy import select

    from app.models import WebhookDelivery
    from app.services import webhooks

    for path in ("/a", "/b"):
        client.post("/v1/webhooks", json={"url": receiver.url + path})
    job = create_job(session, project=create_project(session, "team-a"), status="queued")
    client.post(f"/v1/fine_tuning/jobs/{job.id}/cancel")
    real_post = webhooks._post
    claimed_while_sending: list[int] = []

    def post(send: Any, *, client: Any) -> Any:
        claims = session.scalars(select(WebhookDelivery.next_attempt_at).where(WebhookDelivery.status == "pending"))
        claimed_while_sending.append(sum(1 for at in claims if at > time.time() + 30))
        return real_post(send, client=client)

    monkeypatch.setattr(webhooks, "_post", post)
    assert send_due_deliveries(session, settings=settings()) == 2
    assert claimed_while_sending == [1, 1]  # only the one being sent (the first is done when the second goes)
    assert len(receiver.received) == 2


def test_a_receiver_answering_a_byte_at_a_time_is_given_up_on(client: TestClient, session: Any,
                                                              receiver: Receiver) -> None:
    """Found by a review: httpx's timeout bounds each read, so headers sent a byte every half second held the sender
    (and the deliveries behind it) for as long as the receiver liked. A try now ends after three timeouts in all."""
    receiver.header_trickle_seconds = 40.0
    endpoint = client.post("/v1/webhooks", json={"url": receiver.url}).json()
    job = create_job(session, project=create_project(session, "team-a"), status="queued")
    client.post(f"/v1/fine_tuning/jobs/{job.id}/cancel")
    started = time.monotonic()
    assert send_due_deliveries(session, settings=settings(webhook_timeout_seconds=1)) == 1
    assert time.monotonic() - started < 20  # not the 40 s the answer would take
    delivery = client.get(f"/v1/webhooks/{endpoint['id']}/deliveries").json()["data"][0]
    assert (delivery["status"], delivery["attempts"], delivery["last_status_code"]) == ("pending", 1, None)
    assert delivery["last_error"] == "Timeout: no complete answer within 3 s"
