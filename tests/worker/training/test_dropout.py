"""The adapters' dropout on a CPU: Bernoulli(p) masks drawn four to a 64-bit draw, scaled as nn.Dropout scales,
reproducible from the seed, in every adapter of a model loaded for training on a CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.worker.training.factories import make_config
from worker.training.dropout import PackedDropout
from worker.training.model import load_model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.05, 0.3])
def test_it_drops_a_share_p_and_scales_the_rest_as_nn_dropout_does(p: float, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x = (torch.rand(1000, 513) + 1.0).to(dtype).requires_grad_()  # an odd count: the draw's last word is cut
    layer = PackedDropout(p).train()
    y = layer(x)
    kept = y != 0
    # 513,000 Bernoulli(p) draws: the share dropped is within 5 standard deviations of p
    assert abs(float((~kept).float().mean()) - p) < 5 * (p * (1 - p) / x.numel()) ** 0.5
    torch.testing.assert_close(y[kept], x[kept] / (1 - p))
    # rows and columns alike: no stripe of the draw is always kept or always dropped
    assert float(kept.float().mean(0).min()) > 0.2 and float(kept.float().mean(1).min()) > 0.2
    y.backward(torch.ones_like(y))
    assert x.grad is not None
    torch.testing.assert_close(x.grad, kept.to(dtype) / (1 - p))


def test_the_seed_gives_the_mask_and_evaluation_keeps_everything() -> None:
    x = torch.randn(64, 96)
    layer = PackedDropout(0.1).train()
    masks = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        masks.append(layer(x) != 0)
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])
    assert layer.eval()(x) is x
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        PackedDropout(1.0)


def test_a_checkpointed_forward_recomputes_the_same_mask() -> None:
    """Gradient checkpointing reruns the forward in backward with torch's generator restored: the gradient is the
    one of the mask the forward used."""
    from torch.utils.checkpoint import checkpoint

    weight = torch.randn(32, 32, requires_grad=True)
    layer = PackedDropout(0.5).train()
    x = torch.randn(16, 32)

    def block(inp: torch.Tensor) -> torch.Tensor:
        return layer(inp) @ weight

    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(7)
        out = checkpoint(block, x, use_reentrant=False) if checkpointed else block(x)
        out.square().sum().backward()
        assert weight.grad is not None
        grads.append(weight.grad.clone())
        weight.grad = None
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("adapter_type", ["lora", "qlora"])
def test_a_model_loaded_for_training_on_a_cpu_draws_its_adapters_dropout_packed(tiny_model: Path,
                                                                                adapter_type: str) -> None:
    config = make_config(adapter={"type": adapter_type, "r": 4, "alpha": 8, "dropout": 0.05})
    model = load_model(config, tiny_model, device=torch.device("cpu"), dtype=torch.float32)
    dropouts = [layer for m in model.modules() if isinstance(getattr(m, "lora_dropout", None), torch.nn.ModuleDict)
                for layer in m.lora_dropout.values()]
    assert len(dropouts) == 2 * 7  # all-linear in both layers
    assert all(type(layer) is PackedDropout and layer.p == 0.05 for layer in dropouts)
