from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.support.reporters import RecordingReporter
from tests.worker.training.factories import code_mapping, make_config, write_jsonl
from worker.training.model import count_parameters, cpu_bf16, load_model, resolve_precision
from worker.training.recipe import train


def test_fp16_on_cpu_is_refused_before_any_weights_load(tmp_path: Path) -> None:
    train_file = write_jsonl(tmp_path / "train.jsonl", code_mapping(4))
    with pytest.raises(ValueError, match='precision "fp16" is not supported on CPU; use "fp32"'):
        # The model path does not exist: the refusal must come before anything is loaded.
        train(
            make_config(precision="fp16"),
            model_path=tmp_path / "no-such-model",
            train_file=train_file,
            validation_file=None,
            output_dir=tmp_path / "out",
            reporter=RecordingReporter(),
        )


AMX = {"amx_bf16": True, "avx512_bf16": True, "avx512_bw": True, "avx512_vl": True, "avx512_dq": True}
AVX512 = {"avx512_bw": True, "avx512_vl": True, "avx512_dq": True, "avx512_bf16": False}
GRAVITON3 = {"architecture": "arm64", "bf16": True}
AVX2 = {"avx2": True, "avx512_bf16": False, "amx_bf16": False}


@pytest.mark.parametrize(("capabilities", "kind"), [(AMX, "native"), (GRAVITON3, "native"), (AVX512, "emulated"),
                                                    (AVX2, "none")])
def test_a_cpus_bf16_is_read_from_its_instruction_sets(monkeypatch: pytest.MonkeyPatch, capabilities: dict,
                                                       kind: str) -> None:
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    assert cpu_bf16() == kind


@pytest.mark.parametrize(("kind", "auto"), [("native", torch.bfloat16), ("emulated", torch.float32),
                                            ("none", torch.float32)])
def test_auto_precision_on_a_cpu_is_bf16_only_where_it_is_native(monkeypatch: pytest.MonkeyPatch, kind: str,
                                                                  auto: torch.dtype) -> None:
    monkeypatch.setattr("worker.training.model.cpu_bf16", lambda: kind)
    assert resolve_precision("auto", torch.device("cpu")) == auto
    assert resolve_precision("fp32", torch.device("cpu")) == torch.float32
    if kind == "none":
        with pytest.raises(ValueError, match='"bf16" needs a CPU with bf16 or AVX-512 instructions.*use "fp32"'):
            resolve_precision("bf16", torch.device("cpu"))
    else:
        assert resolve_precision("bf16", torch.device("cpu")) == torch.bfloat16


def test_bf16_on_a_cpu_without_it_is_refused_before_any_weights_load(monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path: Path) -> None:
    monkeypatch.setattr("worker.training.model.cpu_bf16", lambda: "none")
    train_file = write_jsonl(tmp_path / "train.jsonl", code_mapping(4))
    with pytest.raises(ValueError, match='precision "bf16" needs a CPU with bf16'):
        train(make_config(precision="bf16"), model_path=tmp_path / "no-such-model", train_file=train_file,
              validation_file=None, output_dir=tmp_path / "out", reporter=RecordingReporter())


@pytest.mark.parametrize("adapter_type", ["lora", "dora", "qlora"])
def test_only_adapter_parameters_require_grad(tiny_model: Path, adapter_type: str) -> None:
    config = make_config(adapter={"type": adapter_type, "r": 4, "alpha": 8}, gradient_checkpointing=True)
    model = load_model(config, tiny_model, device=torch.device("cpu"), dtype=torch.float32)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    # all-linear: q, k, v, o, gate, up, down in both layers, A and B each (+ DoRA's magnitude).
    per_module = 3 if adapter_type == "dora" else 2
    assert len(trainable) == 2 * 7 * per_module
    assert not any("lm_head" in name for name in trainable)
    if adapter_type == "qlora":
        import bitsandbytes as bnb

        assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def test_qlora_keeps_the_unquantized_weights_in_the_load_dtype(tiny_model: Path) -> None:
    # peft's prepare_model_for_kbit_training would cast them all to fp32 (the embedding and output layer are frozen
    # and the largest of them), and fp32 norms would hand every 4-bit layer an fp32 input.
    import bitsandbytes as bnb

    config = make_config(adapter={"type": "qlora", "r": 4, "alpha": 8}, gradient_checkpointing=True)
    model = load_model(config, tiny_model, device=torch.device("cpu"), dtype=torch.bfloat16)
    base = model.get_base_model()
    assert base.get_input_embeddings().weight.dtype == torch.bfloat16
    assert base.get_output_embeddings().weight.dtype == torch.bfloat16
    frozen = [p for p in base.parameters() if not p.requires_grad and not isinstance(p, bnb.nn.Params4bit)]
    assert len(frozen) > 3 and all(p.dtype == torch.bfloat16 for p in frozen)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert base.is_gradient_checkpointing


@pytest.mark.parametrize("adapter_type", ["lora", "dora", "qlora"])
def test_bf16_adapters_take_their_input_in_bf16_and_train_fp32_weights(tiny_model: Path, adapter_type: str) -> None:
    # peft would cast each adapted layer's input to fp32 first, and autocast back to bf16 for the product.
    config = make_config(adapter={"type": adapter_type, "r": 4, "alpha": 8, "dropout": 0.1})
    model = load_model(config, tiny_model, device=torch.device("cpu"), dtype=torch.bfloat16)
    seen: list[torch.dtype] = []

    def record(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if args[0].ndim == 3:  # the tokens' hidden states (DoRA also runs its layers on an fp32 identity matrix)
            seen.append(args[0].dtype)

    for name, module in model.named_modules():
        if name.endswith("lora_A.default"):
            module.register_forward_pre_hook(record)
    ids = torch.tensor([[5, 9, 13, 21, 34, 8, 2, 7]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert len(seen) == 2 * 7 and set(seen) == {torch.bfloat16}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert len(lora_b) == 2 * 7 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)


def test_qlora_gradients_are_the_same_after_an_evaluation_pass(tiny_model: Path) -> None:
    # bitsandbytes repacks 4-bit weights for an inference-only CPU kernel in eval mode (AVX512-BF16 CPUs)
    # and never unpacks them; training after an evaluation must still get the true gradients.
    model = load_model(make_config(adapter={"type": "qlora", "r": 4, "alpha": 8, "dropout": 0.0}), tiny_model,
                       device=torch.device("cpu"), dtype=torch.float32)
    ids = torch.tensor([[5, 9, 13, 21, 34, 8, 2, 7]])

    def gradients() -> dict[str, torch.Tensor]:
        model.train()
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    before = gradients()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    after = gradients()
    assert all(torch.allclose(before[n], after[n], atol=1e-6) for n in before)
    assert any(float(g.abs().sum()) > 0 for n, g in after.items() if "layers.0." in n)


def test_target_modules_list_restricts_the_adapter(tiny_model: Path) -> None:
    config = make_config(adapter={"type": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    model = load_model(config, tiny_model, device=torch.device("cpu"), dtype=torch.float32)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 2 * 2 and all("q_proj" in n or "v_proj" in n for n in trainable)


def test_full_fine_tune_trains_every_parameter(tiny_model: Path) -> None:
    model = load_model(
        make_config(adapter={"type": "full"}), tiny_model, device=torch.device("cpu"), dtype=torch.float32
    )
    trainable, total = count_parameters(model)
    assert trainable == total > 200_000


def test_qlora_without_a_bitsandbytes_backend_is_refused_before_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers.integrations

    def no_backend(raise_exception: bool = False) -> bool:
        raise RuntimeError("no bitsandbytes backend for this device")

    monkeypatch.setattr(transformers.integrations, "validate_bnb_backend_availability", no_backend)
    with pytest.raises(ValueError, match='needs a working bitsandbytes.*or use adapter type "lora"'):
        train(
            make_config(adapter={"type": "qlora"}),
            model_path=tmp_path / "no-such-model",
            train_file=write_jsonl(tmp_path / "train.jsonl", code_mapping(4)),
            validation_file=None,
            output_dir=tmp_path / "out",
            reporter=RecordingReporter(),
        )


def test_lora_config_maps_dora_and_rslora() -> None:
    from app.schemas.training import AdapterConfig
    from worker.training.model import lora_config

    dora = lora_config(AdapterConfig(type="dora", r=4, alpha=8, use_rslora=True, target_modules=["q_proj"]))
    assert dora.use_dora and dora.use_rslora and dora.r == 4 and dora.lora_alpha == 8
    assert set(dora.target_modules) == {"q_proj"}
    plain = lora_config(AdapterConfig(type="lora"))
    assert not plain.use_dora and not plain.use_rslora and plain.target_modules == "all-linear"
