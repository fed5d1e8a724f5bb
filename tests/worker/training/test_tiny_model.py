from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any


def test_tiny_model_has_weights_tokenizer_and_chat_template(tiny_model: Path, tokenizer: Any) -> None:
    from transformers import AutoModelForCausalLM

    assert (tiny_model / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(tiny_model, use_safetensors=True)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 2
    assert model.config.num_key_value_heads == 2 and model.config.hidden_size == 64
    assert len(tokenizer) == model.config.vocab_size
    assert {tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token} == {
        "<|begin_of_text|>",
        "<|im_end|>",
        "<|pad|>",
    }


def test_tokenizer_round_trips_any_text(tokenizer: Any) -> None:
    text = "The river café costs 12,50 € — ok? 🤖 \n\tdone"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert tokenizer.unk_token_id not in ids or tokenizer.unk_token_id is None


def test_chat_template_renders_all_roles_and_generation_prompt(tokenizer: Any) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "tool", "content": "42"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|begin_of_text|><|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\nhello<|im_end|>\n<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\n"
    )


def test_make_tiny_model_is_deterministic(tmp_path: Path, tiny_model: Path) -> None:
    from worker.training.tiny_model import make_tiny_model

    again = make_tiny_model(tmp_path / "again", seed=0)
    digest = lambda p: hashlib.sha256((p / "model.safetensors").read_bytes()).hexdigest()  # noqa: E731
    assert digest(again) == digest(tiny_model)
    assert (again / "tokenizer.json").read_text() == (tiny_model / "tokenizer.json").read_text()
