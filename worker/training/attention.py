"""Attention for training on a CPU: a query block at a time, as batched matrix products. Imports torch: import it where
it runs.

torch's fused CPU attention (scaled_dot_product_attention's flash kernel) runs small products over small blocks of
queries and keys: at qwen2-152k's shape (14 query heads of 64 dimensions over 2 key/value heads, rows of 250-580
tokens) its forward and backward ran at 40-60 GFLOP/s in bf16 against a 410 GFLOP/s matrix product, and took 15% of
a bf16 LoRA step (docs/benchmarks.md, issue 18, stop 38). Here each block of QUERY_BLOCK query rows meets every key up
to the block's last visible one in two batched products per key/value head (its group of query heads stacked, so no
key or value is repeated per query head), the softmax runs in fp32 between them (on scores the bf16 product rounded
to bf16, as transformers' eager attention has them), and only the output and each query's log-sum-exp are kept;
the backward recomputes a block's probabilities from them, as flash attention does.
A block's fp32 scores are heads x QUERY_BLOCK x keys (14 x 64 x 580 x 4 bytes: 2 MB).

It takes what the SDPA path takes (transformers' boolean 4D masks: causal, padding, packed sequences, DPO's pair masks,
or none for plain causal rows) and hands anything else to SDPA: dropout, a float mask, head sizes that differ
(multi-head latent attention), a query shorter than its keys (generation with a cache), a device other than the CPU. It
is one operator to torch (a custom op with its own backward), so a checkpointed forward's selective policy keeps its
output as it keeps SDPA's.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from worker.training.fast_exp import exp_minus_

# The registered name (transformers' AttentionInterface and AttentionMaskInterface) a model's config carries.
BLOCK_ATTENTION = "tuneforge_cpu_blocks"
# Query rows per block: at qwen2-152k's shape 64 took 29-41 ms a layer's forward and backward where 32 took 32-59 and
# 128 took 37-57 (bf16, rows of 244-576 tokens; SDPA 38-66 ms).
QUERY_BLOCK = 64


@torch.library.custom_op("tuneforge::block_attention", mutates_args=(), device_types="cpu")
def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T x scale, masked) v for q [batch, heads, length, dim] and k, v [batch, kv heads, length, dim]
    (heads a multiple of kv heads), with `mask` a boolean [batch, 1 or heads, length, length] (True: attend) or None
    for causal attention; and each query's log-sum-exp of scores, which the backward recomputes the probabilities
    from. A query that may attend to nothing gets zeros, as SDPA gives it. One operator to torch: a checkpointed
    forward's policy keeps its two outputs (worker/training/checkpointing.py), not its products of scores."""
    batch, heads, length, dim = q.shape
    group = heads // k.size(1)
    out = torch.empty(batch, length, heads, dim, dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty(batch, heads, length, dtype=torch.float32, device=q.device)
    for lo, hi, end in _blocks(mask, length):
        scores = _scores(q, k, mask, lo, hi, end, scale, group)
        top = scores.amax(-1, keepdim=True).clamp_(min=torch.finfo(torch.float32).min)
        probs = exp_minus_(scores, top)
        total = probs.sum(-1, keepdim=True)
        # A query that sees no key: probabilities 0, and a log-sum-exp of +inf makes the backward's 0 too.
        lse[:, :, lo:hi] = torch.where(total > 0, top + total.log(), math.inf).squeeze(-1)
        probs.div_(total.clamp_(min=torch.finfo(torch.float32).tiny))
        values = _by_kv_head(probs.to(q.dtype), group).matmul(v[:, :, :end])
        out[:, :, lo:hi] = values.view(batch, heads, hi - lo, dim)
    return out, lse


@block_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    batch, heads, length, dim = q.shape
    return q.new_empty(batch, length, heads, dim).transpose(1, 2), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("tuneforge::block_attention_backward", mutates_args=(), device_types="cpu")
def block_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             out: torch.Tensor, lse: torch.Tensor, mask: torch.Tensor | None,
                             scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """block_attention's gradients with respect to q, k and v, a block of queries at a time."""
    batch, heads, length, dim = q.shape
    group = heads // k.size(1)
    # d softmax: p x (dp - sum(p x dp)), and sum(p x dp) over the keys is sum(dout x out) over the dimensions.
    delta = (grad_out.float() * out.float()).sum(-1, keepdim=True)
    grad_q = torch.empty_like(q)
    grad_k = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    grad_v = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    for lo, hi, end in _blocks(mask, length):
        probs = exp_minus_(_scores(q, k, mask, lo, hi, end, scale, group), lse[:, :, lo:hi, None])
        grad_block = _by_kv_head(grad_out[:, :, lo:hi], group)
        grad_v[:, :, :end] += _by_kv_head(probs.to(q.dtype), group).transpose(-1, -2).matmul(grad_block).float()
        grad_probs = grad_block.matmul(v[:, :, :end].transpose(-1, -2)).view_as(probs).float()
        grad_scores = _by_kv_head(probs.mul_(grad_probs.sub_(delta[:, :, lo:hi])).mul_(scale).to(q.dtype), group)
        grad_q[:, :, lo:hi] = grad_scores.matmul(k[:, :, :end]).view(batch, heads, hi - lo, dim)
        grad_k[:, :, :end] += grad_scores.transpose(-1, -2).matmul(_by_kv_head(q[:, :, lo:hi], group)).float()
    return grad_q, grad_k.to(k.dtype), grad_v.to(v.dtype)


@block_attention_backward.register_fake
def _(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
      lse: torch.Tensor, mask: torch.Tensor | None, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.empty_like(q), k.new_empty(k.shape), v.new_empty(v.shape)


def _save(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
    q, k, v, mask, scale = inputs
    ctx.save_for_backward(q, k, v, *output, mask)
    ctx.scale = scale


def _backward(ctx: Any, grad_out: torch.Tensor, _grad_lse: Any) -> tuple[Any, ...]:
    q, k, v, out, lse, mask = ctx.saved_tensors
    return (*block_attention_backward(grad_out, q, k, v, out, lse, mask, ctx.scale), None, None)


block_attention.register_autograd(_backward, setup_context=_save)


def _blocks(mask: torch.Tensor | None, length: int) -> list[tuple[int, int, int]]:
    """(first query, one past the last, one past the last key any of them may attend to) for each block."""
    return [(lo, min(length, lo + QUERY_BLOCK), _last_key(mask, lo, min(length, lo + QUERY_BLOCK)))
            for lo in range(0, length, QUERY_BLOCK)]


def _by_kv_head(x: torch.Tensor, group: int) -> torch.Tensor:
    """[batch, heads, rows, n] -> [batch, kv heads, group x rows, n]: the query heads of a key/value head stacked."""
    batch, heads, rows, n = x.shape
    return x.reshape(batch, heads // group, group * rows, n)


def _last_key(mask: torch.Tensor | None, lo: int, hi: int) -> int:
    """One past the last key any query in rows lo..hi may attend to (hi for causal attention without a mask)."""
    if mask is None:
        return hi
    seen = mask[:, :, lo:hi].flatten(0, 2).any(0).nonzero()
    return int(seen[-1]) + 1 if len(seen) else 1


def _scores(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, lo: int, hi: int, end: int, scale: float,
            group: int) -> torch.Tensor:
    """The fp32 scaled, masked scores of query rows lo..hi against keys 0..end: [batch, heads, rows, end]."""
    batch, heads = q.shape[:2]
    scores = _by_kv_head(q[:, :, lo:hi], group).matmul(k[:, :, :end].transpose(-1, -2))
    scores = scores.view(batch, heads, hi - lo, end).float().mul_(scale)
    if mask is None:  # causal: row lo + i sees keys up to lo + i
        hidden = torch.ones(hi - lo, end - lo, dtype=torch.bool, device=q.device).triu_(1)
        scores[..., lo:].masked_fill_(hidden, -math.inf)
    else:
        scores.masked_fill_(~mask[:, :, lo:hi, :end], -math.inf)
    return scores


def block_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                            is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention interface (sdpa_attention_forward's arguments and output layout, [batch, length,
    heads, dim]): block_attention where it applies, SDPA otherwise."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    applies = (query.device.type == "cpu" and not dropout and kwargs.get("softcap") is None
               and kwargs.get("position_bias") is None and not kwargs.get("output_attentions", False)
               and query.size(2) == key.size(2) and query.size(1) % key.size(1) == 0
               and query.size(0) == key.size(0) == value.size(0)  # SDPA broadcasts a batch of one; the blocks do not
               and query.size(-1) == key.size(-1) == value.size(-1)  # MLA's values are narrower than its keys
               and query.dtype == key.dtype == value.dtype
               and (attention_mask.dtype == torch.bool if attention_mask is not None else causal))
    if not applies:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    scale = scaling if scaling is not None else query.size(-1) ** -0.5
    out, _ = block_attention(query, key, value, attention_mask, scale)
    return out.transpose(1, 2), None


def register_block_attention() -> str:
    """Make BLOCK_ATTENTION a transformers attention implementation (with SDPA's masks); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(BLOCK_ATTENTION, block_attention_forward)
    AttentionMaskInterface.register(BLOCK_ATTENTION, sdpa_mask)
    return BLOCK_ATTENTION


def use_block_attention(model: Any) -> bool:
    """Switch a transformers model that attends through SDPA to BLOCK_ATTENTION; False (and no change) where its
    attention is another or cannot be switched."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa" or not model._can_set_attn_implementation():
        return False
    model.set_attn_implementation(register_block_attention())
    return True
