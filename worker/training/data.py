"""Training data: JSONL records -> token ids with loss masks -> batches.

Three record shapes: chat `{"messages": [...]}`, `{"prompt", "completion"}` and `{"text"}`. Everything
is tokenised once up front; an epoch is then a list of batches of example indices, which is also what
a checkpoint stores so that a resumed run continues with exactly the next batch.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from app.schemas.files import CHAT_ROLES, JSONL_ENCODING, template_messages, tools_problem
from app.schemas.training import pack_rows

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from worker.training.reporting import Reporter

IGNORE_INDEX = -100  # label value that cross-entropy, and our metrics, skip
# Length grouping sorts within mega-batches of this many batches: big enough to cut padding, small
# enough that batch order stays random.
MEGA_BATCH_FACTOR = 50

# An epoch plan: batches -> rows -> example indices. Without packing every row holds one example.
EpochPlan = list[list[list[int]]]


@dataclass
class Example:
    """One tokenised example; labels are IGNORE_INDEX where the token is not in the loss."""

    input_ids: list[int]
    labels: list[int]


def open_jsonl(path: Path) -> TextIO:
    """A stored JSONL file, read line by line as the upload's validator split it: at "\n" only (a lone "\r" is
    whitespace inside a JSON line there, where Python's universal newlines would cut the line)."""
    return open(path, encoding=JSONL_ENCODING, newline="\n")


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _bos(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The beginning-of-text token before a text or a prompt, where the tokenizer has one (Qwen2's has none)."""
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def _eos(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The end-of-text token after a text or a completion, where the tokenizer has one."""
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], generation: bool,
                tools: list[Any] | None = None) -> list[int]:
    """A conversation through the model's chat template, with the example's tool definitions where it has some (the
    template puts them in the prompt, as the API's token statistics count them)."""
    from jinja2.exceptions import TemplateError

    try:
        text = tokenizer.apply_chat_template(template_messages(messages), tools=tools or None, tokenize=False,
                                             add_generation_prompt=generation)
    except TemplateError as exc:  # the template's raise_exception: a role it does not take, turns out of order
        raise ValueError(f"the model's chat template refuses this conversation: {exc}") from exc
    assert isinstance(text, str)
    return _encode(tokenizer, text)


def check_tools(tools: Any, where: str) -> list[Any] | None:
    """An example's tool definitions (app/schemas/files.py tools_problem); ValueError naming `where` otherwise."""
    problem = tools_problem(tools)
    if problem:
        raise ValueError(f'"{where}" {problem}')
    return tools


def tokenize_chat(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], *, train_on_inputs: bool,
    tools: list[Any] | None = None,
) -> Example:
    """Render a conversation (and its tools); the loss covers assistant turns (weight != 0), or all with
    train_on_inputs."""
    input_ids = render_chat(tokenizer, messages, generation=False, tools=tools)
    in_loss = [train_on_inputs] * len(input_ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        # The answer's tokens are the difference between the conversation up to and including it and
        # the conversation up to it with a generation prompt: works for any prefix-stable template.
        start = len(render_chat(tokenizer, messages[:i], generation=True, tools=tools))
        through = render_chat(tokenizer, messages[: i + 1], generation=False, tools=tools)
        if through != input_ids[: len(through)] or start > len(through):
            raise ValueError("the chat template is not prefix-stable; cannot find the assistant's tokens")
        weight = message.get("weight", 1)
        for j in range(start, len(through)):
            in_loss[j] = weight != 0
    labels = [tok if keep else IGNORE_INDEX for tok, keep in zip(input_ids, in_loss, strict=True)]
    return Example(input_ids, labels)


def tokenize_prompt_completion(
    tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str, *, train_on_inputs: bool
) -> Example:
    """Tokenise prompt and completion separately so the boundary is exact; loss on the completion."""
    prompt_ids = [*_bos(tokenizer), *_encode(tokenizer, prompt)]
    completion_ids = [*_encode(tokenizer, completion), *_eos(tokenizer)]
    prompt_labels = list(prompt_ids) if train_on_inputs else [IGNORE_INDEX] * len(prompt_ids)
    return Example(prompt_ids + completion_ids, prompt_labels + completion_ids)


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: dict[str, Any]) -> list[int]:
    """What a model continues, rendered as in training: {"messages": [...], "tools"?: [...]} with the generation
    prompt the chat template adds, or {"text": "..."} after the beginning-of-text token (as prompt-completion
    examples)."""
    if "messages" in prompt:
        if not tokenizer.chat_template:
            raise ValueError("this model has no chat template: use /v1/completions with a text prompt")
        return render_chat(tokenizer, prompt["messages"], generation=True, tools=prompt.get("tools"))
    return [*_bos(tokenizer), *_encode(tokenizer, prompt["text"])]


def tokenize_text(tokenizer: PreTrainedTokenizerBase, text: str) -> Example:
    """Plain text: every token is in the loss."""
    ids = [*_bos(tokenizer), *_encode(tokenizer, text), *_eos(tokenizer)]
    return Example(ids, list(ids))


def tokenize_record(record: Any, tokenizer: PreTrainedTokenizerBase, *, train_on_inputs: bool) -> Example:
    """Tokenise one parsed JSONL record of any of the three shapes; ValueError if it is none of them."""
    if not isinstance(record, dict):
        raise ValueError("expected a JSON object")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError('"messages" must be a non-empty list')
        for message in messages:
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise ValueError('every message needs a string "role"')
            if message["role"] not in CHAT_ROLES:
                raise ValueError(f"unknown role {message['role']!r}")
            if message.get("weight", 1) not in (0, 1):
                raise ValueError('"weight" must be 0 or 1')
        example = tokenize_chat(tokenizer, messages, train_on_inputs=train_on_inputs,
                                tools=check_tools(record.get("tools"), "tools"))
    elif "prompt" in record and "completion" in record:
        if not isinstance(record["prompt"], str) or not isinstance(record["completion"], str):
            raise ValueError('"prompt" and "completion" must be strings')
        example = tokenize_prompt_completion(
            tokenizer, record["prompt"], record["completion"], train_on_inputs=train_on_inputs
        )
    elif "text" in record:
        if not isinstance(record["text"], str):
            raise ValueError('"text" must be a string')
        example = tokenize_text(tokenizer, record["text"])
    else:
        raise ValueError('expected "messages", "prompt" and "completion", or "text"')
    # The first token has nothing before it to predict it from. Masking it also keeps the last
    # token of one example from being trained to predict the next example in a packed row.
    example.labels[0] = IGNORE_INDEX
    return example


def load_examples(
    path: Path,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_seq_length: int,
    train_on_inputs: bool,
    reporter: Reporter,
) -> list[Example]:
    """Read and tokenise a JSONL file, truncating to max_seq_length; reports truncated and dropped examples."""
    examples: list[Example] = []
    n_truncated = n_dropped = 0
    with open_jsonl(path) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                example = tokenize_record(json.loads(line), tokenizer, train_on_inputs=train_on_inputs)
            except (json.JSONDecodeError, ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path.name} line {line_no}: {exc}") from exc
            if len(example.input_ids) > max_seq_length:
                n_truncated += 1
                example = Example(example.input_ids[:max_seq_length], example.labels[:max_seq_length])
            if all(label == IGNORE_INDEX for label in example.labels):
                n_dropped += 1
                continue
            examples.append(example)
    if n_truncated:
        reporter.event(
            f"{n_truncated} example(s) in {path.name} were longer than max_seq_length={max_seq_length} "
            "tokens and were truncated; raise max_seq_length to keep them whole",
            level="warn",
            data={"file": path.name, "truncated": n_truncated, "max_seq_length": max_seq_length},
        )
    if n_dropped:
        reporter.event(
            f"{n_dropped} example(s) in {path.name} had no tokens left in the loss (after truncation or "
            "weight 0) and were dropped",
            level="warn",
            data={"file": path.name, "dropped": n_dropped},
        )
    if not examples:
        raise ValueError(f"{path.name} has no trainable examples")
    return examples


def plan_epoch(lengths: list[int], *, batch_size: int, max_seq_length: int, packing: bool, seed: int) -> EpochPlan:
    """Shuffle with `seed` and group examples into batches: length-grouped rows, or packed rows."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if packing:
        rows = pack_rows(order, lengths, max_seq_length)
        return [rows[k : k + batch_size] for k in range(0, len(rows), batch_size)]
    # Sort by length within mega-batches so a batch pads to similar lengths, then shuffle the batches
    # so the long ones are not all first.
    mega = batch_size * MEGA_BATCH_FACTOR
    batches: list[list[list[int]]] = []
    for k in range(0, len(order), mega):
        chunk = sorted(order[k : k + mega], key=lambda i: -lengths[i])
        batches += [[[i] for i in chunk[j : j + batch_size]] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def split_by_tokens(batch: list[list[int]], lengths: list[int], *, max_tokens: int) -> list[list[list[int]]]:
    """Split a batch's rows, in order, into parts whose padded size (rows x longest row) fits max_tokens.

    A row longer than max_tokens gets a part of its own. Rows of a length-grouped batch are sorted by
    length, so neighbouring rows pad little.
    """
    parts: list[list[list[int]]] = []
    part: list[list[int]] = []
    widest = 0
    for row in batch:
        width = sum(lengths[i] for i in row)
        if part and (len(part) + 1) * max(widest, width) > max_tokens:
            parts.append(part)
            part, widest = [], 0
        part.append(row)
        widest = max(widest, width)
    if part:
        parts.append(part)
    return parts


def collate(batch: list[list[int]], examples: list[Example], *, pad_id: int, packing: bool) -> dict[str, Any]:
    """Build padded tensors for one batch; padding is never in the loss."""
    import torch

    rows_ids: list[list[int]] = []
    rows_labels: list[list[int]] = []
    rows_pos: list[list[int]] = []
    for row in batch:
        ids = [t for i in row for t in examples[i].input_ids]
        rows_ids.append(ids)
        rows_labels.append([t for i in row for t in examples[i].labels])
        rows_pos.append([p for i in row for p in range(len(examples[i].input_ids))])
    width = max(len(ids) for ids in rows_ids)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    position_ids = torch.zeros((len(batch), width), dtype=torch.long)
    for r, (ids, labs, pos) in enumerate(zip(rows_ids, rows_labels, rows_pos, strict=True)):
        n = len(ids)
        input_ids[r, :n] = torch.tensor(ids)
        labels[r, :n] = torch.tensor(labs)
        attention_mask[r, :n] = 1
        # Padding gets positions restarting at 0: in a packed row it is its own "sequence".
        position_ids[r, :n] = torch.tensor(pos)
        position_ids[r, n:] = torch.arange(width - n)
    out: dict[str, Any] = {"input_ids": input_ids, "labels": labels, "n_tokens": int(attention_mask.sum())}
    if packing:
        # No 2D mask: transformers then derives a block-diagonal causal mask from position_ids
        # restarting at 0 (masking_utils.find_packed_sequence_indices), so examples never attend
        # to each other.
        out["position_ids"] = position_ids
        out["attention_mask"] = None
    else:
        out["attention_mask"] = attention_mask
    return out


def batch_to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move the tensors of a collated batch to `device`."""
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
