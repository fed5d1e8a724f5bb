"""The inference role's process (`tuneforge worker --inference`): an internal HTTP server the API forwards
generation requests to (protocol: app/services/inference.py).

One generation runs at a time (a model call uses every core, or the whole GPU); up to
TUNEFORGE_INFERENCE_MAX_QUEUE more wait, and past that the answer is 429 at once. Each request is generated in a
thread of its own that feeds a queue the response streams from; when the API goes away mid-answer (its client
left, or it died) the thread sees the cancellation at its next token and frees the generator.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import queue
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from app.core.config import Settings
from app.core.db import session_scope
from app.core.errors import envelope
from app.schemas.training import AnswerBudget
from app.services import evaluations, inference
from app.services.files import build_result_file
from worker.inference.engine import Engine, Refusal
from worker.registration import worker_name

logger = logging.getLogger("tuneforge.inference")
# How often a waiting request checks that its caller is still there.
WAIT_POLL_SECONDS = 0.5


def _refusal(status: int, message: str, code: str, param: str | None = None) -> dict[str, Any]:
    return {"type": "refused", "status": status, "code": code, "message": message, "param": param}


class Generations:
    """The bounded queue in front of the engine, and the per-request threads."""

    def __init__(self, engine: Engine, *, max_queue: int) -> None:
        self.engine = engine
        self.slots = threading.BoundedSemaphore(max_queue + 1)  # one generating, max_queue waiting
        self.turn = threading.Lock()
        self.in_flight = 0
        self._count = threading.Lock()

    def _run(self, request: dict[str, Any], lines: queue.Queue[dict[str, Any]], cancelled: threading.Event) -> None:
        started = False
        try:
            with self.turn:
                if cancelled.is_set():
                    return
                prepared = self.engine.prepare(request)
                lines.put({"type": "start", "prompt_tokens": len(prepared.prompt)})
                started = True
                for line in self.engine.generate(prepared, cancelled=cancelled):
                    lines.put(line)
                lines.put({"type": "done"})
        except Refusal as exc:
            lines.put(_refusal(exc.status, exc.message, exc.code, exc.param) if not started else
                      {"type": "error", "code": exc.code, "message": exc.message})
        except Exception as exc:  # the request fails, the process lives on
            logger.exception("generation failed")
            message = self.engine.for_clients(f"Generation failed: {type(exc).__name__}: {exc}")
            lines.put(_refusal(500, message, "inference_failed") if not started else
                      {"type": "error", "code": "inference_failed", "message": message})

    def _evaluate(self, evaluation_id: str, server: str) -> None:
        """Run one answer report (POST .../evaluations), in its turn like a generation; its row says how it went."""
        try:
            with self.turn:
                with session_scope() as session:
                    row = evaluations.start(session, evaluation_id=evaluation_id)
                    if row is None:
                        return
                    target, project_pk = dict(row.target), row.project_pk
                    budget = AnswerBudget(max_examples=row.max_examples, max_new_tokens=row.max_new_tokens)
                report, samples = self.engine.evaluate(target, budget=budget)
                files = []
                for name, data in (("eval_report.json", json.dumps(report, indent=2).encode()),
                                   ("eval_samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples).encode())):
                    stored = self.engine.storage.write(f"evaluations/{evaluation_id}/{name}", [data])
                    files.append(build_result_file(project_pk=project_pk, filename=f"{evaluation_id}-{name}",
                                                   blob_key=stored.key, size=stored.bytes, sha256=stored.sha256))
                with session_scope() as session:
                    recorded = evaluations.finish(session, evaluation_id=evaluation_id, report=report, files=files)
                if not recorded:  # it was marked failed meanwhile: nothing names the bytes written above
                    for file in files:
                        self.engine.storage.delete(file.blob_key)
        except Exception as exc:
            logger.exception("evaluation %s failed on %s", evaluation_id, server)
            message = exc.message if isinstance(exc, Refusal) else f"{type(exc).__name__}: {exc}"
            try:
                with session_scope() as session:
                    evaluations.finish(session, evaluation_id=evaluation_id, report=None, files=[],
                                       error=self.engine.for_clients(message))
            except Exception:  # the database away: the row stays running; the log says why
                logger.exception("could not record the failure of evaluation %s", evaluation_id)

    def _spawn(self, work: Callable[[], None], *, name: str) -> bool:
        """Run `work` in a thread of its own, holding one of the queue's places until it ends; False when full."""
        if not self.slots.acquire(blocking=False):
            return False
        with self._count:
            self.in_flight += 1

        def run() -> None:
            try:
                work()
            finally:
                with self._count:
                    self.in_flight -= 1
                self.slots.release()

        threading.Thread(target=run, daemon=True, name=name).start()
        return True

    def submit_evaluation(self, evaluation_id: str, server: str) -> bool:
        return self._spawn(lambda: self._evaluate(evaluation_id, server), name="evaluation")

    def submit(self, request: dict[str, Any]) -> tuple[queue.Queue[dict[str, Any]], threading.Event] | None:
        lines: queue.Queue[dict[str, Any]] = queue.Queue()
        cancelled = threading.Event()
        if not self._spawn(lambda: self._run(request, lines, cancelled), name="generation"):
            return None
        return lines, cancelled


def build_app(generations: Generations, *, token: str, name: str = "inference") -> FastAPI:
    app = FastAPI(title="tuneforge inference (internal)", openapi_url=None, docs_url=None, redoc_url=None)

    @app.middleware("http")
    async def only_the_api(request: Request, call_next: Any) -> Any:
        """Requests must carry the token this process wrote to its database row (the API reads it there)."""
        given = request.headers.get(inference.TOKEN_HEADER, "")
        if request.url.path != inference.HEALTH_PATH and not hmac.compare_digest(given, token):
            return JSONResponse(envelope("Missing or wrong inference token.", type_="authentication_error",
                                         param=None, code="invalid_api_key"), status_code=401)
        return await call_next(request)

    @app.post(inference.EVALUATIONS_PATH)
    async def evaluate(request: Request) -> Any:
        body = await request.json()
        if not generations.submit_evaluation(str(body["id"]), name):
            return JSONResponse(envelope("The inference worker's queue is full; retry shortly.",
                                         type_="rate_limit_error", param=None, code="inference_busy"),
                                status_code=429)
        return JSONResponse({"server": name}, status_code=202)

    @app.get(inference.HEALTH_PATH)
    def health() -> dict[str, Any]:
        return {"status": "ok", "loaded": generations.engine.loaded_bases(), "in_flight": generations.in_flight}

    @app.post(inference.GENERATE_PATH)
    async def generate(request: Request) -> Any:
        body = await request.json()
        submitted = generations.submit(body)
        if submitted is None:
            return JSONResponse(envelope("The inference worker's queue is full; retry shortly.",
                                         type_="rate_limit_error", param=None, code="inference_busy"),
                                status_code=429)
        lines, cancelled = submitted
        # While it waits for its turn (and its model), a request whose caller gave up (the API timed out, or its
        # client left) gives its place back instead of generating for nobody: a pending receive() is what makes the
        # server read the connection, and it answers http.disconnect once the caller closed it.
        gone = asyncio.ensure_future(request.receive())
        try:
            while True:
                try:
                    first = await run_in_threadpool(lines.get, True, WAIT_POLL_SECONDS)
                    break
                except queue.Empty:
                    if gone.done():
                        cancelled.set()
                        return Response(status_code=499)
        except BaseException:
            cancelled.set()
            raise
        finally:
            gone.cancel()
        if first["type"] == "refused":
            return JSONResponse(envelope(first["message"], type_="invalid_request_error" if first["status"] < 500
                                         else "server_error", param=first["param"], code=first["code"]),
                                status_code=first["status"])

        async def stream() -> AsyncIterator[bytes]:
            line = first
            try:
                while True:
                    yield (json.dumps(line) + "\n").encode()
                    if line["type"] in ("done", "error"):
                        return
                    line = await run_in_threadpool(lines.get)
            finally:
                cancelled.set()

        return StreamingResponse(stream(), media_type="application/x-ndjson")

    return app


def _heartbeat(settings: Settings, name: str, generations: Generations, stop: threading.Event) -> None:
    while not stop.wait(settings.heartbeat_seconds):
        try:
            with session_scope() as session:
                inference.record_heartbeat(session, name=name, loaded=generations.engine.loaded_bases(),
                                           queued=generations.in_flight)
        except Exception:  # the database away for a moment: the next beat tries again
            logger.warning("inference heartbeat failed", exc_info=True)


def serve(settings: Settings) -> None:
    """Bind, register in the database, serve until SIGTERM/SIGINT, then unregister."""
    import uvicorn

    from app.core.storage import get_storage

    engine = Engine(settings, storage=get_storage())
    generations = Generations(engine, max_queue=settings.inference_max_queue)
    sock = socket.socket(socket.AF_INET6 if ":" in settings.inference_host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.inference_host, settings.inference_port))
    port = sock.getsockname()[1]
    host = settings.inference_host if settings.inference_host not in ("0.0.0.0", "::") else socket.gethostname()
    url = settings.inference_url or f"http://{f'[{host}]' if ':' in host else host}:{port}"
    name = f"{worker_name(settings)}/inference"
    token = secrets.token_hex(16)
    with session_scope() as session:
        inference.register_server(session, name=name, hostname=socket.gethostname(), pid=os.getpid(), url=url,
                                  device=str(engine.device), token=token)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(settings, name, generations, stop), daemon=True)
    beat.start()
    logger.info("inference worker %s serving at %s on %s", name, url, engine.device)
    config = uvicorn.Config(build_app(generations, token=token, name=name), log_level="warning",
                            timeout_graceful_shutdown=int(settings.stop_grace_seconds))
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        stop.set()
        with session_scope() as session:
            inference.remove_server(session, name=name)
        logger.info("inference worker %s stopped at %s", name, time.strftime("%H:%M:%S"))
