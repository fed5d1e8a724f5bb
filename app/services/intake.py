"""The validating_files phase of a job, run in a worker before the job is queued: full validation of files
that were too large to validate during upload (a job whose files were validated at upload is queued at once);
and token statistics with the job's tokenizer, which the job's first attempt reports.

Token counts use the `tokenizers` library (no torch, so the API can compute them too). Chat examples
are rendered with the model's chat template when it has one and jinja2 is installed (as the trainer
does); otherwise they are an estimate: message contents plus MESSAGE_OVERHEAD_TOKENS per message.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.storage import Storage, get_storage
from app.models import File, FineTuningJob, JobStatus
from app.models.base import now_seconds
from app.models.registered_model import USABLE_STATUSES
from app.schemas.training import TrainingConfig
from app.services.datasets import LengthStats, detect_format, status_details, validate_chunks
from app.services.jobs import add_event, too_few_examples
from app.services.webhooks import enqueue_job_event

# What a ChatML-style template adds around each message: turn start, role, newline, turn end, newline.
MESSAGE_OVERHEAD_TOKENS = 5
TOKENIZE_BATCH = 512
DEFAULT_MAX_SEQ_LENGTH: int = TrainingConfig.model_fields["max_seq_length"].default


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

    def _chat(self, messages: list[dict[str, Any]], tools: Any = None) -> tuple[list[str], int]:
        if self.template is not None:
            return [self.template.render(messages=messages, tools=tools, bos_token=self.bos_token,
                                         eos_token=self.eos_token, add_generation_prompt=False)], 0
        texts = [m["content"] if isinstance(m.get("content"), str) else json.dumps(m.get("tool_calls"))
                 for m in messages]
        return texts, MESSAGE_OVERHEAD_TOKENS * len(messages) + 1

    def pieces(self, example: dict[str, Any]) -> list[tuple[list[str], int]]:
        """The sequences an example trains on, as (texts, extra tokens); its length is the longest."""
        fmt = detect_format(example)
        if fmt == "chat":
            return [self._chat(example["messages"], example.get("tools"))]
        if fmt == "prompt_completion":
            return [([example["prompt"], example["completion"]], 2)]  # + BOS and EOS, as the trainer adds
        if fmt == "text":
            return [([example["text"]], 2)]
        prompt = example["input"]["messages"]
        return [self._chat(prompt + example[key]) for key in ("preferred_output", "non_preferred_output")]

    def lengths(self, examples: list[dict[str, Any]]) -> list[int]:
        shapes = [self.pieces(e) for e in examples]
        texts = [t for shape in shapes for texts, _extra in shape for t in texts]
        counts = iter(len(e.ids) for e in self.tokenizer.encode_batch(texts, add_special_tokens=False))
        return [max(sum(next(counts) for _ in texts) + extra for texts, extra in shape) for shape in shapes]


def _special(config: dict[str, Any], name: str) -> str:
    value = config.get(name) or ""
    return str(value.get("content", "")) if isinstance(value, dict) else str(value)


def _compile_template(source: str) -> Any | None:
    """The chat template as the trainer renders it; None without jinja2 (the API does not need it)."""
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        return None
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent, ensure_ascii=False)
    return env.from_string(source)


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


def iter_examples(chunks: Iterable[bytes]) -> Iterator[dict[str, Any]]:
    """The JSON objects of a JSONL byte stream (a validated file: every non-blank line is one)."""
    pending = b""
    for chunk in chunks:
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            if line.strip():
                yield json.loads(line)
    if pending.strip():
        yield json.loads(pending)


def token_statistics(*, storage: Storage, file: File, counter: TokenCounter, max_seq_length: int
                     ) -> dict[str, Any]:
    """Token counts per example of a stored, validated file, streamed (memory stays flat)."""
    stats, over, batch = LengthStats(), 0, []
    for example in iter_examples(storage.read(file.blob_key)):
        batch.append(example)
        if len(batch) < TOKENIZE_BATCH:
            continue
        for length in counter.lengths(batch):
            stats.add(length)
            over += length > max_seq_length
        batch = []
    for length in counter.lengths(batch):
        stats.add(length)
        over += length > max_seq_length
    return {"method": counter.method, "examples": stats.count, "total_tokens": stats.total,
            "tokens_per_example": stats.summary(), "over_max_seq_length": {str(max_seq_length): over}}


def record_token_stats(session: Session, *, storage: Storage, file: File, model: str, settings: Settings,
                       max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH) -> dict[str, Any] | None:
    """Token statistics of `file` for `model` (stored in its report under tokens[model]), computed once per
    model and max_seq_length; None when the model has no tokenizer.json."""
    report = dict(file.report or {})
    known = dict(report.get("tokens") or {})
    stats = known.get(model)
    if stats is not None and str(max_seq_length) in stats["over_max_seq_length"]:
        return dict(stats)
    from app.services import base_models

    counter = load_token_counter(base_models.get(session, settings=settings, name=model).tokenizer)
    if counter is None:
        return None
    fresh = token_statistics(storage=storage, file=file, counter=counter, max_seq_length=max_seq_length)
    if stats is not None:  # same counts, one more max_seq_length
        fresh["over_max_seq_length"] = {**stats["over_max_seq_length"], **fresh["over_max_seq_length"]}
    known[model] = fresh
    report["tokens"] = known
    file.report = report  # a new dict, so the JSON column is saved
    session.commit()
    return fresh


def validate_stored_file(session: Session, *, storage: Storage, file: File) -> None:
    """Validate a whole stored file (one too large to validate during upload) and record the verdict on every
    file sharing its bytes."""
    validator = validate_chunks(storage.read(file.blob_key))
    report = validator.report()
    status = "error" if report["error_count"] else "processed"
    twins = session.scalars(select(File).where(File.project_pk == file.project_pk, File.blob_key == file.blob_key,
                                               File.status == "uploaded"))
    for row in {file, *twins}:
        row.status, row.report, row.status_details = status, report, status_details(report)
    session.commit()


def _fail(session: Session, job: FineTuningJob, *, param: str, code: str, message: str) -> bool:
    job = session.scalar(select(FineTuningJob).where(FineTuningJob.pk == job.pk).with_for_update()
                         .execution_options(populate_existing=True)) or job
    if job.status != JobStatus.VALIDATING_FILES:
        return False
    job.status = JobStatus.FAILED
    job.finished_at = now_seconds()
    job.error = {"code": code, "param": param, "message": message}
    add_event(session, job=job, level="error", message=message)
    enqueue_job_event(session, job=job)
    session.commit()
    return False


# (level, message, data) of one event to record.
TokenEvent = tuple[Literal["info", "warn"], str, dict[str, Any]]


def token_report(session: Session, job: FineTuningJob, *, settings: Settings) -> list[TokenEvent]:
    """Token statistics of the job's files for its model, as (level, message, data) events to record: one line per
    file, and a warning for examples that max_seq_length will truncate. Needs the model's tokenizer files."""
    from app.services import base_models

    model = base_models.find(session, settings=settings, name=job.base_model)
    if model is None or model.status not in USABLE_STATUSES:
        return []
    max_seq_length = int(job.config.get("max_seq_length", DEFAULT_MAX_SEQ_LENGTH))
    events: list[TokenEvent] = []
    for param, file_id in (("training_file", job.training_file), ("validation_file", job.validation_file)):
        file = session.scalar(select(File).where(File.id == file_id, File.project_pk == job.project_pk)) \
            if file_id else None
        if file is None:
            continue
        stats = record_token_stats(session, storage=get_storage(), file=file, model=job.base_model,
                                   settings=settings, max_seq_length=max_seq_length)
        if stats is None:
            events.append(("info", f"No token statistics for {file.id}: model {job.base_model!r} has no "
                                   "tokenizer.json.", {"file": file.id}))
            continue
        summary = stats["tokens_per_example"] or {}
        events.append(("info", f"{param} {file.id}: {stats['examples']} examples, {stats['total_tokens']} tokens; "
                               f"tokens per example min {summary.get('min')}, mean {summary.get('mean')}, p50 "
                               f"{summary.get('p50')}, p95 {summary.get('p95')}, max {summary.get('max')} "
                               f"({stats['method']}).", {"file": file.id, "param": param, "model": job.base_model,
                                                         **stats}))
        over = stats["over_max_seq_length"][str(max_seq_length)]
        if over:
            events.append(("warn", f"{over} example(s) in {param} {file.id} are longer than max_seq_length="
                                   f"{max_seq_length} tokens and will be truncated; raise max_seq_length to keep "
                                   "them whole.", {"file": file.id, "param": param, "over_max_seq_length": over,
                                                   "max_seq_length": max_seq_length}))
    return events


def validate_job_files(session: Session, *, job_id: str, settings: Settings) -> bool:
    """validating_files -> queued once the job's files are usable; False if the job failed or is elsewhere.

    No lock is held while files are read (a large file takes a while): the job is locked only to change state.
    """
    job = session.scalar(select(FineTuningJob).where(FineTuningJob.id == job_id))
    if job is None or job.status != JobStatus.VALIDATING_FILES:
        return False
    for param, file_id in (("training_file", job.training_file), ("validation_file", job.validation_file)):
        if file_id is None:
            continue
        row = session.scalar(select(File).where(File.id == file_id, File.project_pk == job.project_pk))
        if row is None:
            return _fail(session, job, param=param, code="invalid_file", message=f"{param} {file_id} no longer exists.")
        if row.status == "uploaded":
            add_event(session, job=job, message=f"Validating {param} {file_id} ({row.bytes} bytes).")
            session.commit()
            validate_stored_file(session, storage=get_storage(), file=row)
        if row.status != "processed":
            return _fail(session, job, param=param, code="invalid_file",
                         message=f"{param} {file_id} failed validation: {row.status_details}")
        shortfall = too_few_examples(row, settings=settings) if param == "training_file" else None
        if shortfall:
            return _fail(session, job, param=param, code="too_few_examples", message=shortfall)
    job = session.scalar(select(FineTuningJob).where(FineTuningJob.pk == job.pk).with_for_update()
                         .execution_options(populate_existing=True))
    if job is None or job.status != JobStatus.VALIDATING_FILES:
        session.commit()
        return False
    job.status = JobStatus.QUEUED
    add_event(session, job=job, message="Files validated; job queued.")
    session.commit()
    return True
