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


# What describe() reads, by the config attribute transformers resolves.
READ_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings", "vocab_size",
             "intermediate_size", "num_key_value_heads")
# Causal-LM types whose attribute_map renames a read key but that the table leaves out: encoder-decoder models (their
# aliases name the encoder's sizes), XLM and XLNet (not decoder-only language models), and MoE models whose
# intermediate_size is their experts' (moe_intermediate_size), which the estimate would take for a dense MLP's;
# LongCat-Flash's layer count is a property of its config class (two sub-layers to a layer), which no alias gives.
NOT_ALIASED = {"bart", "bigbird_pegasus", "blenderbot", "blenderbot-small", "marian", "mbart", "mvp", "pegasus",
               "plbart", "prophetnet", "trocr", "whisper", "xlm", "xlnet", "deepseek_v4", "inkling2_loop_text",
               "inkling2_text", "longcat_flash"}


def test_every_causal_lm_type_that_renames_a_read_key_is_in_the_alias_table() -> None:
    """Found by a review: the table held GPT-2's family only, so GPT-Neo's, Bloom's, MPT's ... shape was unknown (and
    their memory estimate); a newer transformers with another such type fails here."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    renamed = {}
    for model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        if model_type not in CONFIG_MAPPING:
            continue
        mapped = {k: v for k, v in (CONFIG_MAPPING[model_type].attribute_map or {}).items() if k in READ_KEYS}
        if mapped and model_type not in NOT_ALIASED:
            renamed[model_type] = mapped
    assert renamed == CONFIG_KEY_ALIASES


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
