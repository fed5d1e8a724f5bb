"""Upload -> create -> train in a real worker -> download the adapter -> load it with peft."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from tests.integration.conftest import Service, all_events, wait_for_status
from tests.support.data import chat_lines, jsonl
from tests.support.service import TERMINAL

pytestmark = pytest.mark.integration


def _metrics(client, job_id: str) -> list[dict]:  # type: ignore[no-untyped-def]
    return sorted((e["data"] for e in all_events(client, job_id) if e["type"] == "metrics"), key=lambda d: d["step"])


def test_chat_job_trains_in_a_worker_and_its_adapter_changes_the_model(service: Service, tiny_model_dir: Path,
                                                                       tmp_path: Path) -> None:
    import openai
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sdk = openai.OpenAI(base_url=f"{service.base_url}/v1", api_key=service.api_key, max_retries=0)
    uploaded = sdk.files.create(file=("train.jsonl", jsonl(chat_lines(24))), purpose="fine-tune")
    assert uploaded.status == "processed"
    job = sdk.fine_tuning.jobs.create(
        model="tiny-llama", training_file=uploaded.id, suffix="colours", seed=3,
        # Our extensions (learning_rate, the adapter block) ride inside OpenAI's `method` object.
        method={"type": "supervised", "supervised": {  # type: ignore[typeddict-unknown-key]
            "hyperparameters": {"n_epochs": 3, "batch_size": 4, "learning_rate": 2e-3},
            "adapter": {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0,
                        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}}},
    )
    with service.client() as client:
        final = wait_for_status(client, job.id, TERMINAL)
        assert final["status"] == "succeeded", final
        short = job.id.removeprefix("ftjob-")[-8:]
        assert final["fine_tuned_model"] == f"ft:tiny-llama:integration:colours:{short}"
        assert final["trained_tokens"] > 0 and final["finished_at"] >= final["created_at"]
        assert final["progress"]["step"] == final["progress"]["total_steps"] == 18

        metrics = _metrics(client, job.id)
        assert [m["step"] for m in metrics] == list(range(1, 19))
        assert {"train_loss", "learning_rate", "tokens_per_second"} <= set(metrics[0])
        assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]

        checkpoints = client.get(f"/v1/fine_tuning/jobs/{job.id}/checkpoints").json()["data"]
        assert checkpoints and checkpoints[0]["step_number"] == 18
        assert checkpoints[0]["fine_tuned_model_checkpoint"] == f"{final['fine_tuned_model']}:ckpt-step-18"
        assert "train_loss" in checkpoints[0]["metrics"]

        artifacts = {a["name"]: a for a in client.get(f"/v1/fine_tuning/jobs/{job.id}/artifacts").json()["data"]}
        assert {"adapter", "metrics", "config"} <= set(artifacts)
        download = client.get(f"/v1/fine_tuning/jobs/{job.id}/artifacts/adapter")
        assert download.status_code == 200
        assert int(download.headers["content-length"]) == len(download.content) == artifacts["adapter"]["bytes"]
        assert hashlib.sha256(download.content).hexdigest() == download.headers["x-content-sha256"]
    # The same bytes reach a plain OpenAI client through result_files.
    assert artifacts["adapter"]["file_id"] in final["result_files"]
    assert sdk.files.content(artifacts["adapter"]["file_id"]).content == download.content

    adapter_dir = tmp_path / "adapter"
    with tarfile.open(fileobj=io.BytesIO(download.content)) as tar:
        tar.extractall(adapter_dir, filter="data")
    assert {"adapter_config.json", "adapter_model.safetensors", "training_config.json"} <= \
        {p.name for p in adapter_dir.iterdir()}
    assert json.loads((adapter_dir / "training_config.json").read_text())["learning_rate"] == 2e-3

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    inputs = tokenizer.apply_chat_template(chat_lines(1)[0]["messages"][:2], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        before = base(**inputs).logits
        tuned = PeftModel.from_pretrained(base, adapter_dir)
        after = tuned(**inputs).logits
    assert (after - before).abs().max().item() > 1e-3


def test_prompt_completion_job_succeeds(service: Service) -> None:
    rows = [{"prompt": f"Colour of code {i}?", "completion": ["red", "blue", "green"][i % 3]} for i in range(12)]
    with service.client() as client:
        file_id = client.post("/v1/files", files={"file": ("pc.jsonl", jsonl(rows))},
                              data={"purpose": "fine-tune"}).json()["id"]
        job = client.post("/v1/fine_tuning/jobs", json={
            "model": "tiny-llama", "training_file": file_id,
            "hyperparameters": {"n_epochs": 2, "batch_size": 4}}).json()
        final = wait_for_status(client, job["id"], TERMINAL)
        assert final["status"] == "succeeded", final
        metrics = _metrics(client, job["id"])
        assert len(metrics) == 6 and all(m["train_loss"] > 0 for m in metrics)
        statuses = [e["message"] for e in client.get(f"/v1/fine_tuning/jobs/{job['id']}/events",
                                                     params={"limit": 100}).json()["data"]]
        assert any(m.startswith("Files validated") for m in statuses)
        assert any(m.startswith("Attempt 1 started") for m in statuses)
