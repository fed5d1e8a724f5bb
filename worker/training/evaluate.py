"""Token-level loss and accuracy: the training step's numbers and the validation pass."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from app.schemas.training import forward_tokens
from worker.training.data import IGNORE_INDEX, EpochPlan, Example, batch_to_device, collate, split_by_tokens
from worker.training.logprobs import token_loss

if TYPE_CHECKING:
    import torch


def forward_logits(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Run the model on a collated batch and return logits aligned with `labels[:, 1:]`."""
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    if "position_ids" in batch:
        kwargs["position_ids"] = batch["position_ids"]
    return model(**kwargs).logits[:, :-1, :]


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Summed next-token cross-entropy over labelled tokens, their count, and how many were argmax-right.

    A sum, not a mean: the training step divides by the token count of the whole accumulated step so
    that every token weighs the same however the micro-batches are padded or split.
    """
    import torch.nn.functional as F

    targets = labels[:, 1:]
    loss = F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    mask = targets != IGNORE_INDEX
    correct = int(((logits.argmax(-1) == targets) & mask).sum())
    return loss, int(mask.sum()), correct


def split_for_evaluation(plan: EpochPlan, lengths: list[int]) -> EpochPlan:
    """Each batch of `plan` as forward passes within forward_tokens(False) tokens (a longer row alone), as training
    runs its batches; `lengths` are the examples' (or pairs') tokens. Evaluation's sums are the same, and a batch of
    long examples holds one pass's activations at a time, not the whole batch's."""
    budget = forward_tokens(False)
    return [part for batch in plan for part in split_by_tokens(batch, lengths, max_tokens=budget)]


def evaluate(
    model: Any,
    plan: EpochPlan,
    examples: list[Example],
    *,
    pad_id: int,
    device: torch.device,
    autocast: Callable[[], AbstractContextManager[Any]],
    forward_passes: int | None = None,
    filler: list[list[int]] | None = None,
) -> dict[str, float]:
    """Loss, perplexity and token accuracy over the batches of `plan`.

    In a multi-process run each process passes its share of the batches and torchmetrics sums the
    shares across processes. A sharded (FSDP) model needs the same number of forward passes in every
    process: `forward_passes` beyond len(plan) run on `filler` and count for nothing; it is scored from its full
    logits, any other model only at its labelled positions (logprobs.token_loss). Each batch of `plan` is one
    forward pass: split_for_evaluation makes them.
    """
    import torch
    from torchmetrics import SumMetric

    sharded = forward_passes is not None
    nll, tokens, right = (SumMetric().to(device) for _ in range(3))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for k in range(len(plan) if forward_passes is None else forward_passes):
            if k >= len(plan):
                assert filler is not None
                with autocast():
                    forward_logits(model, batch_to_device(collate(filler, examples, pad_id=pad_id, packing=False),
                                                          device))
                continue
            batch = batch_to_device(collate(plan[k], examples, pad_id=pad_id, packing=False), device)
            with autocast():
                if sharded:
                    loss_sum, n_tokens, correct = token_loss_sum(forward_logits(model, batch).float(), batch["labels"])
                else:
                    loss_sum, n_tokens, correct = token_loss(model, batch)
            nll.update(loss_sum.float())
            tokens.update(float(n_tokens))
            right.update(float(correct))
    model.train(was_training)
    count = max(float(tokens.compute()), 1.0)
    loss = float(nll.compute()) / count
    return {"loss": loss, "perplexity": math.exp(loss), "mean_token_accuracy": float(right.compute()) / count}
