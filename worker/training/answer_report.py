"""What the tuned model answers, beside the base: the evaluation report a job with a validation file ends with.

For the first `max_examples` validation examples, the prompt (the conversation before its last assistant turn,
or a prompt-completion example's prompt) is answered greedily by the base model and by the tuned one, and each
answer is scored against the reference (that last assistant turn, or the completion): exact match (after
trimming whitespace), token-level F1 (SQuAD's, over lower-cased whitespace tokens) and ROUGE-L F-measure
(torchmetrics). The report also gives each model's average answer length and how often it ran into the token
limit without stopping: a tuned model that never emits its end-of-turn token is the most common broken
fine-tune. Adapters are evaluated on the unquantized base (as they are merged and served), a full fine-tune
beside a fresh copy of its base.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from app.schemas.training import AnswerBudget, EvaluationConfig
from worker.training.data import open_jsonl, prompt_ids
from worker.training.generation import answer_tokens, end_ids, inference_dtype

# The default answer budget: twice the longest reference plus this, at most AUTO_MAX_NEW_TOKENS.
AUTO_EXTRA_TOKENS = 16
AUTO_MAX_NEW_TOKENS = 512
METRICS = ("exact_match", "f1", "rouge_l")


def examples_of(path: Path, *, limit: int) -> list[tuple[dict[str, Any], str]]:
    """(prompt, reference) for the first `limit` validation examples that have an answer to compare with (a chat's
    last assistant turn, a completion, or a preference pair's preferred answer)."""
    found: list[tuple[dict[str, Any], str]] = []
    with open_jsonl(path) as lines:
        for line in lines:
            if len(found) >= limit:
                break
            record = json.loads(line) if line.strip() else None
            if not isinstance(record, dict):
                continue
            # The prompt as training rendered it: the earlier turns whole (tool calls too) and the example's tools.
            messages = record.get("messages")
            if isinstance(messages, list) and messages and messages[-1].get("role") == "assistant":
                found.append(({"messages": messages[:-1], "tools": record.get("tools")},
                              str(messages[-1].get("content") or "")))
            elif isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
                found.append(({"text": record["prompt"]}, record["completion"]))
            elif isinstance(record.get("input"), dict) and isinstance(record.get("preferred_output"), list):
                # A preference pair: the preferred answer is the reference.
                source, preferred = record["input"].get("messages"), record["preferred_output"]
                if isinstance(source, list) and source and preferred and isinstance(preferred[-1], dict):
                    found.append(({"messages": source, "tools": record["input"].get("tools")},
                                  str(preferred[-1].get("content") or "")))
    return found


def _words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text.lower())


def token_f1(answer: str, reference: str) -> float:
    """SQuAD-style F1 over lower-cased word and punctuation tokens (1.0 when both are empty)."""
    a, r = _words(answer), _words(reference)
    if not a or not r:
        return float(a == r)
    common = sum((Counter(a) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(a), common / len(r)
    return 2 * precision * recall / (precision + recall)


def rouge_l(answer: str, reference: str) -> float:
    from torchmetrics.functional.text.rouge import rouge_score

    if not answer.strip() or not reference.strip():
        return float(answer.strip() == reference.strip())
    return float(rouge_score(answer, reference, rouge_keys="rougeL")["rougeL_fmeasure"])


def score(answer: str, reference: str) -> dict[str, float]:
    return {"exact_match": float(answer.strip() == reference.strip()), "f1": token_f1(answer, reference),
            "rouge_l": rouge_l(answer, reference)}


def _answer(model: Any, tokenizer: Any, prompt: list[int], max_new_tokens: int) -> tuple[str, str, int]:
    generator = torch.Generator(device=next(model.parameters()).device)
    text, reason, count = "", "length", 0
    for line in answer_tokens(model, tokenizer, prompt, max_tokens=max_new_tokens, temperature=0.0, top_p=1.0,
                              stop=[], generator=generator, ends=end_ids(model, tokenizer)):
        if line["type"] == "delta":
            text += line["text"]
        else:
            reason, count = line["finish_reason"], line["completion_tokens"]
    return text, reason, count


def _summary(rows: list[dict[str, Any]], who: str) -> dict[str, float]:
    n = max(len(rows), 1)
    summary = {name: sum(r[who]["scores"][name] for r in rows) / n for name in METRICS}
    summary["mean_answer_tokens"] = sum(r[who]["tokens"] for r in rows) / n
    summary["hit_max_tokens"] = sum(r[who]["finish_reason"] == "length" for r in rows) / n
    return summary


def answer_budget(tokenizer: Any, examples: list[tuple[dict[str, Any], str]], evaluation: AnswerBudget) -> int:
    """max_new_tokens, or twice the longest reference plus AUTO_EXTRA_TOKENS (at most AUTO_MAX_NEW_TOKENS)."""
    if evaluation.max_new_tokens is not None:
        return evaluation.max_new_tokens
    longest = max((len(tokenizer(r, add_special_tokens=False)["input_ids"]) for _, r in examples), default=0)
    return min(AUTO_MAX_NEW_TOKENS, 2 * longest + AUTO_EXTRA_TOKENS)


def greedy_answers(model: Any, tokenizer: Any, prompts: list[list[int]], budget: int) -> list[tuple[str, str, int]]:
    """(text, finish reason, tokens) of the model's greedy answer to each prompt."""
    with torch.inference_mode():
        return [_answer(model, tokenizer, p, budget) for p in prompts]


def compare_answers(examples: list[tuple[dict[str, Any], str]], prompts: list[list[int]], budget: int, *,
                    base: list[tuple[str, str, int]], tuned: list[tuple[str, str, int]]
                    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The report (headline numbers per model, tuned minus base) and one scored sample per example."""
    samples = []
    for i, ((prompt, reference), ids) in enumerate(zip(examples, prompts, strict=True)):
        row: dict[str, Any] = {"index": i, "prompt": prompt.get("messages", prompt.get("text")),
                               "prompt_tokens": len(ids), "reference": reference}
        for who, answers in (("base", base), ("tuned", tuned)):
            text, reason, count = answers[i]
            row[who] = {"answer": text, "finish_reason": reason, "tokens": count, "scores": score(text, reference)}
        samples.append(row)
    base_summary, tuned_summary = _summary(samples, "base"), _summary(samples, "tuned")
    report = {"examples": len(samples), "max_new_tokens": budget, "greedy": True,
              "base": base_summary, "tuned": tuned_summary,
              "tuned_minus_base": {name: tuned_summary[name] - base_summary[name] for name in METRICS},
              "tuned_worse_than_base": sum(r["tuned"]["scores"]["rouge_l"] < r["base"]["scores"]["rouge_l"]
                                           for r in samples)}
    return report, samples


def evaluate_answers(evaluation: EvaluationConfig, *, full: bool, model_path: Path, final_dir: Path,
                     validation_file: Path, device: torch.device, trust_remote_code: bool = False
                     ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A job's report, from its base model's folder and its final weights (adapter or full model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = inference_dtype(device)
    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True, trust_remote_code=trust_remote_code)
    examples = examples_of(validation_file, limit=evaluation.max_examples)
    prompts = [prompt_ids(tokenizer, prompt) for prompt, _ in examples]
    budget = answer_budget(tokenizer, examples, evaluation)

    def load(folder: Path) -> Any:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True, local_files_only=True,
                                                     trust_remote_code=trust_remote_code)
        model.to(device)  # type: ignore[arg-type]  # transformers' stub for .to is too narrow
        return model.eval()

    base_model = load(model_path)
    if full:
        base = greedy_answers(base_model, tokenizer, prompts, budget)
        del base_model
        tuned = greedy_answers(load(final_dir), tokenizer, prompts, budget)
    else:
        from peft import PeftModel

        adapted = PeftModel.from_pretrained(base_model, str(final_dir)).eval()
        tuned = greedy_answers(adapted, tokenizer, prompts, budget)
        with adapted.disable_adapter():
            base = greedy_answers(adapted, tokenizer, prompts, budget)
    return compare_answers(examples, prompts, budget, base=base, tuned=tuned)
