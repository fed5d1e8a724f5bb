"""Chat completions and completions on base, fine-tuned and checkpoint models (OpenAI's wire format)."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from app.api.deps import BriefProject, BriefSessionDep, SettingsDep
from app.api.openapi import errors
from app.core.errors import envelope
from app.schemas.inference import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionCreate,
    ChunkDelta,
    Completion,
    CompletionChoice,
    CompletionCreate,
    Usage,
    _Sampling,
)
from app.services import inference

router = APIRouter(tags=["inference"])


def _streamed(schema: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """The 200 answer: JSON, or with stream: true server-sent events whose data lines are `schema`."""
    return {200: {"description": "The completion; with `stream: true`, `text/event-stream` of `data:` lines, each "
                                 f"a {schema.__name__} (an `error` object if generation failed midway), then "
                                 "`data: [DONE]`.",
                  "content": {"text/event-stream": {"schema": {"type": "string"}}}},
            **errors(404, 502, 504)}


def _run(body: _Sampling, prompt: dict[str, Any], *, session: BriefSessionDep, project: BriefProject,
         settings: SettingsDep) -> Iterator[dict[str, Any]]:
    target = inference.resolve_target(session, settings=settings, project=project, model=body.model)
    urls = inference.servers_for(session, settings=settings, target=target)
    session.close()  # a long answer must not hold a database connection
    request = {**target.as_request(), "prompt": prompt,
               **body.generation(max_new_tokens=settings.inference_max_new_tokens)}
    return inference.generate(urls, request, settings=settings)


def _raise_if_error(line: dict[str, Any]) -> None:
    if line["type"] == "error":
        if line.get("code") == "inference_timeout":
            raise inference.InferenceTimeout(line["message"])
        raise inference.InferenceFailed(line["message"], code=line.get("code") or "inference_failed")


def _collect(lines: Iterator[dict[str, Any]], n: int) -> tuple[list[str], list[str], Usage]:
    """A whole answer: each choice's text and finish reason, and the usage."""
    texts, reasons = [""] * n, ["stop"] * n
    prompt_tokens = completion_tokens = 0
    for line in lines:
        _raise_if_error(line)
        if line["type"] == "start":
            prompt_tokens = line["prompt_tokens"]
        elif line["type"] == "delta":
            texts[line["index"]] += line["text"]
        elif line["type"] == "end":
            reasons[line["index"]] = line["finish_reason"]
            completion_tokens += line["completion_tokens"]
    return texts, reasons, Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                 total_tokens=prompt_tokens + completion_tokens)


def _sse(lines: Iterator[dict[str, Any]], *, chunk: Callable[[dict[str, Any]], BaseModel | None],
         usage_chunk: Callable[[Usage], BaseModel] | None) -> Iterator[str]:
    """Server-sent events from the inference lines: a chunk per line that makes one, the usage, [DONE]; a failure
    midway ends the stream with an error object (which the openai SDK raises as APIError), never silently."""
    prompt_tokens = completion_tokens = 0
    for line in lines:
        if line["type"] == "error":
            error = envelope(line["message"], type_="server_error", param=None, code=line.get("code"))
            yield f"data: {json.dumps(error)}\n\n"
            return
        if line["type"] == "start":
            prompt_tokens = line["prompt_tokens"]
        if line["type"] == "end":
            completion_tokens += line["completion_tokens"]
        made = chunk(line)
        if made is not None:
            yield f"data: {made.model_dump_json()}\n\n"
    if usage_chunk is not None:
        usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                      total_tokens=prompt_tokens + completion_tokens)
        yield f"data: {usage_chunk(usage).model_dump_json()}\n\n"
    yield "data: [DONE]\n\n"


def _event_stream(events: Iterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"cache-control": "no-cache", "x-accel-buffering": "no"})


@router.post("/chat/completions", response_model=ChatCompletion, responses=_streamed(ChatCompletionChunk))
def create_chat_completion(body: ChatCompletionCreate, session: BriefSessionDep, project: BriefProject,
                           settings: SettingsDep) -> ChatCompletion | StreamingResponse:
    """Generate the assistant's answer to a conversation with a base model, a fine-tuned model or a checkpoint."""
    lines = _run(body, body.prompt(), session=session, project=project, settings=settings)
    common = {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": body.model}
    if not body.stream:
        texts, reasons, usage = _collect(lines, body.n)
        return ChatCompletion(**common, usage=usage, choices=[  # type: ignore[arg-type]
            ChatChoice(index=i, message=AssistantMessage(content=text), finish_reason=reason)  # type: ignore[arg-type]
            for i, (text, reason) in enumerate(zip(texts, reasons, strict=True))])

    def chunk(line: dict[str, Any]) -> ChatCompletionChunk | None:
        if line["type"] == "begin":
            delta, reason = ChunkDelta(role="assistant", content=""), None
        elif line["type"] == "delta":
            delta, reason = ChunkDelta(content=line["text"]), None
        elif line["type"] == "end":
            delta, reason = ChunkDelta(), line["finish_reason"]
        else:
            return None
        return ChatCompletionChunk(**common, choices=[  # type: ignore[arg-type]
            ChatChunkChoice(index=line["index"], delta=delta, finish_reason=reason)])

    include_usage = body.stream_options is not None and body.stream_options.include_usage
    usage_chunk = (lambda usage: ChatCompletionChunk(**common, choices=[], usage=usage)) if include_usage else None  # type: ignore[arg-type]
    return _event_stream(_sse(lines, chunk=chunk, usage_chunk=usage_chunk))


@router.post("/completions", response_model=Completion, responses=_streamed(Completion))
def create_completion(body: CompletionCreate, session: BriefSessionDep, project: BriefProject,
                      settings: SettingsDep) -> Completion | StreamingResponse:
    """Continue a text prompt with a base model, a fine-tuned model or a checkpoint (the legacy completions API)."""
    lines = _run(body, {"text": body.prompt}, session=session, project=project, settings=settings)
    common = {"id": f"cmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": body.model}
    echo = body.prompt if body.echo else ""
    if not body.stream:
        texts, reasons, usage = _collect(lines, body.n)
        return Completion(**common, usage=usage, choices=[  # type: ignore[arg-type]
            CompletionChoice(index=i, text=echo + text, finish_reason=reason)  # type: ignore[arg-type]
            for i, (text, reason) in enumerate(zip(texts, reasons, strict=True))])

    def chunk(line: dict[str, Any]) -> Completion | None:
        if line["type"] == "begin" and echo:
            text, reason = echo, None
        elif line["type"] == "delta":
            text, reason = line["text"], None
        elif line["type"] == "end":
            text, reason = "", line["finish_reason"]
        else:
            return None
        return Completion(**common, choices=[  # type: ignore[arg-type]
            CompletionChoice(index=line["index"], text=text, finish_reason=reason)])

    include_usage = body.stream_options is not None and body.stream_options.include_usage
    usage_chunk = (lambda usage: Completion(**common, choices=[], usage=usage)) if include_usage else None  # type: ignore[arg-type]
    return _event_stream(_sse(lines, chunk=chunk, usage_chunk=usage_chunk))

