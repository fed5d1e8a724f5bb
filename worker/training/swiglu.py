"""SwiGLU (silu(gate) x up, the MLP of Llama, Qwen2, Mistral and most decoders) in fewer fresh buffers.

Eager autograd runs `act_fn(gate_proj(x)) * up_proj(x)` as two operators, so a forward makes two [positions,
intermediate] buffers (SiLU's output and the product) and keeps three for its backward (gate, up and SiLU's output),
and the backward makes three more (one per input gradient and SiLU's). On a CPU each fresh buffer of that size is
thousands of page faults (glibc hands large freed chunks back), which cost more than the arithmetic: on qwen2-152k
in bf16 one such product took about 5 ms inside a step against 1 ms on a warm buffer (docs/benchmarks.md, issue 18,
stop 45). Here the forward makes one buffer and keeps gate and up; the backward makes one, and writes the gate's
gradient over the gate and uses the up buffer for its intermediate product, which nothing reads after this backward.
Each value is computed by the operator eager uses for it, in the same dtype (the backward computes SiLU's output
again instead of keeping it: one more element-wise pass), so outputs and gradients are bit-identical to eager.

Overwriting gate and up is safe because nothing else keeps them: gate_proj and up_proj keep their inputs, not their
outputs (peft's LoRA and DoRA layers, bitsandbytes' 4-bit layers), and selective checkpointing's store hands each
kept product out once. A projection that kept its own output for its backward would read the overwritten values (a
version-counter error without checkpointing, silently under it), so only the modules below are switched.

Only a module whose forward is exactly that expression, with a SiLU activation, is switched (use_fused_swiglu); any
other MLP keeps its own forward.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
import types
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - torch's own convention
from torch.autograd.function import once_differentiable

# The forwards transformers writes for a SwiGLU MLP, as ast.unparse prints their bodies with the input named x.
_SWIGLU_FORWARDS = frozenset({
    "down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))\nreturn down_proj",
    "return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))",
})


class SwiGLU(torch.autograd.Function):
    """silu(gate) * up, keeping gate and up for a backward that overwrites them (so it runs once per forward)."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        hidden = F.silu(gate)
        hidden.mul_(up)
        ctx.save_for_backward(gate, up)
        ctx.spent = False
        return hidden

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if ctx.spent:
            raise RuntimeError("SwiGLU's backward overwrites what its forward kept, so it runs once: "
                               "backward through the same graph twice (retain_graph) is not supported")
        ctx.spent = True
        gate, up = ctx.saved_tensors
        grad_up = F.silu(gate).mul_(grad)
        up.mul_(grad)  # grad x up: the gradient at SiLU's output, which SiLU's backward turns into the gate's
        grad_gate = torch.ops.aten.silu_backward.grad_input(up, gate, grad_input=gate)
        return grad_gate, grad_up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up; eager where the two differ in dtype or shape (a product that would promote or broadcast)."""
    if gate.dtype != up.dtype or gate.shape != up.shape:
        return F.silu(gate) * up
    return SwiGLU.apply(gate, up)


def _fused_forward(self: Any, x: torch.Tensor) -> torch.Tensor:  # self: the MLP module
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


@functools.cache
def is_swiglu_forward(forward: Any) -> bool:
    """Whether `forward` (an MLP class's) is transformers' SwiGLU expression, whatever its input is named."""
    try:
        function = ast.parse(textwrap.dedent(inspect.getsource(forward))).body[0]
    except (OSError, TypeError, SyntaxError, IndexError):
        return False
    if not isinstance(function, ast.FunctionDef) or function.decorator_list:
        return False
    args = function.args
    if (len(args.args) != 2 or args.posonlyargs or args.vararg or args.kwonlyargs or args.kwarg
            or args.defaults):
        return False  # (self, x) and nothing else: _fused_forward takes exactly that
    name = args.args[1].arg
    body = ast.unparse(ast.Module(body=function.body, type_ignores=[]))
    if name != "x" and "(x)" in body:
        return False  # an x that is not the input
    return body.replace(f"({name})", "(x)") in _SWIGLU_FORWARDS


def use_fused_swiglu(model: torch.nn.Module) -> int:
    """Give each SwiGLU MLP of `model` the fused forward (module by module: the class is left alone); how many."""
    from transformers.activations import SiLUActivation

    switched = 0
    for module in model.modules():
        # A forward already set on the module (accelerate's offloading hooks set one) is left alone.
        if (isinstance(getattr(module, "act_fn", None), SiLUActivation | torch.nn.SiLU)
                and "forward" not in vars(module) and is_swiglu_forward(type(module).forward)):
            module.forward = types.MethodType(_fused_forward, module)
            switched += 1
    return switched
