from __future__ import annotations

import copy
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch

from tests.worker.training.factories import make_config
from worker.training.dequantize import BufferedLinear4bit, use_buffered_dequantization
from worker.training.model import load_model


def four_bit_model(*, dtype: torch.dtype, quant_type: str, nested: bool) -> torch.nn.Sequential:
    """Two 4-bit layers of different shapes (the second the larger, with a bias) and a plain head."""
    torch.manual_seed(0)
    layers = []
    for rows, columns in ((64, 96), (160, 64)):
        plain = torch.nn.Linear(columns, rows, bias=rows == 160)
        layer = bnb.nn.Linear4bit(columns, rows, bias=rows == 160, compute_dtype=dtype, compress_statistics=nested,
                                  quant_type=quant_type)
        layer.load_state_dict(plain.state_dict())
        layers.append(layer.to("cpu"))  # quantises
    return torch.nn.Sequential(*layers, torch.nn.Linear(160, 8)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("quant_type", "nested"), [("nf4", True), ("nf4", False), ("fp4", True)])
def test_buffered_layers_give_bitsandbytes_outputs_and_gradients(dtype: torch.dtype, quant_type: str,
                                                                 nested: bool) -> None:
    theirs = four_bit_model(dtype=dtype, quant_type=quant_type, nested=nested)
    theirs[1].bias.requires_grad_(True)
    ours = copy.deepcopy(theirs)
    use_buffered_dequantization(ours)
    assert [type(m) for m in ours[:2]] == [BufferedLinear4bit] * 2
    x = torch.randn(3, 5, 96, dtype=dtype)
    outputs, grads, bias_grads = [], [], []
    for model in (theirs, ours):
        given = x.clone().requires_grad_(True)
        middle = model[1](model[0](given))
        middle.retain_grad()
        y = model[2](middle)
        y.float().square().sum().backward()
        outputs.append(y)
        grads.append(given.grad)
        bias_grads.append(model[1].bias.grad)
    assert outputs[1].dtype == dtype
    assert torch.equal(outputs[0], outputs[1])
    assert torch.equal(grads[0], grads[1])  # the input's gradient: the dequantized weight in the backward
    # the bias's: the output gradient summed over positions in fp32 (bitsandbytes sums in the bias's dtype)
    assert middle.grad is not None
    assert torch.equal(bias_grads[1], middle.grad.reshape(-1, 160).sum(0, dtype=torch.float32).to(dtype))
    loose = {"atol": 2e-3, "rtol": 0.1} if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(bias_grads[0], bias_grads[1], **loose)


def test_the_layers_share_one_buffer_the_size_of_the_largest_weight() -> None:
    model = four_bit_model(dtype=torch.float32, quant_type="nf4", nested=True)
    use_buffered_dequantization(model)
    buffer = model[0].dequantization_buffer
    assert model[1].dequantization_buffer is buffer
    with torch.no_grad():
        model(torch.randn(2, 96))
    assert list(buffer.flat) == [torch.float32] and buffer.flat[torch.float32].numel() == 160 * 64
    # what the last product left in it is the larger weight as bitsandbytes dequantizes it
    expected = bnb.functional.dequantize_4bit(model[1].weight, model[1].weight.quant_state)
    assert torch.equal(buffer.flat[torch.float32].view(160, 64), expected)


def test_a_qlora_model_loaded_on_a_cpu_dequantizes_into_the_shared_buffer(tiny_model: Path) -> None:
    config = make_config(adapter={"type": "qlora", "r": 4, "alpha": 8})
    model = load_model(config, tiny_model, device=torch.device("cpu"), dtype=torch.float32)
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 2 * 7  # all-linear in both layers
    assert all(type(m) is BufferedLinear4bit for m in four_bit)
    assert len({id(m.dequantization_buffer) for m in four_bit}) == 1
