"""Validation of uploaded JSONL datasets, one line at a time (memory stays flat).

Error codes are the ones users know from OpenAI's data-preparation checks; every error carries its
1-based line number. Only the first MAX_REPORTED_ERRORS are kept in detail; counts are always total.
Memory is bounded whatever the file: lengths keep exact min/max/mean and a fixed-size reservoir for
percentiles, duplicate detection remembers at most DUPLICATE_TRACKING_LIMIT examples, and a line
longer than MAX_LINE_BYTES is reported and skipped instead of buffered.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

from app.schemas.files import CHAT_ROLES, tools_problem

MAX_REPORTED_ERRORS = 100
# Percentiles come from a uniform sample of this many values: exact below it, within ~1% above.
RESERVOIR_SIZE = 10_000
# One 64-bit fingerprint per example (~70 bytes in a Python set): 500k examples cost ~35 MB.
DUPLICATE_TRACKING_LIMIT = 500_000
# A line is buffered whole before it is parsed; one this long is not a fine-tuning example.
MAX_LINE_BYTES = 32 * 1024 * 1024
MESSAGE_KEYS = frozenset({"role", "content", "name", "weight", "tool_calls", "tool_call_id", "function_call",
                          "refusal"})
CHAT_EXAMPLE_KEYS = frozenset({"messages", "tools", "parallel_tool_calls", "functions"})
# Raised when the validator checks more or counts more: a report of an older one is not reused for the same bytes
# uploaded again (app/services/files.py), which are validated afresh. 2: invalid_tools, examples_without_trained_answer.
VALIDATOR_VERSION = 2
FORMATS = ("chat", "prompt_completion", "text", "preference")
PREFERENCE_OUTPUTS = ("preferred_output", "non_preferred_output")
_decode_json = json.JSONDecoder().decode


class LengthStats:
    """Exact count/min/max/mean of a stream of lengths, percentiles from a bounded reservoir."""

    def __init__(self, *, reservoir_size: int = RESERVOIR_SIZE, seed: int = 0) -> None:
        self.count = 0
        self.total = 0
        self.min = math.inf
        self.max = -math.inf
        self.sample: list[int] = []
        self._size = reservoir_size
        self._rng = random.Random(seed)
        self._next = 1  # the count at which the next value enters the reservoir
        self._w = 1.0

    def add(self, value: int) -> None:
        self.count += 1
        self.total += value
        if value < self.min:
            self.min = value
        if value > self.max:
            self.max = value
        if self.count == self._next:
            self._replace(value)

    def _replace(self, value: int) -> None:
        """Algorithm L: jump straight to the next value that enters the reservoir (cheap per value)."""
        if len(self.sample) < self._size:
            self.sample.append(value)
            if len(self.sample) < self._size:
                self._next += 1
            else:
                self._skip()
            return
        self.sample[self._rng.randrange(self._size)] = value
        self._skip()

    def _skip(self) -> None:
        self._w *= math.exp(math.log(self._rng.random() or 1e-12) / self._size)
        self._next += int(math.log(self._rng.random() or 1e-12) / math.log1p(-self._w)) + 1

    def summary(self) -> dict[str, float] | None:
        if not self.count:
            return None
        ordered = sorted(self.sample)
        n = len(ordered)
        return {"min": int(self.min), "mean": round(self.total / self.count, 2), "p50": ordered[n // 2],
                "p95": ordered[min(n - 1, int(n * 0.95))], "max": int(self.max)}


class DatasetValidator:
    """Feed bytes with `feed` (or lines with `add_line`), call `finish`, then read `report()`."""

    def __init__(self) -> None:
        self.examples = 0
        self.valid_json_objects = 0
        self.error_count = 0
        self.errors_by_code: Counter[str] = Counter()
        self.errors: list[dict[str, Any]] = []
        self.duplicates = 0
        self.empty_assistant_messages = 0
        # Chat examples whose every assistant message has weight 0: without train_on_inputs, nothing in the loss
        # (the trainer drops them), so they do not count toward a job's minimum (jobs.too_few_examples).
        self.examples_without_trained_answer = 0
        self._untrained = False  # the example being checked is one
        self.characters = LengthStats()
        self.bytes_read = 0
        self.lines = 0
        self._seen: set[int] = set()
        self._format: str | None = None
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._skipping_long_line = False

    # -- byte stream -> lines ------------------------------------------------------------------------

    def feed(self, chunk: bytes) -> None:
        """Validate every line that `chunk` completes; keeps at most one partial line."""
        self.bytes_read += len(chunk)
        pieces = chunk.split(b"\n")
        if len(pieces) == 1:
            self._hold(chunk)
            return
        self._hold(pieces[0])
        self._complete_line()
        add_line = self.add_line
        for line in pieces[1:-1]:
            self.lines += 1
            add_line(self.lines, line)
        self._hold(pieces[-1])

    def finish(self) -> None:
        """Validate the last line if the stream did not end with a newline."""
        if self._pending or self._skipping_long_line:
            self._complete_line()

    def _hold(self, piece: bytes) -> None:
        if self._skipping_long_line or not piece:
            return
        self._pending.append(piece)
        self._pending_bytes += len(piece)
        if self._pending_bytes > MAX_LINE_BYTES:
            self._pending, self._pending_bytes, self._skipping_long_line = [], 0, True

    def _complete_line(self) -> None:
        self.lines += 1
        if self._skipping_long_line:
            self._skipping_long_line = False
            self._error(self.lines, "line_too_long",
                        f"line {self.lines} is longer than {MAX_LINE_BYTES} bytes; split it into smaller examples")
            return
        line = b"".join(self._pending)
        self._pending, self._pending_bytes = [], 0
        self.add_line(self.lines, line)

    # -- one line ------------------------------------------------------------------------------------

    def _error(self, line: int, code: str, message: str | Callable[[], str]) -> None:
        """Count an error; keep its details while under the cap (a callable message is built only then)."""
        self.error_count += 1
        self.errors_by_code[code] += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append({"line": line, "code": code, "message": message if isinstance(message, str)
                                else message()})

    def add_line(self, line_number: int, raw: bytes) -> None:
        stripped = raw.strip()
        if not stripped:
            return
        if line_number == 1 and stripped.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark
            stripped = stripped[3:]
        try:
            # Decoding here skips json.loads's per-call encoding sniffing: uploads are UTF-8 (JSONL).
            example = _decode_json(stripped.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            self._error(line_number, "invalid_json", partial("line {} is not valid JSON: {}".format, line_number, exc))
            return
        if type(example) is not dict:
            self._error(line_number, "data_type", f"line {line_number} must be a JSON object")
            return
        self.valid_json_objects += 1
        fmt = "chat" if "messages" in example else detect_format(example)
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
        before = self.error_count
        self._untrained = False
        if fmt == "chat":
            length = self._check_chat(line_number, example)
        elif fmt == "prompt_completion":
            length = self._check_prompt_completion(line_number, example)
        elif fmt == "text":
            length = self._check_text(line_number, example)
        else:
            length = self._check_preference(line_number, example)
        if self.error_count != before:
            return
        self.examples += 1
        self.examples_without_trained_answer += self._untrained
        self.characters.add(length)
        # Python's bytes hash is a keyed 64-bit SipHash: collisions are negligible at these counts and it
        # is several times cheaper than sha256.
        fingerprint = hash(stripped)
        if fingerprint in self._seen:
            self.duplicates += 1
        elif len(self._seen) < DUPLICATE_TRACKING_LIMIT:
            self._seen.add(fingerprint)

    def _check_messages(self, line: int, messages: Any, *, need_assistant: bool, of: str = "") -> int:
        """Checks of a message list; `of` names the list in errors ("'preferred_output' "), chat's needs none."""
        if type(messages) is not list or not messages:
            self._error(line, "missing_messages_list", f"line {line}: 'messages' must be a non-empty list")
            return 0
        length, has_assistant, trained, roles = 0, False, False, CHAT_ROLES
        for index, message in enumerate(messages):
            if type(message) is not dict:
                self._error(line, "data_type", f"line {line}, {of}message {index}: each message must be an object")
                continue
            content = message.get("content")
            # Fast path: a valid {"role", "content"} message needs two lookups and three type tests.
            if len(message) == 2 and type(content) is str and type(role := message.get("role")) is str \
                    and role in roles:
                if role == "assistant":
                    has_assistant = trained = True
                    if not content.strip():
                        self.empty_assistant_messages += 1
                length += len(content)
                continue
            if self._check_message(line, index, message, of=of):
                has_assistant = True
                trained = trained or message.get("weight", 1) != 0
            if type(content) is str:
                length += len(content)
        if need_assistant and not has_assistant:
            self._error(line, "example_missing_assistant_message",
                        f"line {line}: the example has no assistant message to learn from")
        elif need_assistant and not trained:
            self._untrained = True
        return length

    def _check_message(self, line: int, index: int, message: dict[str, Any], *, of: str = "") -> bool:
        """The full checks of one message; True if it is an assistant message."""
        where = f"line {line}, {of}message {index}"
        if "role" not in message:
            self._error(line, "message_missing_key", f"{where}: missing 'role'")
            return False
        unknown = sorted(set(message) - MESSAGE_KEYS)
        if unknown:
            self._error(line, "message_unrecognized_key", f"{where}: unrecognised key(s) {unknown}")
        role = message["role"]
        if type(role) is not str or role not in CHAT_ROLES:
            self._error(line, "unrecognized_role", f"{where}: unrecognised role {role!r}")
        content = message.get("content")
        tool_calls = message.get("tool_calls")
        if tool_calls is not None and (type(tool_calls) is not list or role != "assistant"
                                       or not all(_is_tool_call(c) for c in tool_calls)):
            self._error(line, "invalid_tool_calls", f"{where}: 'tool_calls' must be a list of "
                        "{'id', 'type': 'function', 'function': {'name', 'arguments'}} on an assistant message")
        has_tool_calls = bool(tool_calls or message.get("function_call"))
        if content is None and not has_tool_calls:
            self._error(line, "missing_content", f"{where}: missing 'content'")
        elif content is not None and type(content) is not str:
            self._error(line, "missing_content", f"{where}: 'content' must be a string")
        if "weight" in message and message["weight"] not in (0, 1):
            self._error(line, "invalid_weight", f"{where}: 'weight' must be 0 or 1")
        if role != "assistant":
            return False
        if type(content) is str and not content.strip() and not has_tool_calls:
            self.empty_assistant_messages += 1
        return True

    def _check_tools(self, line: int, tools: Any, where: str) -> None:
        problem = tools_problem(tools)
        if problem:
            self._error(line, "invalid_tools", f"line {line}: '{where}' {problem}")

    def _check_chat(self, line: int, example: dict[str, Any]) -> int:
        if not example.keys() <= CHAT_EXAMPLE_KEYS:
            unknown = sorted(set(example) - CHAT_EXAMPLE_KEYS)
            self._error(line, "data_type", f"line {line}: unrecognised key(s) {unknown}")
        self._check_tools(line, example.get("tools"), "tools")
        return self._check_messages(line, example.get("messages"), need_assistant=True)

    def _check_prompt_completion(self, line: int, example: dict[str, Any]) -> int:
        prompt, completion = example.get("prompt"), example.get("completion")
        if type(prompt) is not str or type(completion) is not str:
            self._error(line, "data_type", f"line {line}: 'prompt' and 'completion' must be strings")
            return 0
        if not completion.strip():
            self._error(line, "missing_content", f"line {line}: 'completion' is empty")
        return len(prompt) + len(completion)

    def _check_text(self, line: int, example: dict[str, Any]) -> int:
        text = example.get("text")
        if type(text) is not str or not text.strip():
            self._error(line, "missing_content", f"line {line}: 'text' must be a non-empty string")
            return 0
        return len(text)

    def _check_preference(self, line: int, example: dict[str, Any]) -> int:
        source = example.get("input")
        if type(source) is not dict:
            self._error(line, "data_type", f"line {line}: 'input' must be an object with 'messages'")
            return 0
        before = self.error_count
        self._check_tools(line, source.get("tools"), "input.tools")
        length = self._check_messages(line, source.get("messages"), need_assistant=False, of="'input' ")
        for key in PREFERENCE_OUTPUTS:
            output = example.get(key)
            if type(output) is not list or not output:
                self._error(line, "missing_output", f"line {line}: '{key}' must be a non-empty list of assistant "
                            "messages (the answer)")
                continue
            for index, message in enumerate(output):
                role = message.get("role") if type(message) is dict else None
                if type(role) is str and role in CHAT_ROLES and role != "assistant":
                    self._error(line, "output_not_assistant", f"line {line}, '{key}' message {index}: role {role!r}; "
                                "an output holds the assistant's answer only (earlier turns belong in 'input')")
            length += self._check_messages(line, output, need_assistant=False, of=f"'{key}' ")
        if self.error_count == before and _answer(example["preferred_output"]) == \
                _answer(example["non_preferred_output"]):
            self._error(line, "identical_outputs", f"line {line}: 'preferred_output' and 'non_preferred_output' are "
                        "the same answer; a pair teaches a preference only when its answers differ")
        return length

    def report(self, *, partial: bool = False) -> dict[str, Any]:
        """The report stored on File.report; `partial` marks a report of the file's first bytes only."""
        return {
            "validator": VALIDATOR_VERSION,
            "format": self._format,
            "examples": self.examples,
            "error_count": self.error_count,
            "errors_by_code": dict(self.errors_by_code),
            "errors": self.errors,
            "errors_truncated": self.error_count > len(self.errors),
            "duplicate_examples": self.duplicates,
            # Beyond the tracking limit, new examples are only compared with the first ones remembered.
            "duplicates_exact": self.examples <= DUPLICATE_TRACKING_LIMIT,
            "duplicate_tracking_limit": DUPLICATE_TRACKING_LIMIT,
            "empty_assistant_messages": self.empty_assistant_messages,
            "examples_without_trained_answer": self.examples_without_trained_answer,
            "characters": self.characters.summary(),
            "partial": partial,
            "validated_bytes": self.bytes_read,
        }


def _is_tool_call(call: Any) -> bool:
    if type(call) is not dict:
        return False
    function = call.get("function")
    return type(function) is dict and type(function.get("name")) is str and "arguments" in function


def _answer(messages: list[dict[str, Any]]) -> list[tuple[Any, Any]]:
    """What a preference output says, to compare the two: each message's content (surrounding whitespace aside, which
    no reader sees) and tool calls."""
    return [(content.strip() if isinstance(content := m.get("content"), str) else content, m.get("tool_calls"))
            for m in messages]


def validate_chunks(chunks: Iterable[bytes]) -> DatasetValidator:
    """Validate a whole byte stream and return the finished validator."""
    validator = DatasetValidator()
    for chunk in chunks:
        validator.feed(chunk)
    validator.finish()
    return validator


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


def status_details(report: dict[str, Any]) -> str | None:
    """A one-paragraph summary for File.status_details; None when the file is fine."""
    if report["error_count"] == 0:
        return None
    first = "; ".join(e["message"] for e in report["errors"][:3])
    return f"{report['error_count']} invalid example(s) ({report['errors_by_code']}). First: {first}"
