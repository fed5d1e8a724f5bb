from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.support.reporters import RecordingReporter
from tests.worker.training.factories import chat_records, code_mapping, write_jsonl
from worker.training.data import (
    IGNORE_INDEX,
    collate,
    load_examples,
    plan_epoch,
    tokenize_chat,
    tokenize_prompt_completion,
    tokenize_record,
)


def _labelled_text(tokenizer: Any, input_ids: list[int], labels: list[int]) -> str:
    return tokenizer.decode([t for t, lab in zip(input_ids, labels, strict=True) if lab != IGNORE_INDEX])


def test_chat_mask_covers_exactly_the_assistant_answers(tokenizer: Any) -> None:
    messages = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "second question"},
        {"role": "assistant", "content": "second answer"},
    ]
    example = tokenize_chat(tokenizer, messages, train_on_inputs=False)
    assert _labelled_text(tokenizer, example.input_ids, example.labels) == (
        "first answer<|im_end|>\nsecond answer<|im_end|>\n"
    )
    everything = tokenize_chat(tokenizer, messages, train_on_inputs=True)
    assert everything.labels == everything.input_ids


def test_chat_mask_excludes_assistant_messages_with_weight_zero(tokenizer: Any) -> None:
    messages = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "wrong answer", "weight": 0},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "right answer", "weight": 1},
    ]
    example = tokenize_chat(tokenizer, messages, train_on_inputs=False)
    assert _labelled_text(tokenizer, example.input_ids, example.labels) == "right answer<|im_end|>\n"


def test_a_chat_examples_tools_reach_the_chat_template_as_the_apis_token_count_has_them(tiny_model: Path) -> None:
    """Found by an audit: supervised examples trained without their tool definitions (DPO's had them), while the
    upload's token statistics and truncation warnings counted them."""
    from transformers import AutoTokenizer

    from app.services.tokens import load_token_counter

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = "{% if tools %}{{ tools | tojson }}{% endif %}" + tokenizer.chat_template
    tools = [{"type": "function", "function": {"name": "lookup_river", "parameters": {"type": "object"}}}]
    record = {"messages": [{"role": "user", "content": "which river?"},
                           {"role": "assistant", "content": "the long one"}], "tools": tools}
    example = tokenize_record(record, tokenizer, train_on_inputs=False)
    assert "lookup_river" in tokenizer.decode(example.input_ids)
    assert _labelled_text(tokenizer, example.input_ids, example.labels) == "the long one<|im_end|>\n"
    config = json.loads((tiny_model / "tokenizer_config.json").read_text())
    config["chat_template"] = tokenizer.chat_template
    counter = load_token_counter({"tokenizer.json": (tiny_model / "tokenizer.json").read_text(),
                                  "tokenizer_config.json": json.dumps(config)})
    assert counter is not None and counter.lengths([record]) == [len(example.input_ids)]
    for tools in ({"name": "lookup_river"}, ["lookup_river"]):
        with pytest.raises(ValueError, match='"tools" must be a list of tool definitions'):
            tokenize_record({**record, "tools": tools}, tokenizer, train_on_inputs=False)


def test_prompt_completion_mask_covers_the_completion_and_eos(tokenizer: Any) -> None:
    example = tokenize_prompt_completion(tokenizer, "code for river:", " alpha beta", train_on_inputs=False)
    assert _labelled_text(tokenizer, example.input_ids, example.labels) == " alpha beta<|im_end|>"
    assert tokenizer.decode(example.input_ids) == "<|begin_of_text|>code for river: alpha beta<|im_end|>"
    with_prompt = tokenize_record(
        {"prompt": "code for river:", "completion": " alpha"}, tokenizer, train_on_inputs=True
    )
    # Everything but the first token, which nothing predicts.
    assert with_prompt.labels[0] == IGNORE_INDEX and with_prompt.labels[1:] == with_prompt.input_ids[1:]


def test_truncation_and_dropped_examples_are_reported(tmp_path: Path, tokenizer: Any) -> None:
    records = [
        {"text": "word " * 100},  # truncated, keeps labels
        {"prompt": "x " * 100, "completion": " y"},  # truncated inside the prompt: no label left, dropped
        {"prompt": "short", "completion": " fine"},
    ]
    reporter = RecordingReporter()
    examples = load_examples(
        write_jsonl(tmp_path / "t.jsonl", records),
        tokenizer,
        max_seq_length=16,
        train_on_inputs=False,
        reporter=reporter,
    )
    assert len(examples) == 2 and max(len(e.input_ids) for e in examples) == 16
    warnings = reporter.warnings()
    assert len(warnings) == 2
    assert warnings[0].startswith("2 example(s) in t.jsonl were longer than max_seq_length=16")
    assert warnings[1].startswith("1 example(s) in t.jsonl had no tokens left in the loss")


def test_malformed_line_raises_with_its_line_number(tmp_path: Path, tokenizer: Any) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"prompt": "no completion"}\n')
    with pytest.raises(ValueError, match="bad.jsonl line 2"):
        load_examples(path, tokenizer, max_seq_length=32, train_on_inputs=False, reporter=RecordingReporter())
    path.write_text('{"text": "ok"}\n\n{"text": "ok"\n')
    with pytest.raises(ValueError, match="bad.jsonl line 3"):
        load_examples(path, tokenizer, max_seq_length=32, train_on_inputs=False, reporter=RecordingReporter())


def test_lines_are_read_as_the_upload_validated_them(tmp_path: Path, tokenizer: Any) -> None:
    """Found by an audit: a lone carriage return, JSON whitespace inside a line the upload accepted, cut the line in
    two when the worker read the file (universal newlines), and the job failed. CRLF line ends still read."""
    from app.services.datasets import validate_chunks

    content = b'{"prompt": "p0",\r"completion": " c0"}\n{"prompt": "p1", "completion": " c1"}\r\n'
    assert validate_chunks(iter([content])).report()["error_count"] == 0
    path = tmp_path / "train.jsonl"
    path.write_bytes(content)
    examples = load_examples(path, tokenizer, max_seq_length=32, train_on_inputs=False, reporter=RecordingReporter())
    assert len(examples) == 2


def test_length_grouped_batches_cover_every_example_once_and_pad_less() -> None:
    lengths = [(i * 37) % 50 + 5 for i in range(200)]
    plan = plan_epoch(lengths, batch_size=8, max_seq_length=64, packing=False, seed=0)
    assert sorted(i for batch in plan for row in batch for i in row) == list(range(200))
    padded = sum(len(b) * max(lengths[r[0]] for r in b) for b in plan)
    assert padded < 1.1 * sum(lengths)  # random batches would pad ~1.7x here
    assert plan == plan_epoch(lengths, batch_size=8, max_seq_length=64, packing=False, seed=0)
    assert plan != plan_epoch(lengths, batch_size=8, max_seq_length=64, packing=False, seed=1)


def test_packed_rows_fit_max_seq_length_and_restart_positions(tokenizer: Any) -> None:
    examples = [tokenize_record(r, tokenizer, train_on_inputs=False) for r in code_mapping(20)]
    plan = plan_epoch([len(e.input_ids) for e in examples], batch_size=2, max_seq_length=48, packing=True, seed=0)
    assert sorted(i for batch in plan for row in batch for i in row) == list(range(20))
    batch = collate(plan[0], examples, pad_id=tokenizer.pad_token_id, packing=True)
    assert batch["attention_mask"] is None and batch["input_ids"].shape[1] <= 48
    first_row = plan[0][0]
    assert len(first_row) > 1
    second_start = len(examples[first_row[0]].input_ids)
    assert batch["position_ids"][0, second_start].item() == 0


def test_packed_batch_loss_equals_token_weighted_unpacked_loss(tiny_model: Path, tokenizer: Any) -> None:
    from transformers import AutoModelForCausalLM

    from worker.training.evaluate import forward_logits, token_loss_sum

    model = AutoModelForCausalLM.from_pretrained(tiny_model, use_safetensors=True, attn_implementation="sdpa")
    model.eval()
    records = code_mapping(6) + chat_records(6)
    examples = [tokenize_record(r, tokenizer, train_on_inputs=False) for r in records]
    lengths = [len(e.input_ids) for e in examples]
    plan = plan_epoch(lengths, batch_size=2, max_seq_length=96, packing=True, seed=3)
    assert any(len(row) > 2 for batch in plan for row in batch)
    with torch.no_grad():
        packed_sum, packed_n = 0.0, 0
        for batch_plan in plan:
            batch = collate(batch_plan, examples, pad_id=tokenizer.pad_token_id, packing=True)
            loss, n, _ = token_loss_sum(forward_logits(model, batch), batch["labels"])
            packed_sum, packed_n = packed_sum + loss.item(), packed_n + n
        # Unpacked and padded in one batch: right padding with a 2D attention mask.
        batch = collate([[i] for i in range(len(examples))], examples, pad_id=tokenizer.pad_token_id, packing=False)
        loss, n, _ = token_loss_sum(forward_logits(model, batch), batch["labels"])
    assert packed_n == n
    assert packed_sum / packed_n == pytest.approx(loss.item() / n, rel=1e-5)
    # Without the block-diagonal mask the examples would see each other and the loss would differ.
    with torch.no_grad():
        leaky = collate(plan[0], examples, pad_id=tokenizer.pad_token_id, packing=True)
        leaky_loss, _, _ = token_loss_sum(
            model(input_ids=leaky["input_ids"], use_cache=False).logits[:, :-1], leaky["labels"]
        )
        exact, _, _ = token_loss_sum(forward_logits(model, leaky), leaky["labels"])
    assert abs(leaky_loss.item() - exact.item()) > 1e-3


def test_split_by_tokens_bounds_each_forward_and_keeps_row_order() -> None:
    from worker.training.data import split_by_tokens

    lengths = [500, 300, 120, 100, 90, 20, 10, 5]
    batch = [[i] for i in range(8)]
    parts = split_by_tokens(batch, lengths, max_tokens=600)
    assert [row for part in parts for row in part] == batch
    assert parts == [[[0]], [[1], [2]], [[3], [4], [5], [6], [7]]]
    assert all(len(p) * max(lengths[r[0]] for r in p) <= 600 for p in parts)
    # A row longer than the budget runs alone; a batch that fits stays whole.
    assert split_by_tokens([[0], [1]], lengths, max_tokens=100) == [[[0]], [[1]]]
    assert split_by_tokens(batch, lengths, max_tokens=8 * 500) == [batch]


def test_a_tokenizer_without_a_beginning_of_text_token_trains_text_and_prompt_completion(tiny_model: Path) -> None:
    """Qwen2's tokenizer has no BOS token: text and prompt-completion examples start with the text's own tokens
    (no None among the ids), and the API's token count adds only the special tokens the tokenizer has."""
    from transformers import AutoTokenizer

    from app.services.tokens import load_token_counter

    bare = AutoTokenizer.from_pretrained(tiny_model)
    bare.bos_token = None
    assert bare.bos_token_id is None
    text = tokenize_record({"text": "alpha beta"}, bare, train_on_inputs=False)
    pair = tokenize_record({"prompt": "alpha", "completion": " beta"}, bare, train_on_inputs=False)
    words = bare("alpha beta", add_special_tokens=False)["input_ids"]
    assert text.input_ids == [*words, bare.eos_token_id]
    assert None not in pair.input_ids and pair.input_ids[-1] == bare.eos_token_id
    with_bos = AutoTokenizer.from_pretrained(tiny_model)
    assert tokenize_record({"text": "alpha beta"}, with_bos, train_on_inputs=False).input_ids == [
        with_bos.bos_token_id, *words, with_bos.eos_token_id]
    files = {name: (tiny_model / name).read_text() for name in ("tokenizer.json", "tokenizer_config.json")}
    counted = load_token_counter(files)
    assert counted is not None and counted.lengths([{"text": "alpha beta"}]) == [len(words) + 2]
    config = json.loads(files["tokenizer_config.json"])
    config["bos_token"] = None
    counted = load_token_counter({**files, "tokenizer_config.json": json.dumps(config)})
    assert counted is not None and counted.lengths([{"text": "alpha beta"}]) == [len(text.input_ids)]


def test_a_developer_message_trains_as_a_system_message(tokenizer: Any) -> None:
    """The upload accepts OpenAI's "developer" role; chat templates know "system", which training renders it as."""
    chat = [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}]
    system = [{**chat[0], "role": "system"}, *chat[1:]]
    developer = tokenize_record({"messages": chat}, tokenizer, train_on_inputs=False)
    assert developer == tokenize_record({"messages": system}, tokenizer, train_on_inputs=False)
    assert "be brief" in tokenizer.decode(developer.input_ids)
    # what inference and answer reports continue: the same rendering
    from worker.training.data import prompt_ids

    assert prompt_ids(tokenizer, {"messages": chat[:2]}) == prompt_ids(tokenizer, {"messages": system[:2]})


def test_a_file_with_a_byte_order_mark_loads(tmp_path: Path, tokenizer: Any) -> None:
    """The upload's validation accepts a UTF-8 byte-order mark before the first line; the worker reads past it."""
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "a", "completion": " b"}\n{"text": "c d"}\n')
    examples = load_examples(path, tokenizer, max_seq_length=64, train_on_inputs=False, reporter=RecordingReporter())
    assert len(examples) == 2


def test_evaluation_runs_a_batch_as_passes_within_the_forward_budget_with_the_same_figures(
        tiny_model: Path, tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A validation batch of long examples holds one pass's activations at a time, as training does: passes of
    forward_tokens(False) tokens (a longer row alone), summed into the same loss and accuracy."""
    from contextlib import nullcontext

    from transformers import AutoModelForCausalLM

    import worker.training.evaluate as evaluation
    from app.schemas import training as training_schema

    model = AutoModelForCausalLM.from_pretrained(tiny_model, use_safetensors=True, attn_implementation="sdpa")
    examples = [tokenize_record(r, tokenizer, train_on_inputs=False) for r in code_mapping(6) + chat_records(6)]
    lengths = [len(e.input_ids) for e in examples]
    plan = [[[i] for i in range(len(examples))]]  # one batch of every example
    passes: list[int] = []
    real = evaluation.token_loss

    def counting(model: Any, batch: dict[str, Any]) -> Any:
        passes.append(batch["input_ids"].numel())
        return real(model, batch)

    monkeypatch.setattr(evaluation, "token_loss", counting)

    def run(budget: int) -> dict[str, float]:
        monkeypatch.setattr(training_schema, "MAX_TOKENS_PER_FORWARD", budget)
        passes.clear()
        return evaluation.evaluate(model, evaluation.split_for_evaluation(plan, lengths), examples,
                                   pad_id=tokenizer.pad_token_id, device=torch.device("cpu"), autocast=nullcontext)

    whole = run(10**6)
    assert len(passes) == 1
    split = run(max(lengths))
    assert len(passes) > 2 and max(passes) <= max(lengths), passes
    assert split == pytest.approx(whole, rel=1e-5)


def test_the_api_counts_the_rows_packing_makes_as_the_worker_plans_them(tmp_path: Path, tiny_model: Path) -> None:
    """The estimate's packed steps: the API's token statistics pack a file's examples (truncated to max_seq_length)
    into the rows the worker's first epoch with the default seed makes, by the one rule (pack_rows); the fewest rows
    the tokens could fill, what the estimate said before, is fewer."""
    import math
    import random

    from transformers import AutoTokenizer

    from app.core.storage import LocalStorage
    from app.models import File
    from app.services.tokens import PACKING_SEED, load_token_counter, token_statistics

    rng = random.Random(3)
    records = [{"text": " ".join(rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(rng.randint(2, 40)))}
               for _ in range(60)]
    path = write_jsonl(tmp_path / "train.jsonl", records)
    storage = LocalStorage(tmp_path / "blobs")
    storage.write("train", [path.read_bytes()])
    counter = load_token_counter({name: (tiny_model / name).read_text()
                                  for name in ("tokenizer.json", "tokenizer_config.json")})
    assert counter is not None
    max_seq_length = 48
    stats = token_statistics(storage=storage, file=File(blob_key="train", report={"format": "text"}), counter=counter,
                             max_seq_length=max_seq_length)
    examples = load_examples(path, AutoTokenizer.from_pretrained(tiny_model), max_seq_length=max_seq_length,
                             train_on_inputs=False, reporter=RecordingReporter())
    lengths = [len(e.input_ids) for e in examples]
    planned = plan_epoch(lengths, batch_size=1, max_seq_length=max_seq_length, packing=True, seed=PACKING_SEED)
    assert stats["packed_rows"] == {str(max_seq_length): len(planned)}
    assert len(planned) > math.ceil(sum(lengths) / max_seq_length)
