"""The fused SwiGLU: eager's outputs and gradients bit for bit, one buffer fewer kept for the backward, only SwiGLU
MLPs switched, and a backward that runs once."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaMLP
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

from tests.worker.training.factories import make_config
from worker.training.model import load_model
from worker.training.swiglu import is_swiglu_forward, swiglu, use_fused_swiglu


def eager(model: torch.nn.Module) -> None:
    """Give every switched MLP its class's forward back."""
    for module in model.modules():
        if "forward" in vars(module):
            del module.forward


def step(model: torch.nn.Module, *, bf16: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    ids = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)  # the dropout masks
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with autocast:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


ALL = "all-linear"


@pytest.mark.parametrize(("adapter_type", "bf16", "checkpointing", "targets"), [
    ("lora", False, False, ALL), ("lora", True, False, ALL), ("lora", True, True, ALL), ("qlora", True, True, ALL),
    ("dora", False, True, ALL), ("lora", True, True, ["q_proj", "v_proj"]), ("qlora", True, True, ["q_proj", "v_proj"]),
    ("full", False, True, None),
])
def test_the_fused_mlp_gives_eager_losses_and_gradients_bit_for_bit(
    tiny_model: Path, adapter_type: str, bf16: bool, checkpointing: bool, targets: str | list[str] | None
) -> None:
    # Adapters on every linear layer (the MLP's too) make gradients flow through the fused backward into adapters;
    # with checkpointing the backward's gate and up come from the checkpoint's store of kept products, and with
    # adapters on q and v only, gate and up are the frozen products themselves.
    adapter = {"type": "full"} if adapter_type == "full" else {"type": adapter_type, "r": 4, "alpha": 8, "dropout": 0.1,
                                                               "target_modules": targets}
    config = make_config(adapter=adapter, gradient_checkpointing=checkpointing)
    torch.manual_seed(0)
    model = load_model(config, tiny_model, device=torch.device("cpu"),
                       dtype=torch.bfloat16 if bf16 else torch.float32)
    model.train()
    switched = [m for m in model.modules() if "forward" in vars(m)]
    assert len(switched) == 2  # the tiny model's two layers' MLPs
    fused_loss, fused = step(model, bf16=bf16)
    eager(model)
    eager_loss, plain = step(model, bf16=bf16)
    assert torch.equal(fused_loss, eager_loss)
    assert fused.keys() == plain.keys() and len(fused) > 0
    assert any(".layers.0." in name for name in fused)
    for name in fused:
        assert torch.equal(fused[name], plain[name]), name


def saved_buffers(mlp: torch.nn.Module, x: torch.Tensor, size: int) -> int:
    """How many distinct tensors of `size` elements the MLP's forward keeps for its backward."""
    kept: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.numel() == size:
            kept.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        mlp(x).sum().backward()
    return len(kept)


def test_the_fused_mlp_keeps_one_intermediate_buffer_fewer_for_its_backward() -> None:
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=16, intermediate_size=48, num_attention_heads=2, hidden_act="silu")
    mlp = LlamaMLP(config)
    x = torch.randn(3, 5, 16, requires_grad=True)
    size = 3 * 5 * 48
    assert saved_buffers(mlp, x, size) == 4  # eager: SiLU's input, the product's two inputs, down_proj's input
    assert use_fused_swiglu(mlp) == 1
    assert saved_buffers(mlp, x, size) == 3  # gate, up, down_proj's input


def test_only_swiglu_mlps_are_switched() -> None:
    from transformers import LlamaConfig, Qwen2Config

    class ClampedMLP(LlamaMLP):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.down_proj(self.act_fn(self.gate_proj(x)).clamp(max=7) * self.up_proj(x))

    class KeywordMLP(LlamaMLP):
        def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    class DecoratedMLP(LlamaMLP):
        @torch.no_grad()
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    assert not is_swiglu_forward(KeywordMLP.forward) and not is_swiglu_forward(DecoratedMLP.forward)
    original = LlamaMLP.forward
    # Llama's forward is two statements on an x, Qwen2's one on a hidden_state: both are the expression.
    assert is_swiglu_forward(LlamaMLP.forward) and is_swiglu_forward(Qwen2MLP.forward)
    assert not is_swiglu_forward(ClampedMLP.forward)
    silu = LlamaConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2, hidden_act="silu")
    gelu = LlamaConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2, hidden_act="gelu")
    qwen = Qwen2Config(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_key_value_heads=2,
                       hidden_act="silu")
    hooked = LlamaMLP(silu)
    hooked.forward = lambda x: x  # as accelerate's offloading sets one
    modules = torch.nn.ModuleList([LlamaMLP(silu), LlamaMLP(gelu), ClampedMLP(silu), Qwen2MLP(qwen), hooked])
    assert use_fused_swiglu(modules) == 2
    assert ["forward" in vars(m) for m in modules] == [True, False, False, True, True]
    assert hooked.forward(3) == 3
    assert LlamaMLP.forward is original and LlamaMLP(silu).forward.__func__ is original  # the class is left alone


def test_a_second_backward_through_the_same_graph_is_refused() -> None:
    gate = torch.randn(4, 6, requires_grad=True)
    up = torch.randn(4, 6, requires_grad=True)
    out = swiglu(gate * 1, up * 1).sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once"):
        out.backward()


@pytest.mark.parametrize(("gate_shape", "up_shape", "gate_dtype"), [
    ((4, 6), (4, 6), torch.bfloat16),  # a product that promotes (to up's fp32)
    ((4, 6), (1, 6), torch.float32),  # a product that broadcasts
])
def test_inputs_that_differ_in_dtype_or_shape_are_multiplied_as_eager_does(
    gate_shape: tuple[int, ...], up_shape: tuple[int, ...], gate_dtype: torch.dtype
) -> None:
    def run(function: Any) -> tuple[torch.Tensor, ...]:
        gate = torch.randn(gate_shape, generator=torch.Generator().manual_seed(0)).to(gate_dtype).requires_grad_()
        up = torch.randn(up_shape, generator=torch.Generator().manual_seed(1)).requires_grad_()
        out = function(gate * 1, up * 1)
        out.sum().backward()
        return out, gate.grad, up.grad

    fused, plain = run(swiglu), run(lambda g, u: torch.nn.functional.silu(g) * u)
    for a, b in zip(fused, plain, strict=True):
        assert a is not None and b is not None and torch.equal(a, b)
