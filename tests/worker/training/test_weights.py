"""Base weights read with pread in their load dtype (worker/training/weights.py): the same model as transformers'
own loading, without the file's pages in the process's memory."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.worker.training.factories import make_config
from worker.training import weights
from worker.training.model import load_model


def _wide_model(path: Path, *, vocab: int, hidden: int, shard: str | None = None) -> Path:
    """A Qwen2 model with a tied vocabulary-sized table (most of its bytes), saved in fp32 as full fine-tunes are."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=[2, 3], temperature=0.7, top_p=0.8, do_sample=True)
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    return path


def test_a_tensor_is_read_in_the_dtype_asked_for_in_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(weights, "READ_BLOCK_BYTES", 1000)  # a block boundary inside rows, many blocks per tensor
    tensors = {"a": torch.randn(37, 29), "b": torch.randn(5, 3, 7).to(torch.bfloat16), "scalar": torch.tensor(2.5),
               "c": torch.randn(1001).to(torch.float16)}
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with weights.read_checkpoint(tmp_path) as state:
        assert state is not None and state.keys() == tensors.keys()
        for name, tensor in tensors.items():
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                read = state[name][...].to(device="cpu", dtype=dtype)
                assert read.dtype == dtype and torch.equal(read, tensor.to(dtype)), (name, dtype)
            assert torch.equal(state[name][...].clone(), tensor)  # anything else reads it as stored
        assert torch.equal(state["a"][3:5], tensors["a"][3:5])


def test_a_checkpoint_the_reader_does_not_cover_is_left_to_transformers(tmp_path: Path) -> None:
    save_file({"w": torch.randn(4, 4), "q": torch.zeros(4, dtype=torch.uint8)}, tmp_path / "model.safetensors")
    with weights.read_checkpoint(tmp_path) as state:
        assert state is None
    with weights.read_checkpoint(tmp_path / "nothing") as state:
        assert state is None


def test_a_tensor_whose_bytes_do_not_match_its_shape_is_left_to_safetensors_to_refuse(tmp_path: Path) -> None:
    save_file({"a": torch.randn(4, 4), "b": torch.randn(4, 4)}, tmp_path / "model.safetensors")
    raw = (tmp_path / "model.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    header["a"]["shape"] = [8, 4]  # would read b's bytes as a's second half
    text = json.dumps(header, separators=(",", ":")).encode().ljust(length)
    (tmp_path / "model.safetensors").write_bytes(raw[:8] + text + raw[8 + length:])
    with weights.read_checkpoint(tmp_path) as state:
        assert state is None


@pytest.mark.parametrize(("adapter", "precision"), [("qlora", "bf16"), ("lora", "bf16"), ("full", "fp32")])
def test_a_model_loads_the_same_as_through_transformers_sharded_or_not(tmp_path: Path, adapter: str,
                                                                       precision: str) -> None:
    from transformers import AutoModelForCausalLM

    if precision == "bf16" and adapter == "qlora":
        pytest.importorskip("bitsandbytes")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    sharded = _wide_model(tmp_path / "sharded", vocab=4096, hidden=64, shard="300KB")
    assert json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    single = _wide_model(tmp_path / "single", vocab=4096, hidden=64)
    config = make_config(adapter={"type": adapter} if adapter == "full" else
                         {"type": adapter, "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    expected = load_file(single / "model.safetensors")
    for folder in (single, sharded):
        torch.manual_seed(0)
        ours = load_model(config, folder, device=torch.device("cpu"), dtype=dtype)
        base = ours.get_base_model() if hasattr(ours, "get_base_model") else ours
        embed = base.model.embed_tokens.weight
        assert embed.data_ptr() == base.lm_head.weight.data_ptr()  # still tied
        assert base.name_or_path == base.config.name_or_path == str(folder)  # as when transformers reads the folder
        if adapter != "full":
            assert ours.peft_config["default"].base_model_name_or_path == str(folder)
        assert embed.dtype == (torch.float32 if adapter == "full" else dtype)
        assert torch.equal(embed, expected["model.embed_tokens.weight"].to(embed.dtype))
        kwargs = {"dtype": embed.dtype, "use_safetensors": True, "local_files_only": True}
        if adapter == "qlora":
            from transformers import BitsAndBytesConfig

            kwargs |= {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                                  bnb_4bit_use_double_quant=True,
                                                                  bnb_4bit_compute_dtype=dtype),
                       "device_map": {"": torch.device("cpu")}}
        their_model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        assert base.config.to_dict() == their_model.config.to_dict() | {"use_cache": False}  # load_model turns it off
        assert base.generation_config.to_dict() == their_model.generation_config.to_dict()
        assert base.generation_config.eos_token_id == [2, 3]  # the folder's, not one made from config.json
        theirs, mine = their_model.state_dict(), base.state_dict()
        for name, value in theirs.items():
            key = next(k for k in mine if k.replace(".base_layer", "") == name)
            assert mine[key].dtype == value.dtype and torch.equal(mine[key], value), name


_PEAK = """
import json, sys, torch
from pathlib import Path
from tests.worker.training.factories import make_config
from worker.training.model import load_model
def status(field):  # this process's own figures (ru_maxrss would carry the parent's over the exec)
    line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024
config = make_config(adapter={"type": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})
warm = load_model(config, Path(sys.argv[2]), device=torch.device("cpu"), dtype=torch.bfloat16)  # the imports
Path("/proc/self/clear_refs").write_text("5")  # the high-water mark starts again from here
before = status("VmRSS")
model = load_model(config, Path(sys.argv[1]), device=torch.device("cpu"), dtype=torch.bfloat16)
print(json.dumps({"growth": status("VmHWM") - before}))
"""


def test_loading_an_fp32_file_in_bf16_never_holds_the_files_bytes(tmp_path: Path) -> None:
    """transformers maps the file and copies each converted weight out of it: its load peaked at the bf16 model
    plus the whole fp32 file. Read in blocks, the peak is the bf16 model (half the file) and little more."""
    model = _wide_model(tmp_path / "wide", vocab=65536, hidden=512)
    small = _wide_model(tmp_path / "small", vocab=4096, hidden=64)
    file_bytes = (model / "model.safetensors").stat().st_size
    assert file_bytes > 128 << 20
    loaded = subprocess.run([sys.executable, "-c", _PEAK, str(model), str(small)], capture_output=True, text=True,
                            check=True)
    growth = json.loads(loaded.stdout.strip().splitlines()[-1])["growth"]
    assert growth < 0.75 * file_bytes, (growth >> 20, file_bytes >> 20)
