"""The registry's module names (app/services/base_models.py, read from safetensors headers without torch) against
what transformers builds and PEFT matches, for every type whose names it trusts (CHECKPOINT_NAMED_TYPES)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.conversion_mapping import get_checkpoint_conversion_mapping
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.pytorch_utils import Conv1D

from app.services.base_models import (
    CHECKPOINT_NAMED_TYPES,
    CONFIG_KEY_ALIASES,
    describe,
    names_modules,
    weight_modules,
)


@pytest.mark.parametrize("model_type", sorted(CHECKPOINT_NAMED_TYPES))
def test_a_trusted_type_loads_its_checkpoint_names_as_its_module_names(model_type: str) -> None:
    """transformers renames or fuses no weight of the type as it loads (by type or by class), and every module PEFT
    can adapt in the model it builds is among the names its weights give (what save_pretrained writes)."""
    causal_lm = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
    assert not get_checkpoint_conversion_mapping(model_type) and not get_checkpoint_conversion_mapping(causal_lm)
    config = AutoConfig.for_model(model_type, num_hidden_layers=1)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert type(model).__name__ == causal_lm
    tensors = [(name, list(tensor.shape)) for name, tensor in model.state_dict().items()]
    adaptable = {name.rpartition(".")[2] for name, module in model.named_modules()
                 if isinstance(module, torch.nn.Linear | torch.nn.Embedding | Conv1D)}
    assert adaptable <= set(weight_modules(tensors)), model_type
    assert names_modules(config.to_dict())


def test_types_transformers_renames_are_not_trusted() -> None:
    """Mixtral's experts are fused as they load, GPT-NeoX's embed_out becomes lm_head: their names are not checked."""
    for model_type in ("mixtral", "qwen2_moe", "gpt_neox", "llava"):
        assert not names_modules({"model_type": model_type})
    assert get_checkpoint_conversion_mapping("mixtral") and get_checkpoint_conversion_mapping("GPTNeoXForCausalLM")


@pytest.mark.parametrize("model_type", sorted(CHECKPOINT_NAMED_TYPES | CONFIG_KEY_ALIASES.keys()))
def test_the_shape_is_read_from_the_config_json_each_type_writes(model_type: str) -> None:
    """describe() reads what transformers reads from a saved config.json, under the names the type writes (GPT-2's
    n_embd, n_layer, ...: its config class's attribute_map, which CONFIG_KEY_ALIASES copies)."""
    config = AutoConfig.for_model(model_type)
    if model_type in CONFIG_KEY_ALIASES:
        assert CONFIG_KEY_ALIASES[model_type].items() <= config.attribute_map.items()
    info = describe(config.to_dict(), tokenizer={}, files=[], tensors=None, parameters=None, license_=None)
    read = {"hidden_size": "hidden_size", "layers": "num_hidden_layers", "attention_heads": "num_attention_heads",
            "context_length": "max_position_embeddings", "vocab_size": "vocab_size"}
    assert {k: info[k] for k in read} == {k: getattr(config, key, None) for k, key in read.items()}
