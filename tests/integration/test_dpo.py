"""SFT then DPO as two jobs through the real API and worker: the DPO job continues from the SFT model (its
reference), learns the preference, and its metrics reach events, checkpoints and the result files."""

from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import Service, all_events, wait_for_status
from tests.support.data import jsonl
from tests.support.service import TERMINAL

pytestmark = pytest.mark.integration
WORDS = ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "apple"]


def pairs(n: int, *, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(3))
        rows.append({"input": {"messages": [{"role": "user", "content": f"say {words}"}]},
                     "preferred_output": [{"role": "assistant", "content": f"ok {words}"}],
                     "non_preferred_output": [{"role": "assistant", "content": f"no {words}"}]})
    return rows


def upload(client: Any, rows: list[dict[str, Any]]) -> str:
    answer = client.post("/v1/files", files={"file": ("d.jsonl", jsonl(rows))}, data={"purpose": "fine-tune"})
    assert answer.status_code == 200, answer.text
    return str(answer.json()["id"])


def test_sft_then_dpo_as_two_jobs(service: Service, tmp_path: Path, tiny_model_dir: Path) -> None:
    with service.client() as client:
        # SFT on both kinds of answer: the model learns the task, not yet which start is preferred.
        sft_rows = [{"messages": [*p["input"]["messages"], *p[key]]} for p in pairs(16, seed=1)
                    for key in ("preferred_output", "non_preferred_output")]
        sft = client.post("/v1/fine_tuning/jobs", json={
            "model": "tiny-llama", "training_file": upload(client, sft_rows),
            "hyperparameters": {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 10}}).json()
        sft = wait_for_status(client, sft["id"], TERMINAL)
        assert sft["status"] == "succeeded", sft
        # A DPO file is refused for a supervised job, and the other way round.
        preference_file = upload(client, pairs(32, seed=2))
        wrong = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": preference_file})
        assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "training_file", wrong.text
        dpo_job = client.post("/v1/fine_tuning/jobs", json={
            "model": sft["fine_tuned_model"], "training_file": preference_file,
            "validation_file": upload(client, pairs(16, seed=3)),
            "method": {"type": "dpo", "dpo": {"hyperparameters": {
                "n_epochs": 3, "batch_size": 4, "beta": 0.5, "learning_rate": 5e-3, "rpo_alpha": 1.0,
                "n_evals": 3}}}})
        assert dpo_job.status_code == 200, dpo_job.text
        assert dpo_job.json()["method"]["type"] == "dpo"
        final = wait_for_status(client, dpo_job.json()["id"], TERMINAL)
        assert final["status"] == "succeeded", final
        events = all_events(client, final["id"])
        messages = [e["message"] for e in events]
        assert any(m.startswith(f"Continuing training from {sft['fine_tuned_model']}") for m in messages), messages
        assert sum("reference log-probabilities" in m for m in messages) == 1, messages
        metrics = [e["data"] for e in events if e["type"] == "metrics"]
        assert all("train_preference_accuracy" in m and "train_rewards_margin" in m for m in metrics)
        last = max(metrics, key=lambda m: m["step"])
        assert last["full_valid_preference_accuracy"] >= 0.9, last
        checkpoints = client.get(f"/v1/fine_tuning/jobs/{final['id']}/checkpoints").json()["data"]
        assert any("valid_preference_accuracy" in c["metrics"] for c in checkpoints), checkpoints
        config = client.get(f"/v1/fine_tuning/jobs/{final['id']}/artifacts/config").json()
        assert config["method"] == "dpo" and config["preference"]["beta"] == 0.5
        adapter = client.get(f"/v1/fine_tuning/jobs/{final['id']}/artifacts/adapter").content
    # The tuned model's greedy answers start the preferred way.
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path / "adapter"
    with tarfile.open(fileobj=io.BytesIO(adapter)) as tar:
        tar.extractall(folder, filter="data")
    adapter_dir = next(p.parent for p in folder.rglob("adapter_config.json"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_dir)
    for row in pairs(6, seed=4):
        prompt = tokenizer.apply_chat_template(row["input"]["messages"], add_generation_prompt=True, tokenize=False)
        ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
        out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert tokenizer.decode(out[0, ids.size(1):], skip_special_tokens=True).startswith("ok")
