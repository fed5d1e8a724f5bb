"""Chat completions and completions in OpenAI's wire format (what the `openai` SDK sends and reads).

Generation runs in an inference process (`tuneforge worker --inference`); these schemas are the API's side.
Parameters OpenAI has and we do not implement are refused by name (extra="forbid") rather than ignored, so
a request never silently means something else; `user`, `store` and `metadata` are accepted and ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationInfo,
    field_validator,
    model_validator,
)

from app.schemas.common import REQUEST_MODEL
from app.schemas.files import template_role

# The most choices (n) and stop sequences one request may ask for (OpenAI allows 4 stop sequences).
MAX_CHOICES = 8
MAX_STOP_SEQUENCES = 4
# Temperatures below this answer greedily, as 0 does: dividing the logits by a tinier one can overflow them to inf
# (sampling then fails on inf/nan), and sampling at it differs from greedy only between tokens whose logits are
# within about 1e-4 of each other (vLLM's _SAMPLING_EPS is the same).
GREEDY_TEMPERATURE = 1e-5


class TextPart(BaseModel):
    model_config = REQUEST_MODEL

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = REQUEST_MODEL

    role: Literal["system", "developer", "user", "assistant"]
    # A string, or text parts (joined); images and audio are not supported by the inference role.
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = REQUEST_MODEL

    include_usage: StrictBool = False


class _Sampling(BaseModel):
    """What chat completions and completions share."""

    model_config = REQUEST_MODEL

    model: str = Field(min_length=1, description="A base model, a fine-tuned model id (ft:...) or a checkpoint id "
                                                 "(ft:...:ckpt-step-N) of this project.")
    max_tokens: StrictInt | None = Field(default=None, ge=1, description="Tokens to generate at most (capped by the "
                                                                   "server's TUNEFORGE_INFERENCE_MAX_NEW_TOKENS).")
    temperature: StrictFloat = Field(default=1.0, ge=0, le=2, description=f"0 is greedy, as is any temperature "
                                                                          f"below {GREEDY_TEMPERATURE:g}.")
    top_p: StrictFloat = Field(default=1.0, gt=0, le=1)
    n: StrictInt = Field(default=1, ge=1, le=MAX_CHOICES)
    stop: str | list[str] | None = Field(default=None, description=f"Up to {MAX_STOP_SEQUENCES} sequences; the "
                                                                   "text stops before the first one generated.")
    seed: StrictInt | None = Field(default=None, ge=0, le=2**63 - 1, description="Same seed, same parameters, same "
                                                                            "model and device: the same answer.")
    stream: StrictBool = False
    stream_options: StreamOptions | None = Field(default=None, description="Only with stream: true.")
    # Sent by many clients with their neutral values; only those are accepted.
    frequency_penalty: StrictFloat | None = Field(default=None, description="Only 0 (not implemented).")
    presence_penalty: StrictFloat | None = Field(default=None, description="Only 0 (not implemented).")
    user: str | None = None
    store: StrictBool | None = None
    metadata: dict[str, str] | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str] | None:
        stops = [value] if isinstance(value, str) else value
        if stops is None:
            return None
        if len(stops) > MAX_STOP_SEQUENCES or any(s == "" for s in stops):
            raise ValueError(f"stop takes at most {MAX_STOP_SEQUENCES} non-empty sequences")
        return stops

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        # OpenAI refuses it too: accepted without a stream, include_usage would promise a usage chunk never sent.
        if value is not None and not info.data.get("stream"):
            raise ValueError("is only allowed when stream is true")
        return value

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _neutral(cls, value: float | None) -> float | None:
        if value not in (None, 0):
            raise ValueError("is not supported by tuneforge's inference role: leave it out or send 0")
        return value

    def generation(self, *, max_new_tokens: int) -> dict[str, Any]:
        """The sampling parameters an inference process takes."""
        return {"max_tokens": min(self.max_tokens or max_new_tokens, max_new_tokens), "temperature": self.temperature,
                "top_p": self.top_p, "n": self.n, "stop": self.stop or [], "seed": self.seed}


class ChatCompletionCreate(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1, description="The newer name of max_tokens.")

    @model_validator(mode="after")
    def _one_limit(self) -> ChatCompletionCreate:
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("give max_tokens or max_completion_tokens, not both")
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        if self.messages[-1].role == "assistant":
            raise ValueError("the last message must not be the assistant's: the model answers it")
        return self

    def prompt(self) -> dict[str, Any]:
        return {"messages": [{"role": template_role(m.role), "content": m.text()}
                             for m in self.messages]}


class CompletionCreate(_Sampling):
    prompt: str = Field(description="One prompt (lists of prompts and token arrays are not supported).")
    max_tokens: StrictInt | None = Field(default=16, ge=1, description="16 by default, as OpenAI's.")
    echo: StrictBool = False


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


FinishReason = Literal["stop", "length"]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    """One `data:` line of a streamed chat completion; the stream ends with `data: [DONE]`."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: None = None


class Completion(BaseModel):
    """A completion, and (with stream: true) each `data:` line of a streamed one."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
