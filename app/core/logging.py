"""Redaction of secrets (API keys, webhook secrets, URL passwords, environment tokens) from every log record.

Also: JSON log lines (TUNEFORGE_LOG_FORMAT=json) tagged with the job and attempt they belong to.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import re
from datetime import UTC, datetime
from typing import Any

REDACTED = "***"
_API_KEY = re.compile(r"\btf-[A-Za-z0-9_-]{20,}")
_WEBHOOK_SECRET = re.compile(r"\bwhsec_[A-Za-z0-9+/=]{20,}")
# scheme://user:password@host (database and broker URLs); the user name stays readable.
_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:)[^@\s]+@")
_SECRET_ENV = re.compile(r"(API_KEY|TOKEN|SECRET|PASSWORD)", re.IGNORECASE)
# Shorter values are too likely to match ordinary words in log lines.
_MIN_SECRET_LENGTH = 8


def _environment_secrets() -> list[str]:
    return [value for name, value in os.environ.items()
            if _SECRET_ENV.search(name) and len(value) >= _MIN_SECRET_LENGTH]


def redact(text: str, *, secrets: list[str] | None = None) -> str:
    """text with API keys, URL passwords and secret environment values (WANDB_API_KEY, ...) masked;
    secrets: those values, when the caller has read them already (one scan of the environment per record)."""
    text = _API_KEY.sub(f"tf-{REDACTED}", text)
    text = _WEBHOOK_SECRET.sub(f"whsec_{REDACTED}", text)
    text = _URL_PASSWORD.sub(rf"\g<1>{REDACTED}@", text)
    for secret in _environment_secrets() if secrets is None else secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


_formatter = logging.Formatter()


def _redacted_record_factory(factory: Any) -> Any:
    def make_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record: logging.LogRecord = factory(*args, **kwargs)
        secrets = _environment_secrets()  # read per record, not per string: the environment may change
        # Redact the template and each argument in place: formatters such as uvicorn's access log read
        # record.args by position, so the structure must survive.
        if isinstance(record.msg, str):
            record.msg = redact(record.msg, secrets=secrets)
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a, secrets=secrets) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: redact(v, secrets=secrets) if isinstance(v, str) else v
                           for k, v in record.args.items()}
        try:
            message = record.getMessage()
        except Exception:  # a broken format string is logged as it is, like logging itself does
            return record
        masked = redact(message, secrets=secrets)
        if masked != message:  # a secret inside a non-string argument: flatten the message
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(_formatter.formatException(record.exc_info), secrets=secrets)
        return record

    make_record.tuneforge_redacting = True  # type: ignore[attr-defined]
    return make_record


def install_log_redaction() -> None:
    """Redact every log record this process creates, whatever handler later writes it (idempotent)."""
    factory = logging.getLogRecordFactory()
    if not getattr(factory, "tuneforge_redacting", False):
        logging.setLogRecordFactory(_redacted_record_factory(factory))


# --- Structured logs (TUNEFORGE_LOG_FORMAT=json) and the job context every worker line carries ---

_job_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("tuneforge_job_id", default=None)
_attempt: contextvars.ContextVar[int | None] = contextvars.ContextVar("tuneforge_attempt", default=None)
# Uvicorn's loggers do not propagate to the root logger: their handlers are switched too.
_OWN_HANDLER_LOGGERS = ("uvicorn", "uvicorn.access")


def set_job_context(job_id: str | None, attempt: int | None) -> None:
    """Tag this thread's (or task's) later log lines with the job and attempt they belong to."""
    _job_id.set(job_id)
    _attempt.set(attempt)


class JobContextFilter(logging.Filter):
    """Adds job_id and attempt (None outside a job) to every record, for any formatter to use."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "job_id", None) is None:
            record.job_id = _job_id.get()
        if getattr(record, "attempt", None) is None:
            record.attempt = _attempt.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, job_id/attempt when set, exc."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "message": record.getMessage(),
            "process": record.process,
        }
        job_id = getattr(record, "job_id", None) or _job_id.get()
        attempt = getattr(record, "attempt", None) or _attempt.get()
        if job_id is not None:
            line["job_id"] = job_id
        if attempt is not None:
            line["attempt"] = attempt
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exc"] = record.exc_text
        return json.dumps(line, default=str)


def configure_logging(log_format: str, *, level: int = logging.INFO) -> None:
    """Switch this process's handlers to JSON lines when log_format is "json" (idempotent).

    Runs after the host (uvicorn, Celery, basicConfig) set its handlers up, and reformats them, so
    their destinations and levels stay as the host chose."""
    install_log_redaction()  # workers call this too: their records are redacted like the API's
    root = logging.getLogger()
    if log_format == "json" and not root.handlers:
        root.addHandler(logging.StreamHandler())
        root.setLevel(level)
    handlers = [*root.handlers, *(h for name in _OWN_HANDLER_LOGGERS for h in logging.getLogger(name).handlers)]
    for handler in handlers:
        if not any(isinstance(f, JobContextFilter) for f in handler.filters):
            handler.addFilter(JobContextFilter())
        if log_format == "json":
            handler.setFormatter(JsonFormatter())
