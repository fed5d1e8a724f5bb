"""Fine-tuned weights for tests that need some without training: LoRA adapters that change the tiny model's
answers, stored as a job's archive is."""

from __future__ import annotations

from pathlib import Path

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
