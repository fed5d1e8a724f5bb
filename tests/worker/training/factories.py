"""Small dataset and config factories for the training tests."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from app.schemas.training import TrainingConfig

WORDS = [
    "alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "apple",
    "music", "garden", "paper", "window", "light", "water", "city",
]  # fmt: skip


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    """Write records one JSON object per line."""
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def code_mapping(n_keys: int, *, seed: int = 0, value_words: int = 4) -> list[dict[str, str]]:
    """Prompt/completion pairs "code for KEY:" -> a fixed random word string the base model cannot know."""
    rng = random.Random(seed)
    return [
        {"prompt": f"code for {key}{i}:", "completion": " " + " ".join(rng.choice(WORDS) for _ in range(value_words))}
        for i, key in enumerate(rng.choice(WORDS) for _ in range(n_keys))
    ]


def chat_records(n: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """Short user/assistant conversations."""
    rng = random.Random(seed)
    return [
        {
            "messages": [
                {"role": "user", "content": "say " + " ".join(rng.choice(WORDS) for _ in range(3))},
                {"role": "assistant", "content": " ".join(rng.choice(WORDS) for _ in range(4))},
            ]
        }
        for _ in range(n)
    ]


def preference_records(n: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """Preferred answers start with "ok", non-preferred ones with "no"; otherwise the same words."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(3))
        records.append({"input": {"messages": [{"role": "user", "content": f"say {words}"}]},
                        "preferred_output": [{"role": "assistant", "content": f"ok {words}"}],
                        "non_preferred_output": [{"role": "assistant", "content": f"no {words}"}]})
    return records


def make_config(**overrides: Any) -> TrainingConfig:
    """A small, fast config for the tiny model; keyword arguments override any field."""
    base: dict[str, Any] = {
        "adapter": {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "n_epochs": 1,
        "batch_size": 4,
        "learning_rate": 1e-2,
        "max_seq_length": 64,
        "seed": 7,
        "precision": "fp32",
    }
    base.update(overrides)
    return TrainingConfig.model_validate(base)
