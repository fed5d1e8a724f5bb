"""4-bit base layers on a CPU that dequantize their weights into one buffer the model's layers share. Imports torch
and bitsandbytes: import it where a QLoRA model is loaded.

bitsandbytes dequantizes a 4-bit weight to a new tensor in every pass, twice in a step (the forward, and the
backward's input gradient) and three times with gradient checkpointing. A large weight's new tensor is a fresh
allocation each time, and after train_step hands freed heap back (worker/training/host.py) its pages fault in
again: on qwen2-152k a 4,864 x 896 MLP weight took 8.1 ms a dequantization inside an fp32 QLoRA step where the
same kernel writing into memory it wrote before takes 1.3-1.4 ms (docs/benchmarks.md, issue 18, stop 40). Here
the same bitsandbytes kernel writes into a buffer sized for the largest weight, which each layer's product reads
before the next layer overwrites it: nothing keeps a dequantized weight (the product's backward dequantizes again,
as bitsandbytes' own does), so one buffer serves every layer at the cost of one largest weight in the compute dtype.
"""

from __future__ import annotations

import ctypes
from typing import Any

import bitsandbytes as bnb
import bitsandbytes.functional as bnb_functional
import torch
from bitsandbytes.cextension import lib

# bitsandbytes 0.50's CPU kernels by quantisation type and output dtype (its backends/cpu/ops.py calls the same).
_KERNELS = {
    ("nf4", torch.float32): "cdequantize_blockwise_cpu_nf4_fp32",
    ("nf4", torch.bfloat16): "cdequantize_blockwise_cpu_nf4_bf16",
    ("nf4", torch.float16): "cdequantize_blockwise_cpu_nf4_fp16",
    ("fp4", torch.float32): "cdequantize_blockwise_cpu_fp4_fp32",
    ("fp4", torch.bfloat16): "cdequantize_blockwise_cpu_fp4_bf16",
    ("fp4", torch.float16): "cdequantize_blockwise_cpu_fp4_fp16",
}
# bitsandbytes itself leaves its CPU kernel for these (an odd last dimension; its AVX-512 kernel loses accuracy
# from 2,048-element blocks): so does this.
_LARGEST_KERNEL_BLOCK = 1024


class DequantizationBuffer:
    """The memory a model's 4-bit layers dequantize into, one flat tensor per dtype, grown to the largest weight."""

    def __init__(self) -> None:
        self.flat: dict[torch.dtype, torch.Tensor] = {}

    def weight(self, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        numel = shape[0] * shape[1]
        flat = self.flat.get(dtype)
        if flat is None or flat.numel() < numel:
            flat = self.flat[dtype] = torch.empty(numel, dtype=dtype)
        return flat[:numel].view(shape)


def dequantize_into(buffer: DequantizationBuffer, packed: torch.Tensor, state: Any, dtype: torch.dtype) -> torch.Tensor:
    """The 4-bit weight `packed` (with its bitsandbytes QuantState) as `dtype`, in `buffer`: valid until the next
    dequantization into the same buffer."""
    absmax = state.absmax
    if state.nested:  # double quantisation: the blocks' scales are themselves 8-bit
        absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2)
        absmax += state.offset
    absmax = absmax.float().contiguous()
    rows, columns = state.shape
    out = buffer.weight((rows, columns), dtype)
    getattr(lib, _KERNELS[(state.quant_type, dtype)])(
        ctypes.c_void_p(packed.data_ptr()), ctypes.c_void_p(absmax.data_ptr()), ctypes.c_void_p(out.data_ptr()),
        ctypes.c_longlong(state.blocksize), ctypes.c_longlong(rows), ctypes.c_longlong(columns))
    return out


class _BufferedLinear4bitProduct(torch.autograd.Function):
    """x @ W.T + b for a frozen 4-bit W, dequantized into the shared buffer in the forward and again in the backward
    (what bitsandbytes' MatMul4Bit does, with a new tensor each time)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, bias: torch.Tensor | None, layer: BufferedLinear4bit) -> torch.Tensor:
        ctx.layer = layer
        ctx.has_bias = bias is not None
        weight = dequantize_into(layer.dequantization_buffer, layer.weight, layer.quant_state_of_weight, x.dtype)
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        layer = ctx.layer
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight = dequantize_into(layer.dequantization_buffer, layer.weight, layer.quant_state_of_weight, grad.dtype)
            grad_x = grad @ weight
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0, dtype=torch.float32).to(grad.dtype)
        return grad_x, grad_bias, None


class BufferedLinear4bit(bnb.nn.Linear4bit):
    """A bitsandbytes Linear4bit (still one to isinstance, peft and saving) whose CPU products dequantize into the
    model's shared DequantizationBuffer; other devices, and layouts this does not handle, take bitsandbytes' path."""

    dequantization_buffer: DequantizationBuffer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bnb.nn.modules.fix_4bit_weight_quant_state_from_module(self)
        state = self.quant_state_of_weight
        if not self.compute_type_is_set:  # as bitsandbytes' forward: a compute dtype from the first input's
            self.set_compute_type(x)
            self.compute_type_is_set = True
        dtype = self.compute_dtype or x.dtype
        if (x.device.type != "cpu" or getattr(state, "packing_format_for_cpu", False)
                or len(state.shape) != 2 or state.shape[-1] % 2 or state.blocksize > _LARGEST_KERNEL_BLOCK
                or (state.quant_type, dtype) not in _KERNELS):
            return super().forward(x)
        bias = None if self.bias is None else self.bias.to(dtype)
        return _BufferedLinear4bitProduct.apply(x.to(dtype), bias, self).to(x.dtype)

    @property
    def quant_state_of_weight(self) -> Any:
        """The packed weight's bitsandbytes QuantState (an attribute torch's Parameter type does not know)."""
        return getattr(self.weight, "quant_state", None)


def use_buffered_dequantization(model: torch.nn.Module) -> None:
    """Make each of `model`'s 4-bit layers a BufferedLinear4bit sharing one buffer (its weights stay as they are)."""
    buffer = DequantizationBuffer()
    for module in model.modules():
        if type(module) is bnb.nn.Linear4bit:
            module.__class__ = BufferedLinear4bit
            setattr(module, "dequantization_buffer", buffer)  # noqa: B010 - not a Tensor or Module: torch's stub
