"""Token-level loss and accuracy: the training step's numbers and the validation pass."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from worker.training.data import IGNORE_INDEX, EpochPlan, Example, batch_to_device, collate

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
    """Loss, perplexity and token accuracy over the batches of `plan`, with torchmetrics.

    In a multi-process run each process passes its share of the batches and torchmetrics sums the
    shares across processes. A sharded (FSDP) model needs the same number of forward passes in every
    process: `forward_passes` beyond len(plan) run on `filler` and count for nothing.
    """
    import torch
    from torchmetrics import MeanMetric
    from torchmetrics.classification import MulticlassAccuracy
    from torchmetrics.text import Perplexity

    vocab = model.config.vocab_size
    loss_mean = MeanMetric().to(device)
    perplexity = Perplexity(ignore_index=IGNORE_INDEX).to(device)
    accuracy = MulticlassAccuracy(num_classes=vocab, average="micro", ignore_index=IGNORE_INDEX).to(device)
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
                logits = forward_logits(model, batch).float()
            targets = batch["labels"][:, 1:]
            loss_sum, n_tokens, _ = token_loss_sum(logits, batch["labels"])
            if n_tokens == 0:
                continue
            # Token-weighted: a batch's mean loss counts as many times as it has labelled tokens.
            loss_mean.update(loss_sum / n_tokens, weight=n_tokens)
            perplexity.update(logits, targets)
            accuracy.update(logits.argmax(-1).reshape(-1), targets.reshape(-1))
    model.train(was_training)
    return {
        "loss": float(loss_mean.compute()),
        "perplexity": float(perplexity.compute()),
        "mean_token_accuracy": float(accuracy.compute()),
    }
