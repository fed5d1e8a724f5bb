"""The output layer's log-probabilities, a block of its weight at a time, with their gradient made in the forward
(logprobs.score_positions runs it for a frozen output layer, and without the gradient for evaluation). Imports torch:
import it where it runs."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from app.schemas.training import vocab_block_rows
from worker.training.fast_exp import exp_minus_
from worker.training.host import last_level_cache_bytes


class FusedHeadLogps(torch.autograd.Function):
    """score_positions under a frozen output layer: each target's log-probability and whether the argmax was
    right, with the gradient of each log-probability with respect to its hidden state made in the forward.

    d logp / d logits is (one-hot - softmax), times the derivative of the model's scale and softcap, so
    d logp / d hidden = (1 - p_target) W[target] - the sum of softmax x W over the other entries. One sweep over the
    output layer's weight, a block of its rows at a time, makes both: a block's logits, then its exponentials
    against the running maximum times the same block of the weight, added to the running sum (rescaled when the
    maximum grows, as flash attention does); the target's share is kept apart in fp32, so a confident position's
    small gradient is not lost to a bf16 product's rounding. Whether the argmax was right comes from each block's
    maximum and the largest logit before each target (argmax's first index on ties), not from each block's argmax,
    which took over ten times a maximum's time on a CPU. The output layer runs twice per position instead of
    three times (forward, recomputation, backward). On a CPU a block is vocab_block_rows(...) rows (longer for fewer
    positions, as long as the host's cache holds it): both products of a block run while it is in the cache, and no
    [positions, vocabulary] buffer is made; on a GPU the vocabulary is one block. `chunk_tokens` positions go
    through the sweep together. The backward only scales the kept [positions, hidden] gradient. Under autocast
    every product runs in the autocast dtype, as the unfused layer's would, and the sums are kept in fp32."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Linear, scale: float,
                softcap: float | None, chunk_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        logps, right, grads = _chunks(hidden, targets, head, scale, softcap, chunk_tokens, gradient=True)
        ctx.save_for_backward(grads)
        ctx.hidden_dtype = hidden.dtype
        ctx.mark_non_differentiable(right)
        return logps, right

    @staticmethod
    def backward(ctx: Any, grad_logps: torch.Tensor, _grad_correct: Any) -> tuple[Any, ...]:
        (unit,) = ctx.saved_tensors
        return (unit * grad_logps[:, None].float()).to(ctx.hidden_dtype), None, None, None, None, None


def head_logps(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Linear, scale: float,
               softcap: float | None, chunk_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FusedHeadLogps's log-probabilities and argmax without a gradient (evaluation, a reference model's scores):
    the same sweep over the output layer's weight without the gradient's products."""
    logps, right, _ = _chunks(hidden, targets, head, scale, softcap, chunk_tokens, gradient=False)
    return logps, right


def _chunks(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Linear, scale: float, softcap: float | None,
            chunk_tokens: int, *, gradient: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    weight, bias = head.weight, head.bias
    autocast = torch.is_autocast_enabled(hidden.device.type)
    dtype = torch.get_autocast_dtype(hidden.device.type) if autocast else weight.dtype
    parts = []
    for start in range(0, len(targets), chunk_tokens):
        h, t = hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        # On a GPU, where the sweep is unmeasured, the whole vocabulary is one block.
        block = (vocab_block_rows(len(t), row_bytes=weight.size(1) * dtype.itemsize,
                                  cache_bytes=last_level_cache_bytes())
                 if hidden.device.type == "cpu" else weight.size(0))
        parts.append(_sweep(h, t, weight, bias, scale, softcap, dtype, block=block, gradient=gradient))
    logps, right, grads = zip(*parts, strict=True)
    return torch.cat(logps), torch.cat(right), torch.cat(grads) if gradient else None


def _sweep(h: torch.Tensor, t: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: float,
           softcap: float | None, dtype: torch.dtype, *, block: int, gradient: bool
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One chunk of positions: (log-probability of each target, argmax right, d logp / d hidden in fp32 when
    `gradient`)."""
    n = len(t)
    rows = torch.arange(n, device=h.device)
    top = torch.full((n,), -torch.inf, device=h.device)  # running maximum of each position's logits
    total = torch.zeros(n, device=h.device)  # sum of exp(logit - top)
    # sum of exp(logit - top) x d logit / d hidden over every entry but the target; the target's own share, in
    # target_exp, stays out of the product: near p_target = 1 the gradient is a small difference, and a bf16
    # product's rounding of the whole softmax would swamp it
    spread = torch.zeros(n, h.size(-1), device=h.device)
    target_exp = torch.zeros(n, device=h.device)
    picked = torch.zeros(n, device=h.device)  # the target's logit
    picked_slope = torch.zeros(n, device=h.device)  # d logit / d (h . W[target]) at the target
    ahead = torch.full((n,), -torch.inf, device=h.device)  # the largest logit of an entry before the target
    lowest = torch.finfo(torch.float32).min  # the running maximum's floor: a block of -inf logits makes no NaN
    columns = torch.arange(min(block, weight.size(0)), device=h.device)
    low = h.to(dtype)
    for lo in range(0, weight.size(0), block):
        w = weight[lo : lo + block].to(dtype)
        # the autocast dtype's product, as the layer's own forward would make it under autocast
        logits = F.linear(low, w, None if bias is None else bias[lo : lo + block].to(dtype)).float()
        if scale != 1.0:
            logits.mul_(scale)
        slope = None
        if softcap is not None:  # logits = softcap x tanh(z / softcap): d logits / d z = 1 - tanh^2
            capped = logits.div_(softcap).tanh_()
            slope = 1 - capped.square() if gradient else None
            logits = capped.mul_(softcap)
        block_top = logits.amax(-1)
        inside = (t >= lo) & (t < lo + logits.size(1))
        at = (t - lo).clamp(0, logits.size(1) - 1)
        picked = torch.where(inside, logits[rows, at], picked)
        if inside.any():  # the targets in this block: the largest logit left of each, and every earlier block's
            here = inside.nonzero().squeeze(1)
            left = logits[here].masked_fill_(columns[: logits.size(1)] >= at[here, None], -torch.inf)
            ahead[here] = torch.maximum(top[here], left.amax(-1))
        new_top = torch.maximum(top, block_top).clamp_(min=lowest)
        shrink = (top - new_top).exp_()  # exp(-inf) = 0 on the first block
        exps = exp_minus_(logits, new_top[:, None])
        total = total * shrink + exps.sum(-1)
        if gradient:
            own = exps[rows, at]
            target_exp = target_exp * shrink + torch.where(inside, own, 0.0)
            exps[rows, at] = torch.where(inside, 0.0, own)
            if slope is not None:
                picked_slope = torch.where(inside, slope[rows, at], picked_slope)
                exps.mul_(slope)
            spread.mul_(shrink[:, None]).add_((exps.to(dtype) @ w).float())
        top = new_top
    logp = picked - (top + total.log())
    right = (picked >= top) & (picked > ahead)  # the largest logit, and none before it as large
    if not gradient:
        return logp, right, None
    # d logp / d hidden = scale x ((1 - p_t) slope_t W[t] - sum over v != t of p_v slope_v W[v]), 1 - p_t in fp32
    coefficient = 1 - target_exp / total
    if softcap is not None:
        coefficient.mul_(picked_slope)
    grad = weight[t].to(dtype).float().mul_(coefficient[:, None]).sub_(spread.div_(total[:, None]))
    if scale != 1.0:
        grad.mul_(scale)
    return logp, right, grad
