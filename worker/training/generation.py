"""Greedy or sampled answers, token by token with a KV cache: what the inference role streams and what a job's
answer report generates (plain Python on a loaded model and tokenizer)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import torch

from app.schemas.inference import GREEDY_TEMPERATURE


def answer_tokens(model: Any, tokenizer: Any, prompt: list[int], *, max_tokens: int, temperature: float, top_p: float,
                  stop: list[str], generator: torch.Generator, ends: set[int],
                  cancelled: threading.Event | None = None) -> Iterator[dict[str, Any]]:
    """One answer, token by token with a KV cache: `delta` lines of new text, then `end` with the finish reason
    ("stop": an end token or a stop sequence; "length": max_tokens) and the tokens generated. Stops quietly when
    `cancelled` is set. Shared by the inference role and the evaluation of a job's answers."""
    device = next(model.parameters()).device
    # Text is held back while it could still be the start of a stop sequence.
    hold = max((len(s) for s in stop), default=1) - 1
    out = model(input_ids=torch.tensor([prompt], device=device), use_cache=True)
    generated: list[int] = []
    sent, reason = 0, "length"
    text = ""
    # Incremental decoding, as vLLM's: a new token's text is the decode of the last few tokens minus the decode of
    # the ones before it (a token decoded alone can lose its leading space), so each step decodes a handful of
    # tokens, not the whole answer.
    prefix_offset = read_offset = 0
    cut_at_stop = False
    while len(generated) < max_tokens:
        if cancelled is not None and cancelled.is_set():
            return
        token = _sample(out.logits[0, -1], temperature=temperature, top_p=top_p, generator=generator)
        generated.append(token)
        if token in ends:
            reason = "stop"
            break
        before = tokenizer.decode(generated[prefix_offset:read_offset], skip_special_tokens=True)
        after = tokenizer.decode(generated[prefix_offset:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):  # whole characters only
            searched_from = max(0, len(text) - hold)
            text += after[len(before):]
            prefix_offset, read_offset = read_offset, len(generated)
            cut = min((p for s in stop if (p := text.find(s, searched_from)) >= 0), default=-1)
            if cut >= 0:
                text, reason, cut_at_stop = text[:cut], "stop", True
                break
        ready = len(text) - hold
        if ready > sent:
            yield {"type": "delta", "text": text[sent:ready]}
            sent = ready
        out = model(input_ids=torch.tensor([[token]], device=device), cache=out.cache, use_cache=True)
    if not cut_at_stop:  # what the last tokens decode to, an unfinished character included
        pending = [t for t in generated[read_offset:] if t not in ends]
        if pending:
            before = tokenizer.decode(generated[prefix_offset:read_offset], skip_special_tokens=True)
            text += tokenizer.decode(generated[prefix_offset:read_offset] + pending,
                                     skip_special_tokens=True)[len(before):]
    if len(text) > sent:
        yield {"type": "delta", "text": text[sent:]}
    yield {"type": "end", "finish_reason": reason, "completion_tokens": len(generated)}


def inference_dtype(device: torch.device) -> torch.dtype:
    """Weights for answering: bf16 on a GPU that has it (half the memory, full speed); fp32 elsewhere (on a CPU,
    one token at a time, bf16 matmuls of these shapes are not faster)."""
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


def end_ids(model: Any, tokenizer: Any) -> set[int]:
    """The tokens that end an answer: the tokenizer's end of text and the model's generation config's."""
    ends = {tokenizer.eos_token_id} - {None}
    config = getattr(model, "generation_config", None)
    extra = getattr(config, "eos_token_id", None)
    ends |= set(extra) if isinstance(extra, list) else ({extra} if extra is not None else set())
    return ends


def _sample(logits: torch.Tensor, *, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """Greedy at temperature 0 (and below GREEDY_TEMPERATURE, which would overflow the logits); otherwise
    temperature, then nucleus (top_p) sampling."""
    if temperature < GREEDY_TEMPERATURE:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs > top_p  # keep the smallest set reaching top_p
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))
