"""Generation through inference processes: which weights a model id means, which process serves it, and the
internal protocol between the API and that process.

Transport: plain HTTP from the API to the process's internal address (its row in `inference_servers`). The
request is one JSON body; the answer is a stream of JSON lines (`start`, `delta`, `end`, `error`), so tokens
reach the client as they are generated. The process bounds its queue (429 when full), the API bounds every
wait (connect, first byte, each next line: TUNEFORGE_INFERENCE_TIMEOUT_SECONDS), and a process dying mid-answer
ends the stream with an error the client can read: a closed connection is never taken for a finished answer.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.errors import APIError, InvalidRequest, NotFound, RateLimited
from app.models import InferenceServer, Project
from app.models.registered_model import USABLE_STATUSES
from app.schemas.training import TrainingConfig
from app.services import artifacts, base_models

# The internal routes of an inference process, and the header that carries its token: a secret each process draws
# at start and writes to its row, so only callers that can read the database (the API) reach its port.
GENERATE_PATH = "/generate"
EVALUATIONS_PATH = "/evaluations"
HEALTH_PATH = "/healthz"
TOKEN_HEADER = "x-tuneforge-inference-token"
# Seconds a client is told to wait when no inference process can take its request.
INFERENCE_RETRY_AFTER_SECONDS = 5


class InferenceUnavailable(APIError):
    status_code = 503
    type = "server_error"

    def __init__(self, message: str) -> None:
        super().__init__(message, code="inference_unavailable",
                         headers={"retry-after": str(INFERENCE_RETRY_AFTER_SECONDS)})


class InferenceFailed(APIError):
    """The inference process stopped or failed while answering."""

    status_code = 502
    type = "server_error"

    def __init__(self, message: str, *, code: str = "inference_failed") -> None:
        super().__init__(message, code=code)


class InferenceTimeout(APIError):
    status_code = 504
    type = "server_error"

    def __init__(self, message: str) -> None:
        super().__init__(message, code="inference_timeout")


@dataclass(frozen=True)
class Target:
    """The weights a model id names: a base model, plus a fine-tuned model's weights stored as an archive."""

    model: str
    base: str
    # None for a base model; else the storage key of the adapter (or full weights) archive.
    weights_key: str | None = None
    # A full fine-tune's weights replace the base's; an adapter attaches to it.
    full: bool = False
    # The base's registration (base_models.revision_of): an inference worker holding the name's earlier weights
    # loads these instead.
    base_revision: str | None = None

    def as_request(self) -> dict[str, Any]:
        return {"model": self.model, "base": self.base, "weights_key": self.weights_key, "full": self.full,
                "base_revision": self.base_revision}


def resolve_target(session: Session, *, settings: Settings, project: Project, model: str) -> Target:
    """What `model` names for this project; 404 for another project's fine-tuned model (as for any unknown id)."""
    base = base_models.find(session, settings=settings, name=model)
    if base is not None:
        if base.status not in USABLE_STATUSES:
            raise InvalidRequest(f"Model {model!r} is {base.status}: {base.error or 'not ready yet'}", param="model",
                                 code="model_not_available")
        return Target(model=model, base=model, base_revision=base_models.revision_of(base))
    job, step = artifacts.find_fine_tuned_model(session, project=project, model_id=model)
    base = base_models.find(session, settings=settings, name=job.base_model)
    if base is not None:  # else the inference worker answers that it is no longer registered
        base_models.check_trained_on(job, base, model=model)
    adapter_type = TrainingConfig.model_validate(job.config).adapter.type
    name = f"checkpoint-step-{step}" if step is not None else artifacts.weights_artifact(adapter_type)
    key = artifacts.get_artifact(session, job=job, name=name).blob_key
    return Target(model=model, base=job.base_model, weights_key=key, full=adapter_type == "full",
                  base_revision=base_models.revision_of(base) if base is not None else None)


def live_servers(session: Session, *, settings: Settings) -> list[InferenceServer]:
    fresh = time.time() - settings.resolved_worker_stale_seconds  # the one staleness rule, as for workers
    return list(session.scalars(select(InferenceServer).where(InferenceServer.heartbeat_at >= fresh)
                                .order_by(InferenceServer.queued, InferenceServer.pk)))


def servers_for(session: Session, *, settings: Settings, target: Target) -> list[tuple[str, str]]:
    """Live inference processes' (address, token), those with the base already loaded first, then the least busy."""
    servers = live_servers(session, settings=settings)
    if not servers:
        raise InferenceUnavailable("No inference worker is running: start one with `tuneforge worker --inference` "
                                   "(`tuneforge serve` starts one).")
    warm = [s for s in servers if target.base in (s.loaded or [])]
    return [(s.url, s.token) for s in warm + [s for s in servers if s not in warm]]


def register_server(session: Session, *, name: str, hostname: str, pid: int, url: str, device: str,
                    token: str) -> None:
    session.execute(delete(InferenceServer).where(InferenceServer.name == name))
    now = time.time()
    session.add(InferenceServer(name=name, hostname=hostname, pid=pid, url=url, device=device, token=token,
                                loaded=[], queued=0, started_at=now, heartbeat_at=now))


def record_heartbeat(session: Session, *, name: str, loaded: list[str], queued: int) -> None:
    server = session.scalar(select(InferenceServer).where(InferenceServer.name == name))
    if server is not None:
        server.heartbeat_at, server.loaded, server.queued = time.time(), loaded, queued


def remove_server(session: Session, *, name: str) -> None:
    session.execute(delete(InferenceServer).where(InferenceServer.name == name))


def error_from(response: httpx.Response) -> APIError:
    """An inference process's refusal (its body carries our envelope), as the error the client gets."""
    try:
        error = response.json()["error"]
        message, code, param = error["message"], error.get("code"), error.get("param")
    except (ValueError, KeyError, TypeError):
        return InferenceFailed(f"The inference process answered {response.status_code} without an explanation.")
    if response.status_code == 429:
        return RateLimited(message, retry_after=1, code=code or "inference_busy")
    if response.status_code == 400:
        return InvalidRequest(message, param=param, code=code)
    if response.status_code == 404:
        return NotFound(message, param=param)
    return InferenceFailed(message, code=code or "inference_failed")


def generate(urls: list[tuple[str, str]], request: dict[str, Any], *, settings: Settings) -> Iterator[dict[str, Any]]:
    """Send a generation request to the first process that takes it and yield its lines (dicts).

    Raises before the first line (refused, busy everywhere, unreachable, too slow); after it, a failure is
    yielded as a final {"type": "error", ...} line, for the caller to end its stream with.
    """
    timeout = httpx.Timeout(settings.inference_timeout_seconds, connect=5.0)
    busy: APIError | None = None
    for url, token in urls:
        headers = {TOKEN_HEADER: token}
        client = httpx.Client(timeout=timeout)
        try:
            response = client.send(client.build_request("POST", url + GENERATE_PATH, json=request, headers=headers),
                                   stream=True)
        except httpx.ConnectTimeout:
            client.close()
            continue  # unreachable (a host that went away): try the next one
        except httpx.TimeoutException as exc:
            client.close()
            raise InferenceTimeout(f"The inference process did not answer within "
                                   f"{settings.inference_timeout_seconds:g} s.") from exc
        except httpx.TransportError:
            client.close()
            continue  # died since its last heartbeat: try the next one
        if response.status_code != 200:
            response.read()
            error = error_from(response)
            response.close()
            client.close()
            if response.status_code == 429:
                busy = error
                continue
            raise error
        return _lines(client, response, settings=settings)
    if busy is not None:
        raise busy
    raise InferenceUnavailable("No inference worker could be reached; they may be restarting. Retry shortly.")


def _lines(client: httpx.Client, response: httpx.Response, *, settings: Settings) -> Iterator[dict[str, Any]]:
    finished = False
    try:
        for line in response.iter_lines():
            if not line:
                continue
            record = json.loads(line)
            yield record
            if record.get("type") in ("done", "error"):
                finished = True
                return
    except httpx.TimeoutException:
        finished = True
        yield {"type": "error", "code": "inference_timeout",
               "message": f"The inference process sent nothing for {settings.inference_timeout_seconds:g} s."}
    except (httpx.TransportError, json.JSONDecodeError):
        pass
    finally:
        response.close()
        client.close()
    if not finished:
        yield {"type": "error", "code": "inference_failed",
               "message": "The inference process stopped while answering; the answer is incomplete. Retry."}
