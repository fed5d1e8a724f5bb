"""The output layer's log-probabilities with their gradient made in the forward (logprobs.score_positions runs it
for a frozen output layer). Imports torch: import it where it runs."""

from __future__ import annotations

from typing import Any

import torch


class FusedHeadLogps(torch.autograd.Function):
    """score_positions under a frozen output layer: each target's log-probability and whether the argmax was
    right, with the gradient of each log-probability with respect to its hidden state made in the forward, one
    chunk at a time. d logp / d logits is (one-hot - softmax), times the derivative of the model's scale and
    softcap; the log-sum-exp and the softmax are made in place in the chunk's logits, so a chunk costs one fp32
    logits buffer (and, in bf16, the layer's output and the gradient's cast), the output layer runs twice per
    position instead of three times (forward, recomputation, backward), and the backward only scales the kept
    [positions, hidden] gradient. Under autocast every product runs in the autocast dtype, as the unfused
    layer's would."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Linear, scale: float,
                softcap: float | None, chunk_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        logps, correct, grads = [], [], []
        for start in range(0, len(targets), chunk_tokens):
            h, t = hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens]
            logits = head(h).float()
            if scale != 1.0:
                logits.mul_(scale)
            capped = None
            if softcap is not None:  # the one model family that needs a second buffer: tanh's derivative
                capped = logits.div_(softcap).tanh_()
                logits = capped * softcap
            picked = logits.gather(-1, t[:, None]).squeeze(-1)
            correct.append(logits.argmax(-1) == t)
            # log-sum-exp and then one-hot - softmax, in place over the logits (no second buffer)
            top = logits.amax(-1, keepdim=True)
            exps = logits.sub_(top).exp_()
            total = exps.sum(-1, keepdim=True)
            logps.append(picked - (top + total.log()).squeeze(-1))
            grad = exps.div_(total).neg_()
            grad.scatter_add_(-1, t[:, None], grad.new_ones(len(t), 1))
            if capped is not None:
                grad.mul_(1 - capped.square_())
            if scale != 1.0:
                grad.mul_(scale)
            weight = head.weight
            dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) \
                else weight.dtype
            # kept in fp32 ([positions, hidden]): the backward's scaling rounds once, as the unfused layer's does
            grads.append((grad.to(dtype) @ weight.to(dtype)).float())
            del logits, grad, capped
        ctx.save_for_backward(torch.cat(grads))
        ctx.hidden_dtype = hidden.dtype
        right = torch.cat(correct)
        ctx.mark_non_differentiable(right)
        return torch.cat(logps), right

    @staticmethod
    def backward(ctx: Any, grad_logps: torch.Tensor, _grad_correct: Any) -> tuple[Any, ...]:
        (unit,) = ctx.saved_tensors
        return (unit * grad_logps[:, None].float()).to(ctx.hidden_dtype), None, None, None, None, None
