"""Export folders: the adapter names its base where users get it, and the vLLM notes say what vLLM would refuse."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from app.core.storage import LocalStorage
from tests.support.adapters import store_adapter
from worker.export import export_peft, vllm_refusals, write_manifest

HUB_BASE = {"id": "qwen-small", "source": "hf:Qwen/Qwen2.5-0.5B-Instruct", "commit_sha": "a" * 40}


def test_a_peft_export_names_the_hub_base_at_its_commit(tmp_path: Path, tiny_model_dir: Path) -> None:
    store_adapter(tiny_model_dir, LocalStorage(tmp_path / "s"), tmp_path, seed=1)
    config = export_peft(tmp_path / "adapter-1", tmp_path / "out", base=HUB_BASE, tokenizer_from=tiny_model_dir)
    assert config["base_model_name_or_path"] == "Qwen/Qwen2.5-0.5B-Instruct" and config["revision"] == "a" * 40
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text()) == config
    assert (tmp_path / "out" / "tokenizer_config.json").is_file()  # the base's tokenizer travels with it
    from safetensors.torch import load_file

    exported = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    original = load_file(str(tmp_path / "adapter-1" / "adapter_model.safetensors"))
    assert exported.keys() == original.keys() and all(torch.equal(exported[k], original[k]) for k in exported)


def test_vllm_notes_name_what_vllm_refuses_and_the_rank_flag(tmp_path: Path) -> None:
    assert vllm_refusals({"r": 8, "use_dora": False, "bias": "none"}) == []
    assert "merged" in vllm_refusals({"use_dora": True})[0]
    # vLLM 0.34.0 refuses adapter biases (there is no --enable-lora-bias any more) and ranks above 512.
    assert "merged" in vllm_refusals({"r": 8, "bias": "lora_only"})[0]
    assert "up to 512" in vllm_refusals({"r": 1024})[0]
    # --max-lora-rank takes one of vLLM's choices: the smallest at least the adapter's rank (24 -> 32).
    odd = write_manifest(tmp_path, model="ft:m", job_id="ftjob-1", fmt="peft", base=HUB_BASE,
                         adapter_config={"r": 24})
    assert odd["vllm"]["loads"] and "--max-lora-rank 32 " in odd["vllm"]["command"]
    manifest = write_manifest(tmp_path, model="ft:m", job_id="ftjob-1", fmt="peft", base=HUB_BASE,
                              adapter_config={"r": 64, "use_dora": True})
    assert manifest["vllm"]["loads"] is False and "--max-lora-rank 64" in manifest["vllm"]["command"]
    assert manifest["vllm"]["command"].startswith(f"vllm serve Qwen/Qwen2.5-0.5B-Instruct --revision {'a' * 40}")
    small = write_manifest(tmp_path, model="ft:m", job_id="ftjob-1", fmt="peft", base=HUB_BASE,
                           adapter_config={"r": 8})
    assert small["vllm"]["loads"] and "--max-lora-rank" not in small["vllm"]["command"]
