"""Atomic, verifiable checkpoints that let a run resume exactly where it stopped.

A checkpoint is written into a temporary directory next to its target, every file fsynced, a
manifest (size + sha256 per file) written last, and only then renamed into place: a crash leaves
either the whole checkpoint or none of it, and `verify_checkpoint` catches later corruption.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
FULL_WEIGHTS = "model.safetensors"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# RNG states of ranks 1..N-1 of a multi-process run (rank 0's are in rng_state.pt).
RANK_RNG = "rng_state_ranks.pt"


def checkpoint_steps(total_steps: int, *, save_steps: int | None, n_checkpoints: int) -> set[int]:
    """Steps to save at: every save_steps, else n_checkpoints evenly spaced ending at the last step."""
    if save_steps:
        return set(range(save_steps, total_steps + 1, save_steps))
    n = min(n_checkpoints, total_steps)
    return {round(total_steps * (k + 1) / n) for k in range(n)}


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) RNG states, in types torch.load(weights_only=True) accepts."""
    import numpy as np
    import torch

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [kind, np.asarray(keys).tolist(), pos, has_gauss, gauss],
        "torch": torch.random.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of capture_rng_state."""
    import numpy as np
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_weights(model: Any, directory: Path, *, full: bool, state_dict: dict[str, Any] | None = None) -> None:
    """Adapter in PEFT layout, or every weight of a full fine-tune, as safetensors.

    `state_dict`: the model's weights gathered unsharded (FSDP), used instead of the model's own.
    """
    if full:
        from safetensors.torch import save_file, save_model

        if state_dict is None:
            save_model(model, str(directory / FULL_WEIGHTS))  # handles tied/shared tensors
        else:  # gathered copies: tied weights arrive as one tensor under two names, which safetensors refuses
            save_file({k: v.clone().contiguous() for k, v in state_dict.items()}, str(directory / FULL_WEIGHTS),
                      metadata={"format": "pt"})
    elif state_dict is None:
        model.save_pretrained(directory, safe_serialization=True)
    else:
        model.save_pretrained(directory, safe_serialization=True, state_dict=state_dict)


def load_weights(model: Any, directory: Path, *, full: bool) -> None:
    """Load weights written by save_weights back into `model` in place."""
    if full:
        from safetensors.torch import load_model

        load_model(model, str(directory / FULL_WEIGHTS))
    else:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(str(directory / ADAPTER_WEIGHTS)))


def read_weights(directory: Path, *, full: bool, model_keys: list[str]) -> dict[str, Any]:
    """The weights save_weights wrote, named as in the model's own state_dict (to load into a sharded model)."""
    from safetensors.torch import load_file

    if full:
        return load_file(str(directory / FULL_WEIGHTS))
    saved = load_file(str(directory / ADAPTER_WEIGHTS))
    # PEFT saves "...lora_A.weight" for the model's "...lora_A.default.weight": drop the adapter name.
    by_saved_name = {key.replace(".default", ""): key for key in model_keys}
    missing = [k for k in saved if k not in by_saved_name]
    if missing:
        raise ValueError(f"adapter weights in {directory} do not fit this model: {missing[:3]}")
    return {by_saved_name[k]: v for k, v in saved.items()}


def save_checkpoint(
    output_dir: Path,
    *,
    step: int,
    model: torch.nn.Module,
    full: bool,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer_state: dict[str, Any],
    weights: dict[str, Any] | None = None,
    optimizer_state: dict[str, Any] | None = None,
    rank_rng: list[dict[str, Any]] | None = None,
) -> Path:
    """Atomically write `output_dir/checkpoints/step-{step}` and return its path.

    Multi-process runs pass what rank 0 gathered: `weights` and `optimizer_state` unsharded (FSDP) and
    the RNG states of the other ranks (`rank_rng`, ranks 1..N-1), so every process resumes its stream.
    """
    import torch

    root = output_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"step-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step}-", dir=root))
    try:
        save_weights(model, tmp, full=full, state_dict=weights)
        torch.save(optimizer_state if optimizer_state is not None else optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(capture_rng_state(), tmp / "rng_state.pt")
        if rank_rng:
            torch.save(rank_rng, tmp / RANK_RNG)
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1))
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        for path in files:
            _fsync(path)
        manifest = {str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
        (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": manifest}, indent=1))
        _fsync(tmp / MANIFEST)
        _fsync(tmp)
        if target.exists():  # e.g. a pause at a step that was already saved
            shutil.rmtree(target)
        os.rename(tmp, target)
        _fsync(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def verify_checkpoint(path: Path) -> bool:
    """True when every file listed in the manifest exists with the recorded size and sha256."""
    manifest_path = Path(path) / MANIFEST
    if not manifest_path.is_file():
        return False
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError):
        return False
    for name, expected in files.items():
        file = Path(path) / name
        if not file.is_file() or file.stat().st_size != expected["size"] or _sha256(file) != expected["sha256"]:
            return False
    return True


def best_step_to_keep(path: Path) -> int | None:
    """The step a load_best_at_end run would end on, from a checkpoint's trainer state (its tracked metric and
    early_stopping_threshold decided it); None for other runs, or before any evaluation. Retention keeps that step's
    checkpoint and a resumed attempt fetches it (worker/database_reporter.py, worker/attempt.py)."""
    state = json.loads((Path(path) / TRAINER_STATE).read_text())
    best = state.get("best_step")
    return best if state.get("config", {}).get("load_best_at_end") and best is not None else None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a verified checkpoint's trainer state, optimizer, scheduler and RNG states (not weights)."""
    import torch

    path = Path(path)
    if not verify_checkpoint(path):
        raise ValueError(f"checkpoint {path} is incomplete or corrupted (manifest check failed)")
    return {
        "trainer_state": json.loads((path / TRAINER_STATE).read_text()),
        "optimizer": torch.load(path / "optimizer.pt", weights_only=True),
        "scheduler": torch.load(path / "scheduler.pt", weights_only=True),
        "rng": torch.load(path / "rng_state.pt", weights_only=True),
        "rank_rng": torch.load(path / RANK_RNG, weights_only=True) if (path / RANK_RNG).is_file() else [],
    }


def prune_checkpoints(output_dir: Path, *, keep_steps: set[int] | None = None) -> None:
    """Delete all checkpoints except the latest, the one with the lowest valid_loss and `keep_steps`."""
    root = output_dir / "checkpoints"
    saved = sorted((p for p in root.glob("step-*") if (p / TRAINER_STATE).is_file()), key=lambda p: int(p.name[5:]))
    if len(saved) <= 1:
        return
    keep = {saved[-1]} | {p for p in saved if int(p.name[5:]) in (keep_steps or set())}
    scored = [(json.loads((p / TRAINER_STATE).read_text()).get("valid_loss"), p) for p in saved]
    scored = [(loss, p) for loss, p in scored if loss is not None]
    if scored:
        keep.add(min(scored, key=lambda item: item[0])[1])
    for path in saved:
        if path not in keep:
            shutil.rmtree(path)
