"""Token statistics of a dataset file for a model's tokenizer, kept in the file's report under tokens[model]: at
upload with ?model=, at the creation of a DPO job (its prompt-room rule), in a job's validating_files phase and by
its first attempt (app/services/intake.py reports them).

Token counts use the `tokenizers` library (no torch, so the API can compute them too). Chat examples
are rendered with the model's chat template when it has one and jinja2 is installed (as the trainer
does); otherwise they are an estimate: message contents plus MESSAGE_OVERHEAD_TOKENS per message.
"""

from __future__ import annotations

import json
import random
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

from app.core.config import Settings
from app.core.errors import InvalidRequest
from app.core.storage import Storage
from app.models import File
from app.schemas.files import template_messages
from app.schemas.training import TrainingConfig, pack_rows
from app.services.datasets import LengthStats, detect_format

# What a ChatML-style template adds around each message: turn start, role, newline, turn end, newline.
MESSAGE_OVERHEAD_TOKENS = 5
TOKENIZE_BATCH = 512
DEFAULT_MAX_SEQ_LENGTH: int = TrainingConfig.model_fields["max_seq_length"].default
# Line numbers kept per max_seq_length for the examples over it (the counts are always exact).
MAX_REPORTED_LINES = 20
# Statistics keyed by max_seq_length: one file's report accumulates them for every length a job asked for.
# "packed_rows" is kept for the supervised formats: the rows packing makes of the examples (the estimate's steps);
# "prompt_fills_*" for preference files: pairs whose prompt alone takes max_seq_length tokens.
PACKED_KEYS = ("over_max_seq_length", "over_max_seq_length_lines", "packed_rows")
PREFERENCE_KEYS = ("over_max_seq_length", "over_max_seq_length_lines", "prompt_fills_max_seq_length",
                   "prompt_fills_max_seq_length_lines")
PER_LENGTH_KEYS = tuple(dict.fromkeys((*PACKED_KEYS, *PREFERENCE_KEYS)))
# packed_rows packs the examples in the order a job with the default seed trains its first epoch on
# (worker/training/data.py plan_epoch); other seeds and epochs differ by a few rows.
PACKING_SEED: int = TrainingConfig.model_fields["seed"].default


@dataclass
class TokenCounter:
    """Counts an example's tokens as the trainer will see them (or estimates, see `method`)."""

    tokenizer: Any  # tokenizers.Tokenizer
    template: Any | None  # a jinja2 Template, or None: estimate chat lengths
    bos_token: str
    eos_token: str

    @property
    def method(self) -> str:
        return "chat_template" if self.template is not None else "estimate"

    def _chat(self, messages: list[dict[str, Any]], tools: Any = None, *, generation: bool = False
              ) -> tuple[list[str], int]:
        if self.template is not None:
            return [self.template.render(messages=template_messages(messages), tools=tools or None,
                                         bos_token=self.bos_token,
                                         eos_token=self.eos_token, add_generation_prompt=generation)], 0
        texts = [m["content"] if isinstance(m.get("content"), str) else json.dumps(m.get("tool_calls"))
                 for m in messages]
        return texts, MESSAGE_OVERHEAD_TOKENS * len(messages) + 1

    def pieces(self, example: dict[str, Any]) -> list[tuple[list[str], int]]:
        """The sequences an example trains on, as (texts, extra tokens); its length is the longest."""
        fmt = detect_format(example)
        if fmt == "chat":
            return [self._chat(example["messages"], example.get("tools"))]
        # + BOS and EOS, as the trainer adds them where the tokenizer has them (Qwen2's has no BOS)
        specials = bool(self.bos_token) + bool(self.eos_token)
        if fmt == "prompt_completion":
            return [([example["prompt"], example["completion"]], specials)]
        if fmt == "text":
            return [([example["text"]], specials)]
        source = example["input"]
        return [self._chat(source["messages"] + example[key], source.get("tools"))
                for key in ("preferred_output", "non_preferred_output")]

    def _count(self, shapes: list[list[tuple[list[str], int]]]) -> list[int]:
        texts = [t for shape in shapes for texts, _extra in shape for t in texts]
        counts = iter(len(e.ids) for e in self.tokenizer.encode_batch(texts, add_special_tokens=False))
        return [max(sum(next(counts) for _ in texts) + extra for texts, extra in shape) for shape in shapes]

    def lengths(self, examples: list[dict[str, Any]]) -> list[int]:
        return self._count([self.pieces(e) for e in examples])

    def prompt_lengths(self, pairs: list[dict[str, Any]]) -> list[int]:
        """The tokens of each preference pair's prompt with the generation prompt, where its answers start (as
        the trainer finds an answer's first token)."""
        return self._count([[self._chat(p["input"]["messages"], p["input"].get("tools"), generation=True)]
                            for p in pairs])


def _special(config: dict[str, Any], name: str) -> str:
    value = config.get(name) or ""
    return str(value.get("content", "")) if isinstance(value, dict) else str(value)


def _compile_template(source: str) -> Any | None:
    """The chat template as the trainer renders it (transformers' environment: its tojson, loop controls, the
    {% generation %} tag, raise_exception and strftime_now); None without jinja2 (the API does not need it)."""
    try:
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        return None

    class GenerationTag(jinja2.ext.Extension):
        """{% generation %}...{% endgeneration %}: transformers tracks where the assistant's tokens are; the text is
        the body's."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return str(caller())

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda value, ensure_ascii=False, indent=None, separators=None, sort_keys=False: \
        json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = _raise_exception  # the template refuses a chat
    env.globals["strftime_now"] = lambda format_: datetime.now().strftime(format_)
    return env.from_string(source)


class TemplateRaised(Exception):
    """A chat template's raise_exception: the template refuses the chat (only that is the example's fault; any other
    error of the renderer is not)."""


def _raise_exception(message: str) -> None:
    raise TemplateRaised(message)


class TemplateRefusal(ValueError):
    """The model's chat template refuses an example of the file (its raise_exception: a system message it does not
    take, roles that do not alternate); training would fail on it the same way."""

    def __init__(self, *, file_id: str, line: int, reason: str) -> None:
        super().__init__(f"line {line}: {reason}")
        self.file_id, self.line, self.reason = file_id, line, reason

    def describe(self, *, param: str, model: str) -> str:
        return (f"{param} {self.file_id} line {self.line}: the chat template of {model!r} refuses the example "
                f"({self.reason}); change the example or use another model.")


def load_token_counter(files: dict[str, str]) -> TokenCounter | None:
    """The counter for a model's tokenizer files (name -> text, as the registry keeps them); None when it has no
    tokenizer.json."""
    from tokenizers import Tokenizer

    if "tokenizer.json" not in files:
        return None
    tokenizer = Tokenizer.from_str(files["tokenizer.json"])
    config = json.loads(files.get("tokenizer_config.json") or "{}")
    source = config.get("chat_template")
    if isinstance(source, list):  # named templates: the default one
        source = next((t.get("template") for t in source if t.get("name") == "default"), None)
    if not source and "chat_template.jinja" in files:
        source = files["chat_template.jinja"]
    template = _compile_template(source) if source else None
    return TokenCounter(tokenizer=tokenizer, template=template, bos_token=_special(config, "bos_token"),
                        eos_token=_special(config, "eos_token"))


def iter_numbered_examples(chunks: Iterable[bytes]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based line number, JSON object) of a JSONL byte stream (a validated file: every non-blank line is one)."""
    pending, line = b"", 0
    for chunk in chunks:
        *lines, pending = (pending + chunk).split(b"\n")
        for raw in lines:
            line += 1
            if raw.strip():
                yield line, json.loads(raw)
    if pending.strip():
        yield line + 1, json.loads(pending)


def iter_examples(chunks: Iterable[bytes]) -> Iterator[dict[str, Any]]:
    """The JSON objects of a JSONL byte stream (a validated file: every non-blank line is one)."""
    return (example for _line, example in iter_numbered_examples(chunks))


class _Over:
    """An exact count of the examples over a limit, with the first MAX_REPORTED_LINES line numbers."""

    def __init__(self) -> None:
        self.count = 0
        self.lines: list[int] = []

    def add(self, line: int) -> None:
        self.count += 1
        if len(self.lines) < MAX_REPORTED_LINES:
            self.lines.append(line)


def token_statistics(*, storage: Storage, file: File, counter: TokenCounter, max_seq_length: int
                     ) -> dict[str, Any]:
    """Token counts per example of a stored, validated file, streamed (memory stays flat). A preference pair's
    length is its prompt with the longer answer; its prompt's length is kept too (prompt_tokens)."""
    preference = (file.report or {}).get("format") == "preference"
    stats, prompts, over, no_room = LengthStats(), LengthStats(), _Over(), _Over()
    capped = array("I")  # each example's tokens as the worker keeps them (truncated to max_seq_length), for packing

    def count(batch: list[tuple[int, dict[str, Any]]]) -> None:
        examples = [example for _line, example in batch]
        try:
            prompt_lengths = counter.prompt_lengths(examples) if preference else [0] * len(examples)
            lengths = counter.lengths(examples)
        except TemplateRaised:  # which example: one at a time (a rare path)
            for line, example in batch:
                try:
                    counter.lengths([example])
                    if preference:
                        counter.prompt_lengths([example])
                except TemplateRaised as exc:
                    raise TemplateRefusal(file_id=file.id, line=line, reason=str(exc)) from None
            raise
        for (line, _example), length, prompt in zip(batch, lengths, prompt_lengths, strict=True):
            stats.add(length)
            if length > max_seq_length:
                over.add(line)
            if not preference:
                capped.append(min(length, max_seq_length))
            if preference:
                prompts.add(prompt)
                if prompt >= max_seq_length:
                    no_room.add(line)

    batch: list[tuple[int, dict[str, Any]]] = []
    for numbered in iter_numbered_examples(storage.read(file.blob_key)):
        batch.append(numbered)
        if len(batch) == TOKENIZE_BATCH:
            count(batch)
            batch = []
    count(batch)
    key = str(max_seq_length)
    found: dict[str, Any] = {"method": counter.method, "examples": stats.count, "total_tokens": stats.total,
                             "tokens_per_example": stats.summary(), "over_max_seq_length": {key: over.count},
                             "over_max_seq_length_lines": {key: over.lines}}
    if preference:
        found.update(prompt_tokens=prompts.summary(), prompt_fills_max_seq_length={key: no_room.count},
                     prompt_fills_max_seq_length_lines={key: no_room.lines})
    else:
        order = list(range(len(capped)))
        random.Random(PACKING_SEED).shuffle(order)
        found["packed_rows"] = {key: len(pack_rows(order, capped, max_seq_length))}
    return found


def known_token_stats(file: File, *, model: str, max_seq_length: int) -> dict[str, Any] | None:
    """The statistics of `file` for `model` already in its report, complete for max_seq_length; else None."""
    stats = ((file.report or {}).get("tokens") or {}).get(model)
    if stats is None:
        return None
    wanted = PREFERENCE_KEYS if (file.report or {}).get("format") == "preference" else PACKED_KEYS
    if any(str(max_seq_length) not in (stats.get(name) or {}) for name in wanted):
        return None
    return dict(stats)


def countable_in_request(file: File, settings: Settings) -> bool:
    """Whether a request may tokenise the file itself: a validated file small enough (intake_sync_validation_bytes,
    as at upload); a larger one is counted in a job's validating_files phase (app/services/intake.py)."""
    return file.status == "processed" and file.bytes <= settings.intake_sync_validation_bytes


def file_deleted_meanwhile(file_id: str, *, param: str) -> InvalidRequest:
    """The refusal of a request whose file was deleted by another request while this one used it."""
    return InvalidRequest(f"Invalid file: {file_id} was deleted while this request was handled.", param=param,
                          code="invalid_file")


def record_token_stats(session: Session, *, storage: Storage, file: File, model: str, settings: Settings,
                       max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH, param: str = "file_id") -> dict[str, Any] | None:
    """Token statistics of `file` for `model` (stored in its report under tokens[model]), computed once per
    model and max_seq_length; None when the model has no tokenizer.json. 400 invalid_file naming `param` when the
    file is deleted while it is read."""
    known = known_token_stats(file, model=model, max_seq_length=max_seq_length)
    if known is not None:
        return known
    from app.services import base_models

    counter = load_token_counter(base_models.get(session, settings=settings, name=model).tokenizer)
    if counter is None:
        return None
    try:
        fresh = token_statistics(storage=storage, file=file, counter=counter, max_seq_length=max_seq_length)
    except FileNotFoundError:
        raise file_deleted_meanwhile(file.id, param=param) from None
    report = dict(file.report or {})
    by_model = dict(report.get("tokens") or {})
    earlier = by_model.get(model) or {}
    for name in PER_LENGTH_KEYS:  # same counts, one more max_seq_length
        if name in fresh:
            fresh[name] = {**(earlier.get(name) or {}), **fresh[name]}
    by_model[model] = fresh
    report["tokens"] = by_model
    file.report = report  # a new dict, so the JSON column is saved
    try:
        session.commit()
    except StaleDataError:  # the row went meanwhile
        session.rollback()
        raise file_deleted_meanwhile(file.id, param=param) from None
    return fresh


def _lines(lines: list[int], count: int) -> str:
    shown = ", ".join(str(n) for n in lines)
    return f"line{'s' if count > 1 else ''} {shown}{', ...' if count > len(lines) else ''}"


def prompt_room_problem(stats: dict[str, Any], *, file_id: str, param: str, max_seq_length: int) -> str | None:
    """Why a preference file cannot train at max_seq_length: pairs whose prompt alone takes max_seq_length tokens
    leave no answer token to compare (their loss would be a constant, and SimPO's length normalisation would
    divide by zero); None when every prompt leaves room. Job creation refuses such a job, its validating_files
    phase fails it."""
    key = str(max_seq_length)
    count = (stats.get("prompt_fills_max_seq_length") or {}).get(key, 0)
    if not count:
        return None
    lines = (stats.get("prompt_fills_max_seq_length_lines") or {}).get(key, [])
    longest_prompt = (stats.get("prompt_tokens") or {}).get("max")
    longest_pair = (stats.get("tokens_per_example") or {}).get("max")
    return (f"{count} pair(s) in {param} {file_id} ({_lines(lines, count)}) have a prompt of max_seq_length="
            f"{max_seq_length} tokens or more, which leaves no room for their answers: nothing of them could be "
            f"compared. Raise max_seq_length (the longest prompt is {longest_prompt} tokens, the longest prompt with "
            f"its longer answer {longest_pair}), or shorten or remove those pairs.")


def truncation_warning(stats: dict[str, Any], *, file_id: str, param: str, max_seq_length: int,
                       preference: bool) -> str | None:
    """The warning for examples longer than max_seq_length (cut to it in training), with their first line
    numbers; None when there are none."""
    key = str(max_seq_length)
    count = stats["over_max_seq_length"][key]
    if not count:
        return None
    where = _lines(stats.get("over_max_seq_length_lines", {}).get(key, []), count)
    longest = (stats.get("tokens_per_example") or {}).get("max")
    if preference:
        return (f"{count} pair(s) in {param} {file_id} ({where}) are longer than max_seq_length={max_seq_length} "
                f"tokens, prompt with the longer answer: their answers will be cut at max_seq_length and compared "
                f"on what is left. Raise max_seq_length to {longest} to keep them whole.")
    return (f"{count} example(s) in {param} {file_id} ({where}) are longer than max_seq_length={max_seq_length} "
            "tokens and will be truncated; raise max_seq_length to keep them whole.")
