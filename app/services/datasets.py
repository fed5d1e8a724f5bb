"""Validation of uploaded JSONL datasets, one line at a time (memory stays flat).

Error codes are the ones users know from OpenAI's data-preparation checks; every error carries its
1-based line number. Only the first MAX_REPORTED_ERRORS are kept in detail; counts are always total.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import Any

MAX_REPORTED_ERRORS = 100
CHAT_ROLES = {"system", "user", "assistant", "tool", "developer"}
MESSAGE_KEYS = {"role", "content", "name", "weight", "tool_calls", "tool_call_id", "function_call", "refusal"}
FORMATS = ("chat", "prompt_completion", "text", "preference")


class DatasetValidator:
    """Feed lines with `add_line`, then read `report()`."""

    def __init__(self) -> None:
        self.examples = 0
        self.valid_json_objects = 0
        self.formats: Counter[str] = Counter()
        self.errors_by_code: Counter[str] = Counter()
        self.errors: list[dict[str, Any]] = []
        self.duplicates = 0
        self.empty_assistant_messages = 0
        self._seen: set[bytes] = set()
        self._format: str | None = None
        self.char_lengths: list[int] = []

    def _error(self, line: int, code: str, message: str) -> None:
        self.errors_by_code[code] += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append({"line": line, "code": code, "message": message})

    def add_line(self, line_number: int, raw: bytes) -> None:
        stripped = raw.strip()
        if not stripped:
            return
        try:
            example = json.loads(stripped)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            self._error(line_number, "invalid_json", f"line {line_number} is not valid JSON: {exc}")
            return
        if not isinstance(example, dict):
            self._error(line_number, "data_type", f"line {line_number} must be a JSON object")
            return
        self.valid_json_objects += 1
        fmt = detect_format(example)
        if fmt is None:
            self._error(
                line_number,
                "data_type",
                f"line {line_number}: unrecognised example; expected a 'messages' list, 'prompt' and "
                "'completion', 'text', or 'input' with 'preferred_output' and 'non_preferred_output'",
            )
            return
        if self._format is None:
            self._format = fmt
        elif fmt != self._format:
            self._error(line_number, "mixed_formats",
                        f"line {line_number} is a {fmt} example but the file started with {self._format} examples")
            return
        before = sum(self.errors_by_code.values())
        check = {"chat": self._check_chat, "prompt_completion": self._check_prompt_completion,
                 "text": self._check_text, "preference": self._check_preference}[fmt]
        length = check(line_number, example)
        if sum(self.errors_by_code.values()) != before:
            return
        self.examples += 1
        self.formats[fmt] += 1
        self.char_lengths.append(length)
        fingerprint = hashlib.sha256(stripped).digest()[:16]
        if fingerprint in self._seen:
            self.duplicates += 1
        else:
            self._seen.add(fingerprint)

    def _check_messages(self, line: int, messages: Any, *, need_assistant: bool) -> int:
        if not isinstance(messages, list) or not messages:
            self._error(line, "missing_messages_list", f"line {line}: 'messages' must be a non-empty list")
            return 0
        length, has_assistant = 0, False
        for index, message in enumerate(messages):
            where = f"line {line}, message {index}"
            if not isinstance(message, dict):
                self._error(line, "data_type", f"{where}: each message must be an object")
                continue
            if "role" not in message:
                self._error(line, "message_missing_key", f"{where}: missing 'role'")
                continue
            unknown = sorted(set(message) - MESSAGE_KEYS)
            if unknown:
                self._error(line, "message_unrecognized_key", f"{where}: unrecognised key(s) {unknown}")
            role = message["role"]
            if role not in CHAT_ROLES:
                self._error(line, "unrecognized_role", f"{where}: unrecognised role {role!r}")
            content = message.get("content")
            has_tool_calls = bool(message.get("tool_calls") or message.get("function_call"))
            if content is None and not has_tool_calls:
                self._error(line, "missing_content", f"{where}: missing 'content'")
            elif content is not None and not isinstance(content, str):
                self._error(line, "missing_content", f"{where}: 'content' must be a string")
            if "weight" in message and message["weight"] not in (0, 1):
                self._error(line, "invalid_weight", f"{where}: 'weight' must be 0 or 1")
            if role == "assistant":
                has_assistant = True
                if isinstance(content, str) and not content.strip() and not has_tool_calls:
                    self.empty_assistant_messages += 1
            if isinstance(content, str):
                length += len(content)
        if need_assistant and not has_assistant:
            self._error(line, "example_missing_assistant_message",
                        f"line {line}: the example has no assistant message to learn from")
        return length

    def _check_chat(self, line: int, example: dict[str, Any]) -> int:
        unknown = sorted(set(example) - {"messages", "tools", "parallel_tool_calls", "functions"})
        if unknown:
            self._error(line, "data_type", f"line {line}: unrecognised key(s) {unknown}")
        return self._check_messages(line, example.get("messages"), need_assistant=True)

    def _check_prompt_completion(self, line: int, example: dict[str, Any]) -> int:
        prompt, completion = example.get("prompt"), example.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            self._error(line, "data_type", f"line {line}: 'prompt' and 'completion' must be strings")
            return 0
        if not completion.strip():
            self._error(line, "missing_content", f"line {line}: 'completion' is empty")
        return len(prompt) + len(completion)

    def _check_text(self, line: int, example: dict[str, Any]) -> int:
        text = example.get("text")
        if not isinstance(text, str) or not text.strip():
            self._error(line, "missing_content", f"line {line}: 'text' must be a non-empty string")
            return 0
        return len(text)

    def _check_preference(self, line: int, example: dict[str, Any]) -> int:
        source = example.get("input")
        if not isinstance(source, dict):
            self._error(line, "data_type", f"line {line}: 'input' must be an object with 'messages'")
            return 0
        length = self._check_messages(line, source.get("messages"), need_assistant=False)
        for key in ("preferred_output", "non_preferred_output"):
            length += self._check_messages(line, example.get(key), need_assistant=True)
        return length

    def report(self) -> dict[str, Any]:
        lengths = sorted(self.char_lengths)
        return {
            "format": self._format,
            "examples": self.examples,
            "error_count": sum(self.errors_by_code.values()),
            "errors_by_code": dict(self.errors_by_code),
            "errors": self.errors,
            "errors_truncated": sum(self.errors_by_code.values()) > len(self.errors),
            "duplicate_examples": self.duplicates,
            "empty_assistant_messages": self.empty_assistant_messages,
            "characters": _summary(lengths),
        }


def detect_format(example: dict[str, Any]) -> str | None:
    if "messages" in example:
        return "chat"
    if "prompt" in example or "completion" in example:
        return "prompt_completion"
    if "preferred_output" in example or "non_preferred_output" in example:
        return "preference"
    if "text" in example:
        return "text"
    return None


def _summary(sorted_values: list[int]) -> dict[str, float] | None:
    if not sorted_values:
        return None
    n = len(sorted_values)
    return {
        "min": sorted_values[0],
        "mean": round(sum(sorted_values) / n, 2),
        "p50": sorted_values[n // 2],
        "p95": sorted_values[min(n - 1, int(n * 0.95))],
        "max": sorted_values[-1],
    }


def status_details(report: dict[str, Any]) -> str | None:
    """A one-paragraph summary for File.status_details; None when the file is fine."""
    if report["error_count"] == 0:
        return None
    first = "; ".join(e["message"] for e in report["errors"][:3])
    return f"{report['error_count']} invalid example(s) ({report['errors_by_code']}). First: {first}"
