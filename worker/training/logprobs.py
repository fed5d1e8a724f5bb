"""Log-probabilities of the labelled tokens of a batch without the full logits: what supervised training and
evaluation (the next-token loss and accuracy) and DPO (each answer's log-probability) compute from.

A vocabulary of 152k makes the output layer and its cross-entropy the largest tensors of a step (8 rows x 1,024
tokens x 151,936 classes are 5 GB of fp32 logits), and a chat's prompt tokens carry no label. So the model is called
as a whole (DDP's and PEFT's forward run) with logits_to_keep=1 and its own output layer idle, the decoder body's
last hidden states are taken with a forward hook, and the output layer runs only at positions whose next token is
labelled, LOGP_CHUNK_TOKENS positions at a time. With gradients on and a frozen output layer (LoRA, QLoRA, DoRA),
each chunk's gradient with respect to its hidden states is computed in the forward, in one sweep over blocks of the
output layer's weight (FusedHeadLogps; on a CPU no chunk's logits over the whole vocabulary are made); without gradients
(evaluation, the reference model) the same sweep scores any plain linear output layer; a trainable output layer (full
fine-tuning) has each chunk's logits made whole and recomputed in backward instead. Under FSDP the output layer's
weights are sharded outside the root module's forward, so sharded runs keep the full-logits path
(evaluate.forward_logits).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from app.schemas.training import LOGP_CHUNK_TOKENS
from worker.training.data import IGNORE_INDEX

if TYPE_CHECKING:
    import torch


@dataclass
class Scored:
    """The labelled tokens of a batch, flattened in row-major order."""

    logps: torch.Tensor  # [n] float32 log-probability of each labelled token (differentiable)
    correct: torch.Tensor  # [n] bool: the argmax was the label
    rows: torch.Tensor  # [n] the row of each token
    per_row: torch.Tensor  # [rows] labelled tokens per row


def without_ddp(model: Any) -> Any:
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def causal_lm(model: Any) -> Any:
    """The transformers causal LM inside DDP and PEFT wrappers."""
    model = without_ddp(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def logit_transform(config: Any) -> tuple[float, float | None]:
    """(scale, softcap) that the model's own forward applies to its head's output, read from its config as TRL's
    fused head reads them: Cohere's logit_scale, Granite's logits_scaling, Gemma's final_logit_softcapping, ..."""
    text = config.get_text_config()
    scale = getattr(text, "logit_scale", None)
    if scale is None:
        scale = getattr(text, "output_multiplier", None)
    if scale is None:
        scale = getattr(text, "lm_head_multiplier", None)
    if scale is None and getattr(text, "logits_scaling", None) is not None:
        scale = text.logits_scaling if text.model_type == "hyperclovax" else 1 / text.logits_scaling
    return (1.0 if scale is None else float(scale)), getattr(text, "final_logit_softcapping", None)


def _chunk_logps(
    head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, scale: float, softcap: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    logits = head(hidden).float()
    if scale != 1.0:
        logits = logits * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    return logps, logits.argmax(-1) == targets


def labelled_logps(model: Any, batch: dict[str, Any], *, chunk_tokens: int = LOGP_CHUNK_TOKENS) -> Scored:
    """Each labelled token's log-probability (and whether the argmax was right), never building the full logits.
    Works for plain and PEFT models, inside DDP, and under autocast."""
    lm = causal_lm(model)
    with body_outputs(lm) as captured:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              position_ids=batch.get("position_ids"), use_cache=False, logits_to_keep=1)
    hidden = captured[0]
    # No labelled token: an empty result still tied to the graph, so a backward through it runs (and DDP syncs).
    empty = hidden.float().flatten()[:0]

    targets = batch["labels"][:, 1:].to(hidden.device)
    labelled = targets != IGNORE_INDEX
    rows, cols = labelled.nonzero(as_tuple=True)
    # only the positions that predict a labelled token
    logps, correct = score_positions(lm, hidden[:, :-1][rows, cols], targets[rows, cols], empty=empty,
                                     chunk_tokens=chunk_tokens)
    return Scored(logps, correct, rows, labelled.sum(dim=1))


def score_positions(lm: Any, hidden: torch.Tensor, targets: torch.Tensor, *, empty: torch.Tensor,
                    chunk_tokens: int = LOGP_CHUNK_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """The log-probability of each target given the decoder's last hidden state at the position before it, and
    whether the argmax was right: the output layer `chunk_tokens` positions at a time. A frozen plain linear output
    layer has each chunk's gradient made in the forward (FusedHeadLogps), and without gradients any plain linear one
    is scored by the same sweep (fused_head.head_logps); a trainable one has each chunk recomputed in backward.
    `empty` (a 0-length tensor on the graph) is what no position gives."""
    import torch
    from torch.utils.checkpoint import checkpoint

    head = lm.get_output_embeddings()
    scale, softcap = logit_transform(lm.config)
    trains = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    if len(targets) and type(head) is torch.nn.Linear:
        from worker.training.fused_head import FusedHeadLogps, head_logps

        if not trains:
            return head_logps(hidden, targets, head, scale, softcap, chunk_tokens)
        if frozen_linear(head):
            return FusedHeadLogps.apply(hidden, targets, head, scale, softcap, chunk_tokens)
    logps, correct = [], []
    for start in range(0, len(targets), chunk_tokens):
        part = (head, hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens], scale, softcap)
        if torch.is_grad_enabled():
            chunk, right = checkpoint(_chunk_logps, *part, use_reentrant=False)
        else:
            chunk, right = _chunk_logps(*part)
        logps.append(chunk)
        correct.append(right)
    if not logps:
        return empty, torch.zeros(0, dtype=torch.bool, device=hidden.device)
    return torch.cat(logps), torch.cat(correct)


def frozen_linear(head: Any) -> bool:
    """Whether the output layer is a plain linear layer that trains nothing (its gradient is only its input's)."""
    import torch

    return type(head) is torch.nn.Linear and not any(p.requires_grad for p in head.parameters())


@contextlib.contextmanager
def body_outputs(lm: Any) -> Iterator[list[torch.Tensor]]:
    """Inside: the decoder body's last hidden states are collected, one tensor per call of the model, and the
    model's own output layer computes nothing (call the model with logits_to_keep=1; what it returns as logits
    is empty). Its one position per row would be thrown away, and on a CPU in bf16 torch computes it by copying
    the whole weight once per row (rows x vocabulary x hidden: 1.7-1.9 s and 1 GiB a forward at 151,936 x 896).
    Hooks on the output layer still see its input."""
    body, head = lm.base_model, lm.get_output_embeddings()
    if body is lm or head is None:
        raise ValueError(f"{type(lm).__name__} has no separate decoder body and output layer to score with")
    captured: list[torch.Tensor] = []

    def keep(_module: Any, _args: Any, output: Any) -> None:
        captured.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    hook = body.register_forward_hook(keep)
    wrapped = vars(head).get("forward")  # a forward set on the instance (accelerate's hooks do) is put back after
    head.forward = _no_logits  # an instance attribute: the module's class is untouched
    try:
        yield captured
    finally:
        hook.remove()
        if wrapped is None:
            del head.forward
        else:
            head.forward = wrapped


def _no_logits(hidden: torch.Tensor) -> torch.Tensor:
    return hidden[..., :0]


def token_loss(model: Any, batch: dict[str, Any], *, chunk_tokens: int = LOGP_CHUNK_TOKENS
               ) -> tuple[torch.Tensor, int, int]:
    """evaluate.token_loss_sum's (summed cross-entropy, labelled tokens, argmax-right tokens), without the full
    logits."""
    scored = labelled_logps(model, batch, chunk_tokens=chunk_tokens)
    return -scored.logps.sum(), int(scored.logps.numel()), int(scored.correct.sum())
