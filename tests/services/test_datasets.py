"""DatasetValidator: formats, OpenAI's error codes, and memory that stays bounded on huge files."""

from __future__ import annotations

import json
from typing import Any

from app.services import datasets
from app.services.datasets import DatasetValidator, LengthStats, validate_chunks


def validate(rows: list[Any], *, chunk: int = 7) -> dict[str, Any]:
    """Validate rows (dicts, or raw strings for broken lines), fed in small chunks to cross line boundaries."""
    data = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()
    return validate_chunks(data[i : i + chunk] for i in range(0, len(data), chunk)).report()


def chat(*messages: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"messages": list(messages), **extra}


USER = {"role": "user", "content": "What is the weather in Paris?"}
ASSISTANT = {"role": "assistant", "content": "Sunny."}


def test_chat_with_roles_and_weights_is_valid() -> None:
    report = validate([chat({"role": "system", "content": "Be brief."}, USER, {**ASSISTANT, "weight": 0},
                            {"role": "user", "content": "And tomorrow?"}, {**ASSISTANT, "weight": 1})])
    assert report["format"] == "chat" and report["examples"] == 1 and report["error_count"] == 0


def test_chat_with_tool_calls_and_tool_messages_is_valid() -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    report = validate([chat(USER, {"role": "assistant", "tool_calls": [call]},
                            {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "clear"}'}, ASSISTANT,
                            tools=tools, parallel_tool_calls=False)])
    assert report["error_count"] == 0 and report["examples"] == 1
    assert report["empty_assistant_messages"] == 0


def test_bad_tool_calls_and_weights_are_reported() -> None:
    report = validate([chat(USER, {"role": "assistant", "tool_calls": "get_weather"}),
                       chat(USER, {"role": "user", "tool_calls": [], "content": "x"}, ASSISTANT),
                       chat(USER, {**ASSISTANT, "weight": 0.5})])
    assert report["examples"] == 0
    assert [(e["line"], e["code"]) for e in report["errors"]] == [
        (1, "invalid_tool_calls"), (2, "invalid_tool_calls"), (3, "invalid_weight")]


def test_tool_definitions_that_are_no_list_are_reported() -> None:
    """Found by an audit: accepted at upload, then the worker refused the file ("tools" must be a list)."""
    pair = {"input": {"messages": [USER], "tools": {"name": "get_weather"}},
            "preferred_output": [ASSISTANT], "non_preferred_output": [{"role": "assistant", "content": "Rain."}]}
    assert [(e["line"], e["code"]) for e in validate([pair])["errors"]] == [(1, "invalid_tools")]
    for tools in ("get_weather", ["get_weather"]):  # transformers takes objects only (its "JSON schema" error)
        assert [(e["line"], e["code"], e["message"]) for e in validate([chat(USER, ASSISTANT, tools=tools)]
                                                                        )["errors"]] == [
            (1, "invalid_tools", "line 1: 'tools' must be a list of tool definitions (objects)")]


def test_openai_error_codes_carry_line_numbers() -> None:
    report = validate(["{not json", "[1, 2]", {"messages": "hi"}, chat({"content": "hi"}, ASSISTANT),
                       chat({**USER, "colour": "red"}, ASSISTANT), chat({"role": "wizard", "content": "x"}, ASSISTANT),
                       chat(USER, {"role": "assistant"}), chat(USER), {"messages": [USER, ASSISTANT], "extra": 1},
                       chat({"role": ["user"], "content": "x"}, ASSISTANT)])
    codes = [(e["line"], e["code"]) for e in report["errors"]]
    assert codes == [(1, "invalid_json"), (2, "data_type"), (3, "missing_messages_list"),
                     (4, "message_missing_key"), (5, "message_unrecognized_key"), (6, "unrecognized_role"),
                     (7, "missing_content"), (8, "example_missing_assistant_message"), (9, "data_type"),
                     (10, "unrecognized_role")]
    assert report["examples"] == 0 and report["error_count"] == 10


def test_prompt_completion_text_and_preference_formats() -> None:
    assert validate([{"prompt": "2+2=", "completion": "4"}] * 2)["format"] == "prompt_completion"
    assert validate([{"text": "Once upon a time."}])["format"] == "text"
    preference = {"input": {"messages": [USER]}, "preferred_output": [ASSISTANT],
                  "non_preferred_output": [{"role": "assistant", "content": "Rainy, probably."}]}
    report = validate([preference])
    assert report["format"] == "preference" and report["error_count"] == 0 and report["examples"] == 1
    bad = validate([{"prompt": "x", "completion": ""}, {"text": ""},
                    {"input": [], "preferred_output": [ASSISTANT], "non_preferred_output": [ASSISTANT]}])
    assert [e["code"] for e in bad["errors"]] == ["missing_content", "mixed_formats", "mixed_formats"]


def pair(preferred: Any = (ASSISTANT,), non_preferred: Any = ({"role": "assistant", "content": "Rainy."},),
         **extra: Any) -> dict[str, Any]:
    """A preference line; an output given as None is left out."""
    row = {"input": {"messages": [USER]}, **extra}
    for key, output in (("preferred_output", preferred), ("non_preferred_output", non_preferred)):
        if output is not None:
            row[key] = list(output) if isinstance(output, tuple) else output
    return row


def test_preference_pairs_are_checked_with_line_numbers() -> None:
    report = validate([
        pair(),
        pair(non_preferred=(ASSISTANT,)),  # the same answer twice
        pair(non_preferred=({"role": "assistant", "content": "  Sunny.\n"},)),  # the same, but for whitespace
        pair(non_preferred=None),
        pair(preferred=[]),
        pair(preferred="Sunny."),
        pair(preferred=(USER, ASSISTANT)),  # a user turn in an output
        pair(non_preferred=({"role": "tool", "content": "{}"},)),
        pair(preferred=({"role": "assistant"},)),
        pair(non_preferred=({"role": "assistant", "content": "Sunny, and warm."},)),
    ])
    assert [(e["line"], e["code"]) for e in report["errors"]] == [
        (2, "identical_outputs"), (3, "identical_outputs"), (4, "missing_output"), (5, "missing_output"),
        (6, "missing_output"), (7, "output_not_assistant"), (8, "output_not_assistant"), (9, "missing_content")]
    assert report["examples"] == 2 and report["errors_by_code"]["identical_outputs"] == 2
    messages = {e["line"]: e["message"] for e in report["errors"]}
    assert messages[2] == ("line 2: 'preferred_output' and 'non_preferred_output' are the same answer; a pair teaches "
                           "a preference only when its answers differ")
    assert messages[4] == "line 4: 'non_preferred_output' must be a non-empty list of assistant messages (the answer)"
    assert messages[7].startswith("line 7, 'preferred_output' message 0: role 'user'")
    assert messages[9] == "line 9, 'preferred_output' message 0: missing 'content'"


def test_a_file_mixing_formats_is_an_error() -> None:
    report = validate([chat(USER, ASSISTANT), {"prompt": "a", "completion": "b"}, {"text": "c"}])
    assert report["format"] == "chat" and report["examples"] == 1
    assert [(e["line"], e["code"]) for e in report["errors"]] == [(2, "mixed_formats"), (3, "mixed_formats")]


def test_duplicates_empty_replies_and_character_statistics() -> None:
    report = validate([chat(USER, ASSISTANT), chat(USER, ASSISTANT), chat(USER, {"role": "assistant", "content": " "})])
    assert report["duplicate_examples"] == 1 and report["duplicates_exact"] is True
    assert report["empty_assistant_messages"] == 1
    length = len(USER["content"]) + len(ASSISTANT["content"])
    assert report["characters"]["max"] == length and report["characters"]["min"] == len(USER["content"]) + 1


def test_last_line_without_newline_blank_lines_and_byte_order_mark_are_handled() -> None:
    data = b"\xef\xbb\xbf" + json.dumps(chat(USER, ASSISTANT)).encode() + b"\n\n  \n" + json.dumps(
        {"messages": [USER, {"role": "assistant", "content": "Cloudy."}]}).encode()
    report = validate_chunks([data]).report()
    assert report["examples"] == 2 and report["error_count"] == 0


def test_a_line_longer_than_the_limit_is_reported_not_buffered(monkeypatch: Any) -> None:
    monkeypatch.setattr(datasets, "MAX_LINE_BYTES", 200)
    validator = DatasetValidator()
    validator.feed(json.dumps(chat(USER, ASSISTANT)).encode() + b"\n")
    for _ in range(50):
        validator.feed(b"x" * 30)
        assert validator._pending_bytes <= 200
    validator.feed(b"\n" + json.dumps(chat(USER, ASSISTANT)).encode())
    validator.finish()
    report = validator.report()
    assert [(e["line"], e["code"]) for e in report["errors"]] == [(2, "line_too_long")]
    assert report["examples"] == 2 and report["duplicate_examples"] == 1


def test_many_bad_lines_give_exact_totals_and_a_capped_report() -> None:
    lines = 200_000
    data = b"{oops\n" * (lines // 2) + b'{"messages": [{"role": "user"}]}\n' * (lines // 2)
    report = validate_chunks(data[i : i + (1 << 20)] for i in range(0, len(data), 1 << 20)).report()
    assert report["error_count"] == lines + lines // 2  # the second half: missing content and no assistant
    assert report["errors_by_code"] == {"invalid_json": lines // 2, "missing_content": lines // 2,
                                        "example_missing_assistant_message": lines // 2}
    assert len(report["errors"]) == datasets.MAX_REPORTED_ERRORS and report["errors_truncated"] is True
    assert report["errors"][-1]["line"] == datasets.MAX_REPORTED_ERRORS
    assert len(json.dumps(report)) < 50_000


def test_duplicate_tracking_is_bounded_and_says_so(monkeypatch: Any) -> None:
    monkeypatch.setattr(datasets, "DUPLICATE_TRACKING_LIMIT", 10)
    rows = [{"text": f"example {i}"} for i in range(30)] + [{"text": "example 3"}, {"text": "example 25"}]
    validator = validate_chunks([("\n".join(json.dumps(r) for r in rows)).encode()])
    report = validator.report()
    assert len(validator._seen) == 10
    # A repeat of a remembered example is found; one of an example past the limit is not.
    assert report["duplicate_examples"] == 1 and report["duplicates_exact"] is False
    assert report["duplicate_tracking_limit"] == 10


def test_length_statistics_are_exact_for_min_max_mean_and_sampled_for_percentiles() -> None:
    stats = LengthStats(reservoir_size=2000)
    for value in range(1, 100_001):
        stats.add(value)
    summary = stats.summary()
    assert summary is not None and len(stats.sample) == 2000
    assert summary["min"] == 1 and summary["max"] == 100_000 and summary["mean"] == 50_000.5
    assert abs(summary["p50"] - 50_000) < 5_000 and abs(summary["p95"] - 95_000) < 3_000
    small = LengthStats()
    for value in (5, 1, 3):
        small.add(value)
    assert small.summary() == {"min": 1, "mean": 3.0, "p50": 3, "p95": 5, "max": 5}
    assert LengthStats().summary() is None
