"""Fine-tuned weights for tests that need some without training: LoRA adapters and full fine-tunes that change
the tiny model's answers, stored as a job's archive is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from app.core.storage import Storage
from worker.archive import file_chunks, tar_directory


def store_adapter(tiny: Path, storage: Storage, tmp: Path, *, seed: int, key: str | None = None, r: int = 4,
                  targets: tuple[str, ...] = ("q_proj", "v_proj")) -> str:
    """A LoRA adapter (r=4 on q/v unless told) with random B matrices, written to tmp/adapter-<seed> and stored as a
    tar under `key` (default artifacts/job-<seed>/adapter); returns the key."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny),
                           LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets)))
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.5
    folder = tmp / f"adapter-{seed}"
    model.save_pretrained(folder)
    stored = storage.write(key or f"artifacts/job-{seed}/adapter",
                           file_chunks(tar_directory(folder, tmp / f"adapter-{seed}.tar")))
    return stored.key


def perturbed_model(tiny: Path, *, seed: int) -> Any:
    """The tiny model with every weight moved a little (a stand-in for a full fine-tune)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return model.eval()


def store_full_weights(model: Any, storage: Storage, tmp: Path, *, key: str) -> str:
    """A full fine-tune's weights as a job's checkpoint or `model` archive holds them; returns the key."""
    from worker.training.checkpoint import save_weights

    folder = tmp / f"full-{key.replace('/', '-')}"
    folder.mkdir()
    save_weights(model, folder, full=True)
    return storage.write(key, file_chunks(tar_directory(folder, tmp / f"{folder.name}.tar"))).key
