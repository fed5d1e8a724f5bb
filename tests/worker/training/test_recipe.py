from __future__ import annotations

import csv
import json
import math
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from app.schemas import training as training_schema
from tests.support.reporters import RecordingReporter
from tests.worker.training.factories import chat_records, code_mapping, make_config, write_jsonl
from worker.training import stopping
from worker.training.recipe import train
from worker.training.reporting import (
    TrainingCancelled,
    TrainingDiverged,
    TrainingPaused,
    TrainingReleased,
)


def run(tmp_path: Path, tiny_model: Path, records: list[dict], *, valid: list[dict] | None = None, **overrides):
    """Train on `records` with make_config(**overrides); returns (result, reporter)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    reporter = RecordingReporter()
    result = train(
        make_config(**overrides),
        model_path=tiny_model,
        train_file=write_jsonl(tmp_path / "train.jsonl", records),
        validation_file=write_jsonl(tmp_path / "valid.jsonl", valid) if valid else None,
        output_dir=tmp_path / "out",
        reporter=reporter,
    )
    return result, reporter


def _logits(model_dir: Path, adapter_dir: Path | None, tokenizer) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    ids = torch.tensor([tokenizer.encode("code for river0:")])
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lora_run_lowers_the_loss_and_changes_the_outputs(tmp_path: Path, tiny_model: Path, tokenizer) -> None:
    result, reporter = run(tmp_path, tiny_model, code_mapping(16), n_epochs=6)
    losses = reporter.losses()
    assert result.steps == result.total_steps == 24 == len(losses)
    # Measured: the last epoch's mean loss is about 0.65x the first's (7.0 -> 4.6).
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4
    final = result.final_dir
    assert {"adapter_config.json", "adapter_model.safetensors", "training_config.json", "tokenizer.json"} <= {
        p.name for p in final.iterdir()
    }
    assert json.loads((final / "training_config.json").read_text())["learning_rate"] == 1e-2
    base = _logits(tiny_model, None, tokenizer)
    tuned = _logits(tiny_model, final, tokenizer)
    assert (tuned - base).abs().max() > 0.1
    # Every step reported its metrics; trained_tokens counts real tokens of all epochs.
    step = reporter.steps[-1]
    assert {"train_loss", "train_mean_token_accuracy", "learning_rate", "tokens_per_second", "trained_tokens"} <= set(
        step
    )
    assert result.trained_tokens == step["trained_tokens"]
    with open(result.metrics_csv) as f:
        rows = list(csv.DictReader(f))
    assert [float(r["train_loss"]) for r in rows] == pytest.approx(losses)


def test_trained_tokens_counts_real_tokens_over_all_epochs(tmp_path: Path, tiny_model: Path, tokenizer) -> None:
    records = code_mapping(10)
    result, _ = run(tmp_path, tiny_model, records, n_epochs=2)
    per_epoch = sum(len(tokenizer.encode(r["prompt"] + r["completion"])) + 2 for r in records)
    assert abs(result.trained_tokens - 2 * per_epoch) <= 2 * len(records)  # BPE may merge at the boundary


def test_same_seed_gives_the_same_loss_curve(tmp_path: Path, tiny_model: Path) -> None:
    adapter = {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.1}
    _, first = run(tmp_path / "a", tiny_model, code_mapping(16), n_epochs=2, adapter=adapter)
    _, second = run(tmp_path / "b", tiny_model, code_mapping(16), n_epochs=2, adapter=adapter)
    _, other = run(tmp_path / "c", tiny_model, code_mapping(16), n_epochs=2, adapter=adapter, seed=8)
    assert first.losses() == second.losses()
    assert first.losses() != other.losses()


def test_gradient_accumulation_counts_optimizer_steps(tmp_path: Path, tiny_model: Path) -> None:
    # 18 examples, batch 4 -> 5 batches per epoch -> ceil(5 / 2) = 3 steps per epoch; the last step of an epoch
    # takes the one batch left. (The loss normalisation is test_accumulated_step_loss_is_the_token_mean_...)
    result, reporter = run(tmp_path, tiny_model, code_mapping(18), n_epochs=2, gradient_accumulation_steps=2)
    assert result.total_steps == result.steps == 6
    assert [s["step"] for s in reporter.steps] == [1, 2, 3, 4, 5, 6]
    assert [s["epoch"] for s in reporter.steps] == [0.4, 0.8, 1.0, 1.4, 1.8, 2.0]


def test_full_fine_tune_saves_a_loadable_model(tmp_path: Path, tiny_model: Path) -> None:
    from transformers import AutoModelForCausalLM

    result, reporter = run(
        tmp_path, tiny_model, chat_records(16), adapter={"type": "full"}, learning_rate=1e-3, n_epochs=2
    )
    losses = reporter.losses()
    assert losses[-1] < losses[0]
    model = AutoModelForCausalLM.from_pretrained(result.final_dir, use_safetensors=True)
    assert model.config.num_hidden_layers == 2


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_qlora_runs_on_cpu(tmp_path: Path, tiny_model: Path, quant_type: str) -> None:
    adapter = {"type": "qlora", "r": 8, "alpha": 16, "dropout": 0.0, "quantization": {"quant_type": quant_type}}
    result, reporter = run(tmp_path, tiny_model, code_mapping(16), n_epochs=3, adapter=adapter)
    losses = reporter.losses()
    assert result.steps == 12 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4
    assert (result.final_dir / "adapter_model.safetensors").is_file()


def test_dora_and_rslora_with_packing_and_checkpointing_run(tmp_path: Path, tiny_model: Path) -> None:
    adapter = {"type": "dora", "r": 4, "alpha": 8, "use_rslora": True}
    result, reporter = run(
        tmp_path, tiny_model, code_mapping(24), packing=True, gradient_checkpointing=True, max_seq_length=64,
        adapter=adapter,
    )  # fmt: skip
    assert result.steps == result.total_steps and all(math.isfinite(x) for x in reporter.losses())


def test_divergence_stops_at_the_first_non_finite_loss(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import worker.training.recipe as recipe

    calls = {"n": 0}
    real = recipe.token_loss

    def poisoned(model, batch):  # the third micro-batch (step 3) produces a NaN loss
        calls["n"] += 1
        loss, n, correct = real(model, batch)
        return (loss * float("nan") if calls["n"] == 3 else loss), n, correct

    monkeypatch.setattr(recipe, "token_loss", poisoned)
    with pytest.raises(TrainingDiverged, match=r"became nan at step 3; lower learning_rate \(now 0.01\)") as exc:
        run(tmp_path, tiny_model, code_mapping(16))
    assert isinstance(exc.value, ValueError)


def test_evaluation_metrics_are_reported(tmp_path: Path, tiny_model: Path) -> None:
    data = code_mapping(12)
    result, reporter = run(tmp_path, tiny_model, data, valid=data[:6], n_epochs=2, eval_steps=2)
    evaluated = [s for s in reporter.steps if "valid_loss" in s]
    assert [s["step"] for s in evaluated] == [2, 4, 6]
    for s in evaluated:
        assert s["valid_perplexity"] == pytest.approx(math.exp(s["valid_loss"]), rel=1e-4)
        assert 0.0 <= s["valid_mean_token_accuracy"] <= 1.0
    assert {"full_valid_loss", "full_valid_mean_token_accuracy"} <= set(result.final_metrics)
    assert evaluated[-1]["valid_loss"] < evaluated[0]["valid_loss"]


def test_evaluations_during_training_take_a_bounded_sample(tmp_path: Path, tiny_model: Path) -> None:
    # 24 examples x 1 epoch trained, 6 evaluations (one a step): 8% of their tokens over 6 is less than 16
    # examples' worth, so each takes the minimum 16.
    data = code_mapping(24)
    result, reporter = run(tmp_path, tiny_model, data, valid=code_mapping(40, seed=3), n_epochs=1, n_evals=10)
    said = [e for e in reporter.events if e["message"].startswith("evaluating ")]
    assert said and said[0]["data"] == {"evaluations": 6, "eval_examples": 16}  # 6 steps: one evaluation each
    assert "on 16 of 40 validation examples" in said[0]["message"]
    assert len([s for s in reporter.steps if "valid_loss" in s]) == 6


def test_early_stopping_triggers_when_validation_plateaus(tmp_path: Path, tiny_model: Path) -> None:
    # A tiny learning rate makes valid_loss move by far less than the threshold: a plateau.
    result, reporter = run(
        tmp_path, tiny_model, code_mapping(16), valid=code_mapping(4, seed=1), n_epochs=5, eval_steps=2,
        learning_rate=1e-6, early_stopping_patience=2, early_stopping_threshold=0.01,
    )  # fmt: skip
    assert result.steps == 6 < result.total_steps == 20
    stop = [e for e in reporter.events if e["message"].startswith("early stopping at step 6")]
    assert stop and "for 2 evaluation(s)" in stop[0]["message"]


def test_a_run_paused_at_its_early_stopping_step_ends_there_when_resumed(tmp_path: Path, tiny_model: Path) -> None:
    """Found by an audit: the resumed run forgot that it had stopped and trained on to the next plateau."""
    config = make_config(n_epochs=5, eval_steps=2, learning_rate=1e-6, early_stopping_patience=2,
                         early_stopping_threshold=0.01)
    data = {"model_path": tiny_model, "train_file": write_jsonl(tmp_path / "t.jsonl", code_mapping(16)),
            "validation_file": write_jsonl(tmp_path / "v.jsonl", code_mapping(4, seed=1))}
    whole = train(config, output_dir=tmp_path / "whole", reporter=RecordingReporter(), **data)
    assert whole.steps == 6 < whole.total_steps
    with pytest.raises(TrainingPaused) as paused:
        train(config, output_dir=tmp_path / "first", reporter=RecordingReporter(commands={6: "pause"}), **data)
    second = RecordingReporter()
    resumed = train(config, output_dir=tmp_path / "second", reporter=second, resume_from=paused.value.checkpoint,
                    **data)
    assert resumed.steps == 6 and not second.steps  # no step trained after the stop
    from safetensors.torch import load_file

    ends = [load_file(r.final_dir / "adapter_model.safetensors") for r in (whole, resumed)]
    assert all(torch.equal(ends[0][k], ends[1][k]) for k in ends[0])


def test_a_resumed_load_best_at_end_run_whose_best_checkpoint_is_gone_ends_on_its_last_step(
        tmp_path: Path, tiny_model: Path) -> None:
    """A job resumed across the upgrade whose best checkpoint the earlier retention pruned (the worker now keeps and
    fetches it: tests/faults): it finishes, saying so, where it failed on the missing folder."""
    import shutil

    config = make_config(n_epochs=3, eval_steps=2, learning_rate=0.05, load_best_at_end=True,
                         early_stopping_threshold=10.0)  # the first evaluation stays the best
    data = {"model_path": tiny_model, "train_file": write_jsonl(tmp_path / "t.jsonl", code_mapping(16)),
            "validation_file": write_jsonl(tmp_path / "v.jsonl", code_mapping(4, seed=1))}
    with pytest.raises(TrainingPaused) as paused:
        train(config, output_dir=tmp_path / "first", reporter=RecordingReporter(commands={7: "pause"}), **data)
    resume = tmp_path / "second" / "resume" / "step-7"  # a new attempt's folder: the latest checkpoint alone
    shutil.copytree(paused.value.checkpoint, resume)
    reporter = RecordingReporter()
    result = train(config, output_dir=tmp_path / "second" / "output", reporter=reporter, resume_from=resume, **data)
    assert result.weights_step == result.steps == result.total_steps
    assert any(e["message"] == f"the best checkpoint (step 2) is no longer stored; the final weights are the last "
               f"step's ({result.steps})" for e in reporter.events)


def test_load_best_at_end_uses_the_best_checkpoint(tmp_path: Path, tiny_model: Path) -> None:
    # Too high a learning rate: validation gets worse after the first evaluation.
    result, reporter = run(
        tmp_path, tiny_model, code_mapping(16), valid=code_mapping(4, seed=1), n_epochs=3, eval_steps=2,
        learning_rate=0.05, load_best_at_end=True,
    )  # fmt: skip
    valid = {s["step"]: s["valid_loss"] for s in reporter.steps if "valid_loss" in s}
    best = min(valid, key=valid.get)
    assert any(e["message"].startswith(f"loaded the best checkpoint (step {best},") for e in reporter.events)
    from safetensors.torch import load_file

    final = load_file(result.final_dir / "adapter_model.safetensors")
    saved = load_file(tmp_path / "out" / "checkpoints" / f"step-{best}" / "adapter_model.safetensors")
    assert all(torch.equal(final[k], saved[k]) for k in saved)


def test_cancel_and_pause_stop_at_the_requested_step(tmp_path: Path, tiny_model: Path) -> None:
    common = dict(model_path=tiny_model, train_file=write_jsonl(tmp_path / "t.jsonl", code_mapping(16)),
                  validation_file=None)  # fmt: skip
    reporter = RecordingReporter(commands={2: "cancel"})
    with pytest.raises(TrainingCancelled):
        train(make_config(), output_dir=tmp_path / "c", reporter=reporter, **common)
    assert len(reporter.steps) == 2
    reporter = RecordingReporter(commands={3: "pause"})
    with pytest.raises(TrainingPaused) as paused:
        train(make_config(), output_dir=tmp_path / "p", reporter=reporter, **common)
    assert paused.value.checkpoint == tmp_path / "p" / "checkpoints" / "step-3"
    assert reporter.checkpoints[-1]["step"] == 3


@pytest.fixture
def stop_handlers() -> Iterator[None]:
    """The training process's SIGTERM/SIGINT handlers, installed in this process for one test."""
    saved = {signum: signal.getsignal(signum) for signum in stopping.STOP_SIGNALS}
    stopping.install_handlers()
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
        stopping.clear()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_saves_a_checkpoint_after_the_current_step_and_releases(
    tmp_path: Path, tiny_model: Path, stop_handlers: None, signum: int
) -> None:
    class SignalledAtStep3(RecordingReporter):
        def metrics(self, data: dict) -> None:
            super().metrics(data)
            if data["step"] == 3:
                os.kill(os.getpid(), signum)

    reporter = SignalledAtStep3()
    with pytest.raises(TrainingReleased) as released:
        train(make_config(), model_path=tiny_model, train_file=write_jsonl(tmp_path / "t.jsonl", code_mapping(16)),
              validation_file=None, output_dir=tmp_path / "out", reporter=reporter)
    assert released.value.checkpoint == tmp_path / "out" / "checkpoints" / "step-3"
    assert [s["step"] for s in reporter.steps] == [1, 2, 3] and reporter.checkpoints[-1]["step"] == 3


def test_a_users_pause_wins_over_a_stop_signal(tmp_path: Path, tiny_model: Path, stop_handlers: None) -> None:
    stopping.request()
    with pytest.raises(TrainingPaused) as paused:
        train(make_config(), model_path=tiny_model, train_file=write_jsonl(tmp_path / "t.jsonl", code_mapping(16)),
              validation_file=None, output_dir=tmp_path / "out", reporter=RecordingReporter(commands={1: "pause"}))
    assert type(paused.value) is TrainingPaused


def test_accumulated_step_loss_is_the_token_mean_over_all_its_micro_batches(
    tmp_path: Path, tiny_model: Path, tokenizer
) -> None:
    from transformers import AutoModelForCausalLM

    from worker.training.data import collate, plan_epoch, tokenize_record
    from worker.training.evaluate import forward_logits, token_loss_sum

    # Examples of very different lengths, so a mean of per-micro-batch means would be visibly wrong.
    records = [{"prompt": "p", "completion": " alpha" * (1 + i)} for i in range(8)]
    config = make_config(batch_size=2, gradient_accumulation_steps=2)
    _, reporter = run(tmp_path, tiny_model, records, batch_size=2, gradient_accumulation_steps=2)
    # LoRA's B starts at zero and dropout is 0, so step 1's loss is the base model's loss on its batches.
    examples = [tokenize_record(r, tokenizer, train_on_inputs=False) for r in records]
    plan = plan_epoch([len(e.input_ids) for e in examples], batch_size=2, max_seq_length=64, packing=False,
                      seed=config.seed)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(tiny_model, use_safetensors=True)
    total, tokens, means = 0.0, 0, []
    with torch.no_grad():
        for batch_plan in plan[:2]:
            batch = collate(batch_plan, examples, pad_id=tokenizer.pad_token_id, packing=False)
            loss, n, _ = token_loss_sum(forward_logits(model, batch), batch["labels"])
            total, tokens = total + loss.item(), tokens + n
            means.append(loss.item() / n)
    assert reporter.losses()[0] == pytest.approx(total / tokens, rel=1e-5)
    assert abs(sum(means) / 2 - total / tokens) > 2e-4  # above the tolerance: the test tells them apart


def test_command_line_runs_a_job_with_json_lines(tmp_path: Path, tiny_model: Path, capsys) -> None:
    from worker.training.recipe import main

    (tmp_path / "cfg.json").write_text(make_config().model_dump_json())
    write_jsonl(tmp_path / "t.jsonl", code_mapping(8))
    main(["--config", str(tmp_path / "cfg.json"), "--model", str(tiny_model), "--train", str(tmp_path / "t.jsonl"),
          "--output", str(tmp_path / "out")])  # fmt: skip
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["step"] for line in lines if line["type"] == "metrics"] == [1, 2]
    assert lines[-1]["type"] == "result" and lines[-1]["steps"] == 2


def test_stale_attempt_from_the_reporter_propagates(tmp_path: Path, tiny_model: Path) -> None:
    from worker.training.reporting import StaleAttempt

    class LostLease(RecordingReporter):
        def metrics(self, data: dict) -> None:
            super().metrics(data)
            if data["step"] == 2:
                raise StaleAttempt("another worker owns this job now")

    reporter = LostLease()
    with pytest.raises(StaleAttempt):
        train(make_config(), model_path=tiny_model, train_file=write_jsonl(tmp_path / "t.jsonl", code_mapping(16)),
              validation_file=None, output_dir=tmp_path / "out", reporter=reporter)  # fmt: skip
    assert len(reporter.steps) == 2 and not reporter.checkpoints


def test_bf16_autocast_runs_on_cpu(tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Let the tiny model through on a CPU without bf16 instructions too (there it is only slow).
    monkeypatch.setattr("worker.training.model.cpu_bf16", lambda: "emulated")
    result, reporter = run(tmp_path, tiny_model, code_mapping(8), precision="bf16")
    assert result.steps == 2 and all(math.isfinite(x) for x in reporter.losses())
    assert "in bfloat16" in reporter.events[0]["message"]


def test_splitting_a_step_into_smaller_forwards_keeps_the_loss_curve(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import worker.training.recipe as recipe

    records = [{"prompt": "p", "completion": " alpha" * (1 + i)} for i in range(16)]
    result, whole = run(tmp_path / "whole", tiny_model, records, n_epochs=2)
    calls = {"n": 0}
    real = recipe.token_loss

    def counting(model, batch):  # counts forward passes
        calls["n"] += 1
        return real(model, batch)

    monkeypatch.setattr(recipe, "token_loss", counting)
    monkeypatch.setattr(training_schema, "MAX_TOKENS_PER_FORWARD", 24)  # about one or two rows per forward
    split_result, split = run(tmp_path / "split", tiny_model, records, n_epochs=2)
    assert calls["n"] > 2 * result.steps  # the 8 steps really ran as more forwards
    assert split_result.trained_tokens == result.trained_tokens
    assert split.losses() == pytest.approx(whole.losses(), rel=1e-4)


def record_releases_and_passes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Train with several forward passes a step, recording in order each release offered, each forward pass and
    each backward reaching a pass's loss."""
    import worker.training.recipe as recipe

    order: list[str] = []
    real_loss, real_release = recipe.token_loss, recipe.release_freed_memory

    def forward(model, batch):
        loss, count, correct = real_loss(model, batch)
        order.append("forward")
        loss.register_hook(lambda grad: order.append("backward"))
        return loss, count, correct

    def release(**kwargs: float) -> None:
        order.append("release")
        real_release(**kwargs)

    def load(*args: Any, **kwargs: Any) -> Any:
        model = real_load(*args, **kwargs)
        order.append("loaded")
        return model

    real_load = recipe.load_model
    monkeypatch.setattr(recipe, "load_model", load)
    monkeypatch.setattr(recipe, "token_loss", forward)
    monkeypatch.setattr(recipe, "release_freed_memory", release)
    monkeypatch.setattr(training_schema, "MAX_TOKENS_PER_FORWARD", 24)  # several forward passes per step
    monkeypatch.setattr(training_schema, "MAX_TOKENS_PER_CHECKPOINTED_FORWARD", 24)
    return order


RELEASE_RECORDS = [{"prompt": "p", "completion": " alpha" * (1 + i)} for i in range(16)]


@pytest.mark.parametrize("checkpointing", [True, False])
def test_a_release_of_freed_heap_is_offered_before_every_checkpointed_forward_pass_and_after_every_step(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch, checkpointing: bool
) -> None:
    # With gradient checkpointing glibc's heap grows forward pass after forward pass within a step unless released
    # between them; without, the passes are released only at the step's end (the faults a release costs outweighed
    # the heap's growth; docs/benchmarks.md, issue 18, stops 30 and 45). The order of releases and forward passes is
    # what this checks (when a release acts is test_host's).
    order = record_releases_and_passes(monkeypatch)
    result, _ = run(tmp_path, tiny_model, RELEASE_RECORDS, gradient_checkpointing=checkpointing)
    passes = [i for i, what in enumerate(order) if what == "forward"]
    assert len(passes) > 2 * result.steps
    released = [order[i - 1] == "release" for i in passes]
    assert "release" in order[order.index("loaded") : passes[0]], order  # what loading left, before the first step
    if checkpointing:
        assert all(released), order
    else:  # the first pass of each step after the first follows the step before's release, no other pass does
        assert sum(released[1:]) == result.steps - 1, order


@pytest.mark.parametrize("checkpointing", [True, False])
def test_a_checkpointed_forward_offers_a_release_before_its_backward(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch, checkpointing: bool
) -> None:
    """A checkpointed forward leaves everything but the layers' inputs freed, for the recomputation not to fit
    (docs/benchmarks.md, issue 18, stop 31); without checkpointing nothing is offered between the two."""
    order = record_releases_and_passes(monkeypatch)
    run(tmp_path, tiny_model, RELEASE_RECORDS, gradient_checkpointing=checkpointing)
    between = [order[i + 1 : order.index("backward", i)] for i, what in enumerate(order) if what == "forward"]
    assert len(between) > 2
    assert all(part == (["release"] if checkpointing else []) for part in between), order


def test_a_checkpointed_step_runs_passes_of_the_checkpointed_bound(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With gradient checkpointing a forward pass holds at most MAX_TOKENS_PER_CHECKPOINTED_FORWARD tokens (what it
    keeps for its backward grows with the pass: worker/training/checkpointing.py); without, MAX_TOKENS_PER_FORWARD."""
    import worker.training.recipe as recipe

    passes: list[tuple[int, int]] = []  # (rows, width) of each forward
    real = recipe.token_loss

    def counting(model, batch):
        passes.append(tuple(batch["input_ids"].shape))
        return real(model, batch)

    monkeypatch.setattr(recipe, "token_loss", counting)
    monkeypatch.setattr(training_schema, "MAX_TOKENS_PER_FORWARD", 10**6)
    monkeypatch.setattr(training_schema, "MAX_TOKENS_PER_CHECKPOINTED_FORWARD", 24)
    for checkpointing in (False, True):
        passes.clear()
        result, _ = run(tmp_path / str(checkpointing), tiny_model, RELEASE_RECORDS,
                        gradient_checkpointing=checkpointing)
        if checkpointing:
            assert len(passes) > 2 * result.steps
            assert all(rows == 1 or rows * width <= 24 for rows, width in passes), passes
        else:
            assert len(passes) == result.steps


def test_the_run_drops_the_tokenizer_once_the_data_is_tokenised_and_saves_it_with_the_adapter(
        tmp_path: Path, tiny_model: Path, tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    import weakref

    from transformers import AutoTokenizer

    loaded: list[weakref.ref] = []
    load = AutoTokenizer.from_pretrained

    def recorded(*args, **kwargs):
        loaded.append(weakref.ref(found := load(*args, **kwargs)))
        return found

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", recorded)
    alive_at_first_step: list[bool] = []

    class Watching(RecordingReporter):
        def metrics(self, data: dict) -> None:
            super().metrics(data)
            alive_at_first_step.append(any(ref() is not None for ref in loaded))

    result = train(make_config(), model_path=tiny_model, train_file=write_jsonl(tmp_path / "t.jsonl", code_mapping(4)),
                   validation_file=None, output_dir=tmp_path / "out", reporter=Watching())
    assert len(loaded) == 1 and alive_at_first_step and not any(alive_at_first_step)
    monkeypatch.undo()
    saved = AutoTokenizer.from_pretrained(result.final_dir)
    text = "code for river0: 3 7"
    assert saved.encode(text) == tokenizer.encode(text) and len(saved) == len(tokenizer)
    assert saved.pad_token_id == tokenizer.pad_token_id and saved.chat_template == tokenizer.chat_template
