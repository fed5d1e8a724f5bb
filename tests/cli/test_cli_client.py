from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from app.cli import app as cli
from app.cli_client import job_request, sse_frames


def test_flags_override_the_spec_file_and_fill_the_method_block() -> None:
    spec = {"model": "tiny-llama", "training_file": "file-a", "suffix": "spec",
            "method": {"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 4},
                                                            "adapter": {"type": "lora", "r": 4}}}}
    body = job_request(spec, model=None, training_file="file-b", validation_file=None, suffix="flag", seed=7,
                       n_epochs=2, batch_size=None, learning_rate=1e-3, adapter="dora")
    assert body["training_file"] == "file-b" and body["suffix"] == "flag" and body["seed"] == 7
    supervised = body["method"]["supervised"]
    assert supervised["hyperparameters"] == {"batch_size": 4, "n_epochs": 2, "learning_rate": 1e-3}
    assert supervised["adapter"] == {"type": "dora", "r": 4}
    assert spec["method"]["supervised"]["adapter"]["type"] == "lora"  # the loaded spec is not changed


def test_sse_frames_are_parsed_from_lines_and_comments_skipped() -> None:
    lines = ["id: ftevent-1", "event: event", 'data: {"a": 1}', "", ": keep-alive", "", "event: status",
             'data: {"status": "running"}', ""]
    frames = list(sse_frames(iter(lines)))
    assert frames == [{"id": "ftevent-1", "event": "event", "data": '{"a": 1}'},
                      {"event": "status", "data": '{"status": "running"}'}]
    assert json.loads(frames[1]["data"])["status"] == "running"


def test_create_without_model_or_file_says_what_to_give(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["jobs", "create", "--suffix", "x"], env={"TUNEFORGE_URL": "http://127.0.0.1:9"})
    assert result.exit_code == 2 and "--model and --training-file" in result.output


def test_unreachable_server_is_reported_without_a_traceback() -> None:
    result = CliRunner().invoke(cli, ["jobs", "list", "--url", "http://127.0.0.1:9"])
    assert result.exit_code == 1 and "cannot reach http://127.0.0.1:9" in result.output
