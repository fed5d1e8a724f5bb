"""The answer report: its scores against hand computations, which examples it reads, and the answers it records
are the base's and the tuned model's own greedy answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from app.core.storage import LocalStorage
from app.schemas.training import EvaluationConfig
from tests.support.adapters import perturbed_model, store_adapter
from tests.support.data import chat_lines, jsonl, preference_lines
from worker.training.answer_report import (
    AUTO_EXTRA_TOKENS,
    evaluate_answers,
    examples_of,
    rouge_l,
    score,
    token_f1,
)
from worker.training.data import prompt_ids


def test_scores_match_hand_computations() -> None:
    # 3 common tokens; precision 3/3, recall 3/4: F1 = 2 * 1 * 0.75 / 1.75.
    assert token_f1("The cat sat", "the cat sat down") == pytest.approx(6 / 7)
    assert token_f1("dog", "the cat") == 0.0 and token_f1("", "") == 1.0
    # Longest common subsequence "a c d" (3): precision 3/4, recall 3/3.
    assert rouge_l("a b c d", "a c d") == pytest.approx(2 * 0.75 / 1.75)
    assert score(" red\n", "red") == {"exact_match": 1.0, "f1": 1.0, "rouge_l": pytest.approx(1.0)}
    assert score("blue", "red")["exact_match"] == 0.0


def test_examples_are_prompts_before_the_last_answer_and_prompt_completions(tmp_path: Path) -> None:
    path = tmp_path / "valid.jsonl"
    rows = [*chat_lines(2), {"prompt": "2 + 2 =", "completion": " 4"},
            {"messages": [{"role": "user", "content": "no answer here"}]}, *chat_lines(5, offset=10)]
    path.write_bytes(jsonl(rows))
    found = examples_of(path, limit=4)
    assert found[0] == ({"messages": [{"role": "system", "content": "You map codes to colours."},
                                      {"role": "user", "content": "code 0"}], "tools": None}, "red")
    assert found[2] == ({"text": "2 + 2 ="}, " 4")
    assert len(found) == 4 and found[3][0]["messages"][1]["content"] == "code 10"  # the answerless one is skipped


def test_an_examples_prompt_is_rendered_as_training_rendered_it_tools_and_tool_calls_too(tmp_path: Path,
                                                                                        tiny_model: Path) -> None:
    """Found by a review: the answer report's prompts dropped the example's tools and the earlier turns' tool calls,
    which training renders."""
    from transformers import AutoTokenizer

    from worker.training.data import prompt_ids, tokenize_record

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = "{% if tools %}{{ tools | tojson }}{% endif %}" + tokenizer.chat_template
    call = {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
    record = {"messages": [{"role": "user", "content": "which river?"}, {"role": "assistant", "tool_calls": [call]},
                           {"role": "tool", "tool_call_id": "c1", "content": "the long one"},
                           {"role": "assistant", "content": "the long one"}],
              "tools": [{"type": "function", "function": {"name": "lookup"}}]}
    path = tmp_path / "valid.jsonl"
    path.write_bytes(jsonl([record]))
    ((prompt, reference),) = examples_of(path, limit=1)
    trained = tokenize_record(record, tokenizer, train_on_inputs=False)
    ids = prompt_ids(tokenizer, prompt)
    assert reference == "the long one" and trained.input_ids[: len(ids)] == ids  # the prompt training saw
    assert "lookup" in tokenizer.decode(ids) and '"c1"' in tokenizer.decode(ids)


def test_a_preference_pairs_preferred_answer_is_its_reference(tmp_path: Path) -> None:
    path = tmp_path / "valid.jsonl"
    path.write_bytes(jsonl(preference_lines(2, offset=4)))
    assert examples_of(path, limit=5) == [
        ({"messages": [{"role": "system", "content": "You map codes to colours."},
                       {"role": "user", "content": "code 4"}], "tools": None}, "blue"),
        ({"messages": [{"role": "system", "content": "You map codes to colours."},
                       {"role": "user", "content": "code 5"}], "tools": None}, "green")]


def test_the_report_records_each_models_own_greedy_answers(tmp_path: Path, tiny_model_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    store_adapter(tiny_model_dir, LocalStorage(tmp_path / "s"), tmp_path, seed=3)
    valid = tmp_path / "valid.jsonl"
    valid.write_bytes(jsonl(chat_lines(5)))
    report, samples = evaluate_answers(EvaluationConfig(max_examples=3), full=False, model_path=tiny_model_dir,
                                       final_dir=tmp_path / "adapter-3", validation_file=valid,
                                       device=torch.device("cpu"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    longest = max(len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in ("red", "blue", "green"))
    assert report["examples"] == 3 and report["max_new_tokens"] == 2 * longest + AUTO_EXTRA_TOKENS
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                      str(tmp_path / "adapter-3")).eval()
    for sample in samples:
        ids = torch.tensor([prompt_ids(tokenizer, {"messages": sample["prompt"]})])
        for who, model in (("base", base), ("tuned", tuned)):
            out = model.generate(ids, max_new_tokens=report["max_new_tokens"], do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            new = [t for t in out[0, ids.shape[1]:].tolist() if t != tokenizer.eos_token_id]
            assert sample[who]["answer"] == tokenizer.decode(new, skip_special_tokens=True)
            assert sample[who]["scores"] == score(sample[who]["answer"], sample["reference"])
    for who in ("base", "tuned"):
        assert report[who]["exact_match"] == sum(s[who]["scores"]["exact_match"] for s in samples) / 3
        assert report[who]["hit_max_tokens"] == sum(s[who]["finish_reason"] == "length" for s in samples) / 3
    assert report["tuned_minus_base"]["f1"] == pytest.approx(report["tuned"]["f1"] - report["base"]["f1"])
    json.dumps(report)  # what eval_report.json holds


def test_a_full_fine_tune_is_compared_with_a_fresh_copy_of_its_base(tmp_path: Path, tiny_model_dir: Path) -> None:
    tuned = perturbed_model(tiny_model_dir, seed=5)
    tuned.save_pretrained(tmp_path / "final")  # as the recipe saves a full fine-tune's final weights
    valid = tmp_path / "valid.jsonl"
    valid.write_bytes(jsonl(chat_lines(3)))
    budget = EvaluationConfig(max_examples=3, max_new_tokens=6)
    report, samples = evaluate_answers(budget, full=True, model_path=tiny_model_dir, final_dir=tmp_path / "final",
                                       validation_file=valid, device=torch.device("cpu"))
    _, itself = evaluate_answers(budget, full=True, model_path=tiny_model_dir, final_dir=tiny_model_dir,
                                 validation_file=valid, device=torch.device("cpu"))
    assert report["max_new_tokens"] == 6 and report["examples"] == 3
    # The base column is the untouched base (what the base answers against itself); the tuned column differs.
    assert [s["base"]["answer"] for s in samples] == [s["base"]["answer"] for s in itself] == \
        [s["tuned"]["answer"] for s in itself]
    assert [s["tuned"]["answer"] for s in samples] != [s["base"]["answer"] for s in samples]
