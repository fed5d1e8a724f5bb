"""What a user takes home: adapters and merged weights that load and agree, resumable downloads."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.integration.conftest import Service, wait_for_status
from tests.support.data import chat_lines, jsonl
from tests.support.service import TERMINAL

pytestmark = pytest.mark.integration


def _extract(content: bytes, target: Path) -> Path:
    with tarfile.open(fileobj=io.BytesIO(content)) as tar:
        tar.extractall(target, filter="data")
    return target


@pytest.mark.parametrize("adapter_type", ["lora", "qlora"])
def test_merged_weights_give_the_logits_of_base_plus_adapter(service: Service, tiny_model_dir: Path,
                                                             tmp_path: Path, adapter_type: str) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with service.client() as client:
        file_id = client.post("/v1/files", files={"file": ("t.jsonl", jsonl(chat_lines(12)))},
                              data={"purpose": "fine-tune"}).json()["id"]
        job = client.post("/v1/fine_tuning/jobs", json={
            "model": "tiny-llama", "training_file": file_id, "merge": True,
            "method": {"type": "supervised", "supervised": {
                "hyperparameters": {"n_epochs": 2, "batch_size": 4, "learning_rate": 5e-3},
                "adapter": {"type": adapter_type, "r": 8, "alpha": 16, "dropout": 0.0}}}}).json()
        final = wait_for_status(client, job["id"], TERMINAL)
        assert final["status"] == "succeeded", final
        artifacts = {a["name"]: a for a in client.get(f"/v1/fine_tuning/jobs/{job['id']}/artifacts").json()["data"]}
        assert artifacts["merged"]["kind"] == "merged"
        adapter = _extract(client.get(f"/v1/fine_tuning/jobs/{job['id']}/artifacts/adapter").content,
                           tmp_path / "adapter")
        merged_bytes = client.get(f"/v1/fine_tuning/jobs/{job['id']}/artifacts/merged").content
        assert hashlib.sha256(merged_bytes).hexdigest() == artifacts["merged"]["sha256"]
        merged = _extract(merged_bytes, tmp_path / "merged")

    info = json.loads((merged / "merge_info.json").read_text())
    assert info["adapter_type"] == adapter_type
    assert info["merged_onto"] == ("unquantized base weights" if adapter_type == "qlora" else "base weights")
    tokenizer = AutoTokenizer.from_pretrained(merged)
    inputs = tokenizer.apply_chat_template(chat_lines(1)[0]["messages"][:2], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        merged_model = AutoModelForCausalLM.from_pretrained(merged)
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter)
        base_logits = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(**inputs).logits
        merged_logits, peft_logits = merged_model(**inputs).logits, peft_model(**inputs).logits
        assert torch.allclose(merged_logits, peft_logits, atol=1e-4)
        assert (merged_logits - base_logits).abs().max().item() > 1e-3
        generate = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
        assert torch.equal(merged_model.generate(**inputs, **generate), peft_model.generate(**inputs, **generate))


def test_interrupted_adapter_download_resumes_with_a_range_request(service: Service) -> None:
    with service.client() as client:
        jobs = client.get("/v1/fine_tuning/jobs", params={"limit": 100}).json()["data"]
        job = next(j for j in jobs if j["status"] == "succeeded")
        url = f"/v1/fine_tuning/jobs/{job['id']}/artifacts/adapter"
        whole = client.get(url)
        size = int(whole.headers["content-length"])
        with client.stream("GET", url) as response:  # the connection drops after the first chunk
            first = next(response.iter_bytes(4096))
        rest = client.get(url, headers={"Range": f"bytes={len(first)}-"})
        assert rest.status_code == 206 and rest.headers["content-range"] == f"bytes {len(first)}-{size - 1}/{size}"
        resumed = first + rest.content
        assert resumed == whole.content
        assert hashlib.sha256(resumed).hexdigest() == whole.headers["x-content-sha256"]


def test_continued_training_starts_from_the_parent_adapter(service: Service) -> None:
    def first_loss(client, job_id: str) -> float:  # type: ignore[no-untyped-def]
        events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()["data"]
        return min((e["data"] for e in events if e["type"] == "metrics"), key=lambda d: d["step"])["train_loss"]

    with service.client() as client:
        file_id = client.post("/v1/files", files={"file": ("t.jsonl", jsonl(chat_lines(12)))},
                              data={"purpose": "fine-tune"}).json()["id"]
        spec = {"training_file": file_id, "seed": 9, "method": {"type": "supervised", "supervised": {
            "hyperparameters": {"n_epochs": 3, "batch_size": 4, "learning_rate": 5e-3},
            "adapter": {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0}}}}
        parent = client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", **spec}).json()
        parent = wait_for_status(client, parent["id"], TERMINAL)
        assert parent["status"] == "succeeded", parent
        child = client.post("/v1/fine_tuning/jobs", json={"model": parent["fine_tuned_model"], **spec}).json()
        child = wait_for_status(client, child["id"], TERMINAL)
        assert child["status"] == "succeeded", child
        assert child["model"] == parent["fine_tuned_model"]
        assert child["fine_tuned_model"].startswith("ft:tiny-llama:")  # named after the catalogue base
        # The child starts where the parent ended, well below the parent's first loss.
        assert first_loss(client, child["id"]) < 0.8 * first_loss(client, parent["id"])
        messages = [e["message"] for e in client.get(f"/v1/fine_tuning/jobs/{child['id']}/events",
                                                     params={"limit": 100}).json()["data"]]
        assert f"Continuing training from {parent['fine_tuned_model']}." in messages


def test_the_readmes_curl_download_saves_the_adapter_under_its_tar_name(service: Service, tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    command = next(line.split("#")[0].split() for line in readme.splitlines()
                   if line.startswith("curl") and "artifacts/adapter" in line)
    with service.client() as client:
        jobs = client.get("/v1/fine_tuning/jobs", params={"limit": 100}).json()["data"]
        job = next(j for j in jobs if j["status"] == "succeeded" and j["method"]["supervised"]["adapter"]["type"]
                   != "full")
    host = service.base_url.removeprefix("http://")
    url = command[-1].replace("localhost:8000", host).replace("ftjob-...", job["id"])
    subprocess.run([*command[:-1], "-H", f"Authorization: Bearer {service.api_key}", url], cwd=tmp_path, check=True)
    assert [p.name for p in tmp_path.iterdir()] == [f"{job['id']}-adapter.tar"]
