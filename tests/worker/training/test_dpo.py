"""DPO through the recipe on the tiny model: a preference it can learn, the reference computed once (adapter off,
or the starting weights of a full fine-tune or an SFT adapter) and kept in checkpoints, exact resume, SimPO."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.support.reporters import RecordingReporter
from tests.worker.training.factories import make_config, write_jsonl
from tests.worker.training.factories import preference_records as pairs
from worker.training.dpo import REFERENCE_FILE
from worker.training.preference import collate_pairs, sequence_logps, tokenize_preference
from worker.training.recipe import train
from worker.training.reporting import TrainingPaused


def dpo_config(**overrides: Any) -> Any:
    values: dict[str, Any] = {"method": "dpo", "preference": {"beta": 0.5}, "learning_rate": 5e-3}
    values.update(overrides)
    return make_config(**values)


def run_dpo(tmp_path: Path, tiny_model: Path, config: Any, *, n: int = 32, valid: int = 16,
            reporter: RecordingReporter | None = None, **kwargs: Any) -> tuple[Any, RecordingReporter]:
    reporter = reporter or RecordingReporter()
    tmp_path.mkdir(parents=True, exist_ok=True)
    result = train(config, model_path=tiny_model, train_file=write_jsonl(tmp_path / "train.jsonl", pairs(n, seed=1)),
                   validation_file=write_jsonl(tmp_path / "valid.jsonl", pairs(valid, seed=2)) if valid else None,
                   output_dir=tmp_path / "out", reporter=reporter, **kwargs)
    return result, reporter


def logps_of(model: Any, tokenizer: Any, records: list[dict[str, Any]]) -> torch.Tensor:
    batch = collate_pairs([tokenize_preference(r, tokenizer, max_seq_length=64) for r in records],
                          pad_id=tokenizer.pad_token_id or 0)
    with torch.no_grad():
        logps, _ = sequence_logps(model, batch)
    return logps.view(2, -1).T


def test_a_lora_dpo_run_learns_the_preference_and_answers_in_the_preferred_format(
        tmp_path: Path, tiny_model: Path, tokenizer: Any) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # The RPO term (an NLL on the preferred answers) teaches a model that starts from random weights to produce them;
    # the DPO term alone would only rank the two answers.
    config = dpo_config(n_epochs=3, n_evals=4, preference={"beta": 0.5, "rpo_alpha": 1.0})
    result, reporter = run_dpo(tmp_path, tiny_model, config)
    steps = reporter.steps
    assert {"train_rewards_chosen", "train_rewards_rejected", "train_rewards_margin",
            "train_preference_accuracy"} <= set(steps[0])
    evaluated = [s for s in steps if "valid_preference_accuracy" in s]
    assert len(evaluated) == 4
    final = steps[-1]
    assert final["full_valid_preference_accuracy"] >= 0.9, final
    assert final["full_valid_rewards_margin"] > 0 and final["train_rewards_margin"] > steps[0]["train_rewards_margin"]
    assert steps[-1]["train_loss"] < steps[0]["train_loss"]
    # The reference: computed once, kept with the work files and in every checkpoint.
    assert sum("reference log-probabilities" in e["message"] for e in reporter.events) == 1
    saved = torch.load(tmp_path / "out" / REFERENCE_FILE, weights_only=True)
    assert saved["train"].shape == (32, 2) and saved["valid"].shape == (16, 2)
    assert reporter.checkpoints and all((c["path"] / REFERENCE_FILE).is_file() for c in reporter.checkpoints)
    # ... and it is the base model's (the adapter disabled): checked against the base loaded on its own.
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert saved["train"][:4] == pytest.approx(logps_of(base, tokenizer, pairs(32, seed=1)[:4]), abs=1e-4)
    # The tuned model's greedy answers start the preferred way; the base model's do not.
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), result.final_dir)
    prompts = [tokenizer.apply_chat_template(r["input"]["messages"], add_generation_prompt=True, tokenize=False)
               for r in pairs(8, seed=3)]

    def first_words(model: Any) -> list[str]:
        answers = []
        for prompt in prompts:
            ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
            out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            answers.append(tokenizer.decode(out[0, ids.size(1):], skip_special_tokens=True))
        return answers

    assert all(a.startswith("ok") for a in first_words(tuned)), first_words(tuned)
    assert not any(a.startswith("ok") for a in first_words(base)), first_words(base)


def test_a_resumed_dpo_run_continues_the_exact_curve_with_the_saved_reference(tmp_path: Path,
                                                                               tiny_model: Path) -> None:
    config = dpo_config(adapter={"type": "full"}, learning_rate=1e-4, n_epochs=1, batch_size=4)
    full, whole = run_dpo(tmp_path / "whole", tiny_model, config, n=24, valid=0)
    assert full.steps == 6
    with pytest.raises(TrainingPaused) as stopped:
        run_dpo(tmp_path / "paused", tiny_model, config, n=24, valid=0,
                reporter=RecordingReporter(commands={3: "pause"}))
    checkpoint = stopped.value.checkpoint
    assert (checkpoint / REFERENCE_FILE).is_file()
    resumed_result, resumed = run_dpo(tmp_path / "resumed", tiny_model, config, n=24, valid=0,
                                      resume_from=checkpoint)
    assert [s["step"] for s in resumed.steps] == [4, 5, 6]
    assert resumed.losses() == pytest.approx(whole.losses()[3:], rel=1e-5)
    # The reference came from the checkpoint (the weights had moved): not computed again.
    assert not any("reference log-probabilities" in e["message"] for e in resumed.events)
    # A full fine-tune's checkpoint without it cannot be resumed: its reference (the starting weights) is gone.
    (checkpoint / REFERENCE_FILE).unlink()
    with pytest.raises(ValueError, match="lacks the reference"):
        run_dpo(tmp_path / "again", tiny_model, config, n=24, valid=0, resume_from=checkpoint)


def test_dpo_after_sft_uses_the_sft_model_as_its_reference(tmp_path: Path, tiny_model: Path, tokenizer: Any) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    sft_records = [{"messages": [*r["input"]["messages"], *r["preferred_output"]]} for r in pairs(16, seed=4)]
    sft = train(make_config(), model_path=tiny_model, train_file=write_jsonl(tmp_path / "sft.jsonl", sft_records),
                validation_file=None, output_dir=tmp_path / "sft", reporter=RecordingReporter())
    run_dpo(tmp_path / "dpo", tiny_model, dpo_config(), n=8, valid=0, init_adapter=sft.final_dir)
    saved = torch.load(tmp_path / "dpo" / "out" / REFERENCE_FILE, weights_only=True)
    sft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), sft.final_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    expected = logps_of(sft_model, tokenizer, pairs(8, seed=1)[:4])
    assert saved["train"][:4] == pytest.approx(expected, abs=1e-4)
    assert not torch.allclose(expected, logps_of(base, tokenizer, pairs(8, seed=1)[:4]), atol=1e-2)


def test_dpo_after_sft_starts_where_the_policy_is_its_reference(tmp_path: Path, tiny_model: Path) -> None:
    """Found by an audit: the SFT adapter's dropout (0.05) stayed on in DPO, so at step 1, the policy being the
    reference, the loss was 0.6938 with a margin of -0.0013 instead of ln 2 and 0. A job's dropout is set on the
    adapter it continues (a DPO job's is 0 unless it gives one)."""
    import math

    sft_records = [{"messages": [*r["input"]["messages"], *r["preferred_output"]]} for r in pairs(16, seed=4)]
    sft = train(make_config(adapter={"dropout": 0.05}), model_path=tiny_model,
                train_file=write_jsonl(tmp_path / "sft.jsonl", sft_records), validation_file=None,
                output_dir=tmp_path / "sft", reporter=RecordingReporter())
    assert json.loads((sft.final_dir / "adapter_config.json").read_text())["lora_dropout"] == 0.05
    _result, reporter = run_dpo(tmp_path / "dpo", tiny_model, dpo_config(adapter={"dropout": 0.0}), n=8, valid=0,
                                init_adapter=sft.final_dir)
    first = reporter.steps[0]
    assert first["train_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["train_rewards_margin"] == pytest.approx(0.0, abs=1e-6)


def test_simpo_needs_no_reference_and_learns(tmp_path: Path, tiny_model: Path) -> None:
    config = dpo_config(preference={"loss_type": "simpo"}, n_epochs=2, n_evals=2)
    _result, reporter = run_dpo(tmp_path, tiny_model, config)
    assert not (tmp_path / "out" / REFERENCE_FILE).exists()
    assert not any("reference log-probabilities" in e["message"] for e in reporter.events)
    assert reporter.steps[-1]["full_valid_preference_accuracy"] >= 0.9


def test_fsdp_is_refused_for_dpo(tmp_path: Path, tiny_model: Path) -> None:
    with pytest.raises(ValueError, match="fsdp.*not available for DPO"):
        dpo_config(processes=2, distributed="fsdp")


@pytest.mark.parametrize("adapter", [{"type": "qlora", "r": 8, "alpha": 16, "dropout": 0.0},
                                     {"type": "dora", "r": 8, "alpha": 16, "dropout": 0.0, "use_rslora": True}],
                         ids=["qlora", "dora-rslora"])
def test_dpo_trains_other_adapters_with_the_disabled_adapter_as_reference(tmp_path: Path, tiny_model: Path,
                                                                          adapter: dict[str, Any]) -> None:
    config = dpo_config(adapter=adapter, n_epochs=2, n_evals=1, learning_rate=1e-2)
    _result, reporter = run_dpo(tmp_path, tiny_model, config, n=16, valid=8)
    final = reporter.steps[-1]
    assert final["full_valid_preference_accuracy"] > 0.5, final
    assert final["train_rewards_margin"] > 0 and final["train_loss"] < reporter.steps[0]["train_loss"]
    # Before the first step the adapter is disabled for the reference, so the first step's rewards are ~0.
    first = reporter.steps[0]
    assert abs(first["train_rewards_chosen"]) < 0.05 and abs(first["train_rewards_rejected"]) < 0.05, first


def test_reference_scores_and_evaluation_run_within_the_forward_budget_with_the_same_figures(
        tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reference pass and the validation pass put batch_size pairs through the model as forward passes within
    forward_tokens(False) tokens, as training does (a pair longer than that alone): the figures do not change."""
    import worker.training.dpo as dpo
    from app.schemas import training as training_schema

    sizes: list[int] = []
    real = dpo.collate

    def counting(indexes: list[int], *args: Any, **kwargs: Any) -> Any:
        sizes.append(len(indexes))
        return real(indexes, *args, **kwargs)

    monkeypatch.setattr(dpo, "collate", counting)
    finals = []
    for budget in (10**6, 1):
        monkeypatch.setattr(training_schema, "MAX_TOKENS_PER_FORWARD", budget)
        sizes.clear()
        _result, reporter = run_dpo(tmp_path / str(budget), tiny_model, dpo_config(n_evals=1, batch_size=4), n=8,
                                    valid=8)
        finals.append(reporter.steps[-1])
        assert (max(sizes) > 1) if budget > 1 else (set(sizes) == {1}), sizes
    whole, split = finals
    for key in ("full_valid_loss", "full_valid_preference_accuracy", "train_loss"):
        assert split[key] == pytest.approx(whole[key], rel=1e-4), key


def test_a_model_that_cannot_pack_pairs_runs_its_two_rows_a_pair_within_the_forward_budget(
        tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where attention cannot take the pair mask (a sliding window, ALiBi...), a pair runs as two rows of its prompt
    and an answer: passes are measured that way, so a pass of several pairs keeps within forward_tokens (the prompt
    counted once, as a packed row does, let such passes run up to twice the budget)."""
    import worker.training.dpo as dpo
    import worker.training.preference as preference
    from app.schemas import training as training_schema

    passes: list[tuple[int, int]] = []  # (pairs, tokens of the whole rows the model runs)
    real = dpo.collate

    def measuring(indexes: list[int], *args: Any, **kwargs: Any) -> Any:
        batch = real(indexes, *args, **kwargs)
        passes.append((len(indexes), batch["input_ids"].numel()))
        return batch

    monkeypatch.setattr(dpo, "collate", measuring)
    monkeypatch.setattr(preference, "packs_pairs", lambda model: False)
    records = pairs(16, seed=1)
    budget = 150  # a few pairs of the factory's (two rows of 20-40 tokens each)
    monkeypatch.setattr(training_schema, "MAX_TOKENS_PER_FORWARD", budget)
    _result, reporter = run_dpo(tmp_path, tiny_model, dpo_config(batch_size=8, n_evals=1), n=len(records), valid=8)
    several = [(n, tokens) for n, tokens in passes if n > 1]
    assert several and all(tokens <= budget for _, tokens in several), passes
    assert reporter.steps[-1]["full_valid_loss"] > 0


def test_load_best_at_end_breaks_a_preference_accuracy_tie_by_the_lower_loss(tmp_path: Path, tiny_model: Path) -> None:
    """Found by an audit: once every validation pair was ranked right, the first such evaluation stayed the best
    while valid_loss went on falling, and the event said valid_loss 0.0 (the score it tracks)."""
    config = dpo_config(n_epochs=3, n_evals=4, load_best_at_end=True, preference={"beta": 0.5, "rpo_alpha": 1.0})
    _result, reporter = run_dpo(tmp_path, tiny_model, config)
    evaluated = [s for s in reporter.steps if "valid_preference_accuracy" in s]
    top = max(s["valid_preference_accuracy"] for s in evaluated)
    tied = [s for s in evaluated if s["valid_preference_accuracy"] == top]
    assert len(tied) >= 2, evaluated  # the case: the accuracy saturates
    best = min(tied, key=lambda s: s["valid_loss"])
    (loaded,) = [e for e in reporter.events if e["message"].startswith("loaded the best checkpoint")]
    assert loaded["data"] == {"step": best["step"], "valid_preference_accuracy": top}


def test_a_models_own_dropout_is_off_in_dpo(tmp_path: Path, tiny_model: Path) -> None:
    """Found by a review: with the model's own dropout on (attention's here; GPT-2's residual dropout), the policy
    differed from its reference, scored in eval mode, before any update."""
    import math
    import shutil

    dropping = tmp_path / "model"
    shutil.copytree(tiny_model, dropping)
    config = json.loads((dropping / "config.json").read_text())
    (dropping / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.5}))
    _result, reporter = run_dpo(tmp_path / "dpo", dropping, dpo_config(adapter={"dropout": 0.0}), n=8, valid=0)
    assert reporter.steps[0]["train_loss"] == pytest.approx(math.log(2), abs=1e-6)
