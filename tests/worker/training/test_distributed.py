"""Two gloo processes on the CPU train like one: same global batch, same loss curve, same adapter.

Each multi-process run is a real torchrun launch (tests/worker/training/distributed_run.py); the one-process
reference runs in this process.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.support.reporters import RecordingReporter
from tests.worker.training.factories import code_mapping, make_config, preference_records, write_jsonl
from worker.training.recipe import train

pytestmark = pytest.mark.slow
SETTINGS: dict[str, Any] = {"n_epochs": 2, "batch_size": 4, "gradient_accumulation_steps": 2, "eval_steps": 4,
                            "save_steps": 2, "n_checkpoints": 10}  # fmt: skip


def _torchrun(tmp_path: Path, tiny_model: Path, config: Any, output: Path, *extra: str) -> dict[str, Any]:
    config_file = tmp_path / f"{output.name}.json"
    config_file.write_text(config.model_dump_json())
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "tests.worker.training.distributed_run", "--config", str(config_file), "--model", str(tiny_model),
               "--train", str(tmp_path / "t.jsonl"), "--validation", str(tmp_path / "v.jsonl"),
               "--output", str(output), *extra]  # fmt: skip
    # A session of its own, so that a hung launch is killed with its ranks, not just torchrun.
    launch = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True, env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    try:
        printed, _ = launch.communicate(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launch.pid, signal.SIGKILL)
    assert launch.returncode == 0, printed[-5000:]
    return dict(json.loads((output / "report.json").read_text()))


@pytest.fixture
def one_process(tmp_path: Path, tiny_model: Path) -> dict[str, Any]:
    """The reference: the same run in a single process."""
    write_jsonl(tmp_path / "t.jsonl", code_mapping(24))
    write_jsonl(tmp_path / "v.jsonl", code_mapping(6, seed=1))
    reporter = RecordingReporter()
    train(make_config(**SETTINGS), model_path=tiny_model, train_file=tmp_path / "t.jsonl",
          validation_file=tmp_path / "v.jsonl", output_dir=tmp_path / "one", reporter=reporter)  # fmt: skip
    return {"steps": reporter.steps, "final": tmp_path / "one" / "final"}


def _curve(steps: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    return [(s["step"], s[key]) for s in steps if key in s]


def _assert_same_curve(ours: list[dict[str, Any]], reference: list[dict[str, Any]]) -> None:
    for key in ("train_loss", "valid_loss", "full_valid_loss"):
        mine, theirs = _curve(ours, key), _curve(reference, key)
        assert [s for s, _ in mine] == [s for s, _ in theirs], key
        assert [v for _, v in mine] == pytest.approx([v for _, v in theirs], rel=1e-4), key
    assert [s["trained_tokens"] for s in ours] == [s["trained_tokens"] for s in reference]


# Two processes score half the positions each, so the output layer's products (a block of its vocabulary at a time,
# worker/training/fused_head.py) run on other shapes and round differently: 1.1e-5 apart once after 10 steps. A
# gradient that skipped the all-reduce would be off by a whole process's share.
def _assert_same_adapter(ours: Path, reference: Path, *, atol: float = 3e-5) -> None:
    mine = load_file(str(ours / "adapter_model.safetensors"))
    theirs = load_file(str(reference / "adapter_model.safetensors"))
    assert sorted(mine) == sorted(theirs)
    worst = max(float((mine[k] - theirs[k]).abs().max()) for k in mine)
    assert all(torch.allclose(mine[k], theirs[k], atol=atol) for k in mine), worst


def test_two_ddp_processes_follow_the_one_process_loss_curve(
    tmp_path: Path, tiny_model: Path, one_process: dict[str, Any]
) -> None:
    report = _torchrun(tmp_path, tiny_model, make_config(**SETTINGS, processes=2), tmp_path / "ddp")
    assert report["events"][0]["message"].startswith("training lora on 2 cpu processes (ddp)")
    _assert_same_curve(report["steps"], one_process["steps"])
    _assert_same_adapter(tmp_path / "ddp" / "final", one_process["final"])
    assert not (tmp_path / "ddp" / "metrics.rank1.csv").exists() and (tmp_path / "ddp" / "metrics.csv").is_file()


def test_two_fsdp_processes_pause_and_resume_on_the_one_process_curve(
    tmp_path: Path, tiny_model: Path, one_process: dict[str, Any]
) -> None:
    config = make_config(**SETTINGS, processes=2, distributed="fsdp")
    first = _torchrun(tmp_path, tiny_model, config, tmp_path / "fsdp", "--pause-at", "5")
    assert first["paused"] and [s["step"] for s in first["steps"]] == [1, 2, 3, 4, 5]
    checkpoint = Path(first["paused"])
    # Rank 0 wrote the gathered (unsharded) adapter and rank 1's RNG state beside its own.
    assert (checkpoint / "adapter_model.safetensors").is_file() and (checkpoint / "rng_state_ranks.pt").is_file()
    second = _torchrun(tmp_path, tiny_model, config, tmp_path / "fsdp-resumed", "--resume", str(checkpoint))
    assert "resumed from checkpoint at step 5" in [e["message"] for e in second["events"][:3]]
    _assert_same_curve(first["steps"] + second["steps"], one_process["steps"])
    # FSDP's sharded output layer takes the full logits through autograd; one process makes the frozen output layer's
    # gradient in its forward (fused_head): the same gradients, rounded in another order (1.6e-5 apart once here).
    _assert_same_adapter(tmp_path / "fsdp-resumed" / "final", one_process["final"], atol=5e-5)


def test_sigterm_to_any_rank_checkpoints_and_releases_the_whole_run(
    tmp_path: Path, tiny_model: Path, one_process: dict[str, Any]
) -> None:
    config = make_config(**SETTINGS, processes=2)
    first = _torchrun(tmp_path, tiny_model, config, tmp_path / "ddp", "--sigterm-rank", "1", "--sigterm-at", "3")
    assert first["released"] and [s["step"] for s in first["steps"]] == [1, 2, 3]
    second = _torchrun(tmp_path, tiny_model, config, tmp_path / "ddp-resumed", "--resume", first["paused"])
    _assert_same_curve(first["steps"] + second["steps"], one_process["steps"])
    _assert_same_adapter(tmp_path / "ddp-resumed" / "final", one_process["final"])


def test_a_process_count_that_differs_from_the_launch_is_refused(tmp_path: Path, tiny_model: Path) -> None:
    with pytest.raises(ValueError, match=r"asks for 2 training process\(es\) but this run has 1; start it with "
                                         r"torchrun --nproc-per-node 2"):
        train(make_config(processes=2), model_path=tiny_model, train_file=write_jsonl(tmp_path / "t.jsonl",
              code_mapping(4)), validation_file=None, output_dir=tmp_path / "out", reporter=RecordingReporter())


def test_two_ddp_processes_train_dpo_on_the_one_process_curve(tmp_path: Path, tiny_model: Path) -> None:
    write_jsonl(tmp_path / "t.jsonl", preference_records(16, seed=1))
    write_jsonl(tmp_path / "v.jsonl", preference_records(6, seed=2))
    settings = {**SETTINGS, "method": "dpo", "preference": {"beta": 0.5}, "learning_rate": 5e-3}
    reporter = RecordingReporter()
    train(make_config(**settings), model_path=tiny_model, train_file=tmp_path / "t.jsonl",
          validation_file=tmp_path / "v.jsonl", output_dir=tmp_path / "one", reporter=reporter)  # fmt: skip
    report = _torchrun(tmp_path, tiny_model, make_config(**settings, processes=2), tmp_path / "ddp")
    _assert_same_curve(report["steps"], reporter.steps)
    for key in ("train_preference_accuracy", "valid_preference_accuracy", "full_valid_rewards_margin"):
        ours, theirs = _curve(report["steps"], key), _curve(reporter.steps, key)
        assert [s for s, _ in ours] == [s for s, _ in theirs] and theirs, key
        assert [v for _, v in ours] == pytest.approx([v for _, v in theirs], rel=1e-4, abs=1e-6), key
    # Each process pads only its own half of a batch's pairs: float noise, which Adam carries on (4e-5 measured).
    _assert_same_adapter(tmp_path / "ddp" / "final", tmp_path / "one" / "final", atol=2e-4)
