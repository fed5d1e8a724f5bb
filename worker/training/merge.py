"""Merged full weights: the base model with a trained adapter folded in, as safetensors shards.

QLoRA trains against 4-bit weights, but merging into 4-bit weights would round the update away, so
the adapter is always merged onto the unquantized base (in fp32 on CPU, bf16 on GPU) and the
artifact's merge_info.json says so.
"""

from __future__ import annotations

import json
from pathlib import Path

from app.schemas.training import TrainingConfig


def merge_adapter(config: TrainingConfig, *, model_path: Path, adapter_dir: Path, output_dir: Path,
                  max_shard_size: str = "2GB") -> Path:
    """Write base + adapter as a plain transformers model directory; returns output_dir."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, use_safetensors=True,
                                                trust_remote_code=False, local_files_only=True)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(output_dir, safe_serialization=True, max_shard_size=max_shard_size)
    AutoTokenizer.from_pretrained(adapter_dir if (adapter_dir / "tokenizer.json").exists() else model_path
                                  ).save_pretrained(output_dir)
    info = {
        "adapter_type": config.adapter.type,
        "merged_onto": "unquantized base weights" if config.adapter.type == "qlora" else "base weights",
        "dtype": str(dtype).removeprefix("torch."),
        "note": "QLoRA trained against 4-bit NF4/FP4 weights; outputs of this merge differ slightly from the "
                "quantized model used in training." if config.adapter.type == "qlora" else "",
    }
    (output_dir / "merge_info.json").write_text(json.dumps(info, indent=2))
    return output_dir
