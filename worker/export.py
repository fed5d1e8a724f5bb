"""A fine-tuned model as a folder other engines load as it is (`tuneforge models export`).

- `peft`: the adapter (adapter_config.json + adapter_model.safetensors + the tokenizer), with
  `base_model_name_or_path` naming the base where the user can get it (the hub repository and, as `revision`,
  the commit it was trained on; or the local folder), so `PeftModel.from_pretrained`/`AutoPeftModelForCausalLM`
  and vLLM's `--lora-modules name=folder` load it without edits.
- `merged`: a plain transformers model folder (config, safetensors, tokenizer): the adapter folded into the
  unquantized base weights (worker/training/merge.py), or a full fine-tune's weights with the base's config
  and tokenizer. vLLM serves it as `--model folder`.

Plain Python with lazy torch imports; the CLI downloads the archive and calls these.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from app.schemas.training import TrainingConfig

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# What a model folder needs besides its weights (config, tokenizer, generation defaults, chat template).
MODEL_TEXT_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja",
                    "added_tokens.json")
MANIFEST = "tuneforge_export.json"
# vLLM's --max-lora-rank (0.34: vllm/config/lora.py): its default, and the only values it accepts.
VLLM_DEFAULT_MAX_LORA_RANK = 16
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_max_lora_rank(rank: int) -> int | None:
    """The --max-lora-rank to serve an adapter of this rank with: the smallest value vLLM accepts that is at least
    the rank; None when the rank is above every one of them."""
    return next((choice for choice in VLLM_MAX_LORA_RANKS if choice >= rank), None)


def vllm_refusals(adapter_config: dict[str, Any]) -> list[str]:
    """Why vLLM's LoRA loader would refuse this adapter (vllm/lora/peft_helper.py validate_legal and
    vllm/config/lora.py, checked against vLLM 0.34.0's own code on CPU); empty when it loads it. Every reason is a
    refusal: export with --format merged instead."""
    reasons = []
    if adapter_config.get("use_dora"):
        reasons.append("vLLM does not support DoRA adapters: export with --format merged")
    if adapter_config.get("modules_to_save"):
        reasons.append("vLLM supports no modules_to_save on a causal LM: export with --format merged")
    if adapter_config.get("bias", "none") != "none":
        reasons.append("vLLM does not support adapters that train biases: export with --format merged")
    rank = int(adapter_config.get("r") or 0)
    if vllm_max_lora_rank(rank) is None:
        reasons.append(f"vLLM serves LoRA ranks up to {VLLM_MAX_LORA_RANKS[-1]} and this adapter's is {rank}: "
                       "export with --format merged")
    return reasons


def _hub_repo(base: dict[str, Any]) -> str | None:
    source = str(base.get("source") or "")
    return source.removeprefix("hf:") if source.startswith("hf:") else None


def base_reference(base: dict[str, Any]) -> tuple[str, str | None]:
    """Where a user gets the base: (hub repository, commit) or (local folder, None)."""
    repo = _hub_repo(base)
    if repo is not None:
        return repo, base.get("commit_sha")
    return str(base.get("source") or "").removeprefix("path:"), None


def local_base(base: dict[str, Any], *, weights: bool) -> Path:
    """The base model's files on this machine: its folder, or a download of the pinned commit from the Hub (or
    HF_ENDPOINT), config and tokenizer only unless `weights`."""
    repo, commit = base_reference(base)
    if _hub_repo(base) is None:
        folder = Path(repo)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"the base model's folder {folder} is not on this machine; run the export where "
                                    "it is (a worker host)")
        return folder
    from huggingface_hub import snapshot_download

    patterns = list(MODEL_TEXT_FILES) + (["*.safetensors", "*.safetensors.index.json"] if weights else [])
    return Path(snapshot_download(repo, revision=commit, allow_patterns=patterns))


def _copy_tokenizer(source: Path, output: Path) -> None:
    for name in MODEL_TEXT_FILES:
        if name != "config.json" and (source / name).is_file():
            shutil.copy2(source / name, output / name)


def export_peft(raw: Path, output: Path, *, base: dict[str, Any], tokenizer_from: Path | None = None) -> dict[str, Any]:
    """The adapter files from an extracted archive (final adapter or checkpoint) into `output`."""
    if not (raw / "adapter_config.json").is_file():
        raise ValueError("this model holds no adapter (a full fine-tune): export it with --format merged")
    output.mkdir(parents=True, exist_ok=True)
    for name in ADAPTER_FILES:
        shutil.copy2(raw / name, output / name)
    _copy_tokenizer(raw if (raw / "tokenizer_config.json").is_file() else (tokenizer_from or raw), output)
    config = json.loads((output / "adapter_config.json").read_text())
    where, commit = base_reference(base)
    config["base_model_name_or_path"] = where
    config["revision"] = commit
    (output / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return config


def export_merged(raw: Path, output: Path, *, base: dict[str, Any], training_config: dict[str, Any] | None) -> None:
    """A plain transformers model folder: adapter merged into the base, or a full fine-tune's weights."""
    output.mkdir(parents=True, exist_ok=True)
    if (raw / "adapter_config.json").is_file():
        from worker.training.merge import merge_adapter

        # The job's training_config.json, less what the worker added beside the config (the base model's pin).
        config = TrainingConfig.model_validate({k: v for k, v in (training_config or {}).items()
                                                if k in TrainingConfig.model_fields})
        merge_adapter(config, model_path=local_base(base, weights=True), adapter_dir=raw, output_dir=output)
        return
    folder = local_base(base, weights=False)
    for path in raw.iterdir():  # a full fine-tune: its weights (and, for the final model, its own config)
        if path.suffix == ".safetensors" or path.name in MODEL_TEXT_FILES:
            shutil.copy2(path, output / path.name)
    if not (output / "config.json").is_file():  # a checkpoint holds only the weights
        shutil.copy2(folder / "config.json", output / "config.json")
    if not (output / "tokenizer_config.json").is_file():
        _copy_tokenizer(folder, output)


def write_manifest(output: Path, *, model: str, job_id: str, fmt: str, base: dict[str, Any],
                   adapter_config: dict[str, Any] | None) -> dict[str, Any]:
    """What was exported and how to serve it (tuneforge_export.json beside the files)."""
    where, commit = base_reference(base)
    manifest: dict[str, Any] = {"model": model, "fine_tuning_job": job_id, "format": fmt,
                                "base_model": {"name": base.get("id"), "source": base.get("source"),
                                               "commit_sha": commit}}
    name = model.replace(":", "-").replace("/", "-")
    revision = f" --revision {commit}" if commit else ""
    if adapter_config is not None:
        refusals = vllm_refusals(adapter_config)
        max_rank = vllm_max_lora_rank(int(adapter_config.get("r") or 0))
        flags = f" --max-lora-rank {max_rank}" if max_rank is not None and max_rank > VLLM_DEFAULT_MAX_LORA_RANK \
            else ""
        manifest["vllm"] = {"loads": not refusals, "notes": refusals,
                            "command": f"vllm serve {where}{revision} --enable-lora{flags} "
                                       f"--lora-modules {name}={output.resolve()}"}
    else:
        manifest["vllm"] = {"loads": True, "notes": [], "command": f"vllm serve {output.resolve()}"}
    (output / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest
