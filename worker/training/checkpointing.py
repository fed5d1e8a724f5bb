"""Selective activation checkpointing: what a checkpointed forward keeps for its backward.

Plain checkpointing keeps only each decoder layer's input, and the backward runs every layer's forward again before
its own backward: every matrix product (4-bit ones dequantized again) and the attention, about a third more work
for a QLoRA step whose frozen weights need no gradient. Here a checkpointed forward also keeps the outputs of its
matrix products and of attention, up to SAVED_OUTPUTS_PER_PASS_MB a forward pass, in the order they are made; the
backward's recomputation takes those from the store and recomputes only the element-wise work (norms, activations,
rotary embeddings, dropout masks from the same seed) and the products that did not fit.

On qwen2-152k's layer shape with QLoRA (docs/benchmarks.md, issue 18, stop 32) a checkpointed forward and backward
took 20-26% less time in fp32 and bf16, and with passes of MAX_TOKENS_PER_CHECKPOINTED_FORWARD tokens the step's peak
memory did not rise: the backward's peak is one layer's recomputed activations, and they shrink with the pass about
as much as the kept outputs grow.

What the rule keeps and nothing reads: torch's recomputation stops before each layer's last product (its output is
not needed), so that output is kept for nothing (about 6% of what a tiny model's pass keeps); and DoRA's products of
its two adapter matrices are weight-sized, not token-sized, so on a large model they take the budget. The budget
bounds both. The policy is called in the forward only (torch 2.13: the recomputation reads the store by index), so
only the forward spends the budget.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from app.schemas.training import SAVED_OUTPUTS_PER_PASS_MB
from worker.training import attention  # noqa: F401  # registers torch.ops.tuneforge.block_attention


@functools.cache
def kept_ops() -> frozenset[Any]:
    """The operators whose outputs a checkpointed forward keeps: matrix products (bitsandbytes' 4-bit product
    included, where it is installed) and the fused attention kernels, the CPU's block attention among them."""
    aten = torch.ops.aten
    ops = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,
           aten._scaled_dot_product_flash_attention_for_cpu.default,
           aten._scaled_dot_product_flash_attention.default,
           aten._scaled_dot_product_efficient_attention.default,
           aten._scaled_dot_product_cudnn_attention.default,
           torch.ops.tuneforge.block_attention.default}
    try:
        import bitsandbytes  # noqa: F401  # registers torch.ops.bitsandbytes

        ops.add(torch.ops.bitsandbytes.gemm_4bit.default)
    except (ImportError, AttributeError, RuntimeError):
        pass
    return frozenset(ops)


def _nbytes(output: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tree_leaves(output) if isinstance(t, torch.Tensor))


class SavedOutputs:
    """One model's budget: the bytes of outputs kept since the model's last forward began."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.used_bytes = 0

    def new_pass(self, *_: Any) -> None:
        """A forward pre-hook: each forward pass has the whole budget (its kept outputs are freed by its backward)."""
        self.used_bytes = 0

    def policy(self, ctx: Any, func: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        if func in kept_ops():
            size = _nbytes(ctx.op_output)
            if self.used_bytes + size <= self.limit_bytes:
                self.used_bytes += size
                return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    def contexts(self) -> Any:
        return create_selective_checkpoint_contexts(self.policy)


def enable_checkpointing(model: torch.nn.Module) -> SavedOutputs:
    """Turn on a transformers model's gradient checkpointing with the selective policy above; returns its budget."""
    budget = SavedOutputs(SAVED_OUTPUTS_PER_PASS_MB * 2**20)
    model.register_forward_pre_hook(budget.new_pass)
    model.gradient_checkpointing_enable(  # type: ignore[operator]
        gradient_checkpointing_kwargs={"use_reentrant": False, "context_fn": budget.contexts})
    return budget
