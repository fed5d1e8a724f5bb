"""The output layer's log-probabilities, a block of its weight at a time, with their gradient made in the forward
(logprobs.score_positions runs it for a frozen output layer, and without the gradient for evaluation). Imports torch:
import it where it runs."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from app.schemas.training import VOCAB_BLOCK_ROWS


class FusedHeadLogps(torch.autograd.Function):
    """score_positions under a frozen output layer: each target's log-probability and whether the argmax was
    right, with the gradient of each log-probability with respect to its hidden state made in the forward.

    d logp / d logits is (one-hot - softmax), times the derivative of the model's scale and softcap, so
    d logp / d hidden = W[target] (its one-hot share) - sum over the vocabulary of softmax x W. One sweep over the
    output layer's weight, VOCAB_BLOCK_ROWS rows at a time, makes both: a block's logits, then its exponentials
    against the running maximum times the same block of the weight, added to the running sum (rescaled when the
    maximum grows, as flash attention does). Both products of a block run while it is in the cache, the output layer
    runs twice per position instead of three times (forward, recomputation, backward), and no [positions,
    vocabulary] buffer is made (on a CPU: VOCAB_BLOCK_ROWS); `chunk_tokens` positions go through the sweep
    together. The backward only scales the kept [positions, hidden] gradient. Under autocast every product runs in
    the autocast dtype, as the unfused layer's would, and the sums are kept in fp32."""

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
    # On a GPU, where the sweep is unmeasured, the whole vocabulary is one block: the unblocked layer's products.
    block = VOCAB_BLOCK_ROWS if hidden.device.type == "cpu" else weight.size(0)
    parts = [_sweep(hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens], weight, bias, scale,
                    softcap, dtype, block=block, gradient=gradient) for start in range(0, len(targets), chunk_tokens)]
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
    spread = torch.zeros(n, h.size(-1), device=h.device)  # sum of exp(logit - top) x d logit / d hidden
    picked = torch.zeros(n, device=h.device)  # the target's logit
    picked_slope = torch.zeros(n, device=h.device)  # d logit / d (h . W[target]) at the target
    best = torch.full((n,), -torch.inf, device=h.device)  # running argmax: its logit and index
    best_at = torch.zeros(n, dtype=torch.long, device=h.device)
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
        block_top, block_at = logits.max(-1)
        better = block_top > best
        best = torch.where(better, block_top, best)
        best_at = torch.where(better, block_at + lo, best_at)
        inside = (t >= lo) & (t < lo + logits.size(1))
        at = (t - lo).clamp(0, logits.size(1) - 1)
        picked = torch.where(inside, logits[rows, at], picked)
        if slope is not None:
            picked_slope = torch.where(inside, slope[rows, at], picked_slope)
        new_top = torch.maximum(top, block_top)
        shrink = (top - new_top).exp_()  # exp(-inf) = 0 on the first block
        exps = logits.sub_(new_top[:, None]).exp_()
        total = total * shrink + exps.sum(-1)
        if gradient:
            if slope is not None:
                exps.mul_(slope)
            spread.mul_(shrink[:, None]).add_((exps.to(dtype) @ w).float())
        top = new_top
    logp = picked - (top + total.log())
    if not gradient:
        return logp, best_at == t, None
    # d logp / d hidden = scale x (slope_t x W[t] - sum_v softmax_v x slope_v x W[v])
    own = weight[t].to(dtype).float()
    if softcap is not None:
        own.mul_(picked_slope[:, None])
    grad = own.sub_(spread.div_(total[:, None]))
    if scale != 1.0:
        grad.mul_(scale)
    return logp, best_at == t, grad
