"""Preference tuning (DPO and its kin): pair records -> one padded batch -> sequence log-probs -> pair losses.

A pair is one prompt with a preferred and a non-preferred answer (OpenAI's DPO format). Each pair runs as one row:
its prompt once, then both answers, each continuing the prompt's positions and masked so it sees the prompt and
itself only; where the model cannot take that row (packs_pairs: attention other than SDPA, sliding windows,
recurrent layers, positions other than rotary embeddings of position_ids) each answer runs as a whole row after its
prompt (the chosen rows first, the rejected rows after them). Each answer is scored by the summed log-probability of
its tokens. The losses follow TRL's formulas (trl 1.16: DPOTrainer for "sigmoid" and "ipo", CPOTrainer for "simpo"
and for label smoothing) so that a job's beta, label_smoothing and simpo_gamma mean what they mean there.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from app.schemas.files import CHAT_ROLES
from app.schemas.training import LOGP_CHUNK_TOKENS
from worker.training.data import IGNORE_INDEX, check_tools, render_chat
from worker.training.logprobs import Scored, body_outputs, causal_lm, labelled_logps, score_positions, without_ddp

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

PreferenceLossType = Literal["sigmoid", "ipo", "simpo"]
# The segments of a packed pair row (collate_pairs' pair_segments).
PADDING, PROMPT, CHOSEN, REJECTED = -1, 0, 1, 2


@dataclass
class PreferenceExample:
    """One tokenised pair: the prompt (with the generation prompt) and each answer's tokens through its end of turn."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: bool = False  # an answer was cut to fit max_seq_length


# ---------------------------------------------------------------- data
def _check_messages(messages: Any, where: str, *, answer: bool) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where} must be a non-empty list of messages")
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(f'every message in {where} needs a string "role"')
        if message["role"] not in CHAT_ROLES:
            raise ValueError(f"unknown role {message['role']!r} in {where}")
        if answer and message["role"] != "assistant":
            raise ValueError(f"{where} must hold assistant messages only, not {message['role']!r}")
    return messages


def tokenize_preference(record: Any, tokenizer: PreTrainedTokenizerBase, *, max_seq_length: int) -> PreferenceExample:
    """Tokenise one OpenAI DPO record: `{"input": {"messages", "tools"?}, "preferred_output", "non_preferred_output"}`.

    Each answer is tokenised exactly as data.tokenize_chat renders that assistant turn after the prompt: the prompt
    with the generation prompt, then the rest of the conversation through the end of turn. The prompt is kept
    whole and answers are cut to fit max_seq_length; ValueError when the prompt alone leaves no room.
    """
    if not isinstance(record, dict):
        raise ValueError("expected a JSON object")
    source = record.get("input")
    if not isinstance(source, dict):
        raise ValueError('"input" must be an object with "messages"')
    messages = _check_messages(source.get("messages"), '"input.messages"', answer=False)
    tools = check_tools(source.get("tools"), "input.tools")
    chosen = _check_messages(record.get("preferred_output"), '"preferred_output"', answer=True)
    rejected = _check_messages(record.get("non_preferred_output"), '"non_preferred_output"', answer=True)
    if not tokenizer.chat_template:
        raise ValueError("this model has no chat template; preference (DPO) data needs one")

    prompt = render_chat(tokenizer, messages, generation=True, tools=tools)
    answers = []
    for answer in (chosen, rejected):
        full = render_chat(tokenizer, messages + answer, generation=False, tools=tools)
        if full[: len(prompt)] != prompt:
            raise ValueError("the chat template is not prefix-stable; cannot find the answer's tokens")
        answers.append(full[len(prompt) :])
    room = max_seq_length - len(prompt)
    if room < 1:
        raise ValueError(
            f"the prompt is {len(prompt)} tokens, which leaves no room for an answer within "
            f"max_seq_length={max_seq_length}; raise max_seq_length or shorten the prompt"
        )
    truncated = any(len(ids) > room for ids in answers)
    return PreferenceExample(prompt, answers[0][:room], answers[1][:room], truncated=truncated)


def collate_pairs(examples: list[PreferenceExample], *, pad_id: int) -> dict[str, Any]:
    """A micro-batch of pairs in two layouts. Whole rows (input_ids, labels, ...): rows 0..n-1 are each prompt with
    its chosen answer, rows n..2n-1 with its rejected one; labels are IGNORE_INDEX on the prompt and the padding, so
    a row's labelled tokens are exactly its answer. And one row per pair (pair_*, _packed_pairs), which
    sequence_logps uses where the model allows it. Both are small CPU tensors; the model runs one of them.
    """
    import torch

    rows = [(e.prompt_ids, e.chosen_ids) for e in examples] + [(e.prompt_ids, e.rejected_ids) for e in examples]
    width = max(len(prompt) + len(answer) for prompt, answer in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (prompt, answer) in enumerate(rows):
        n = len(prompt) + len(answer)
        input_ids[r, :n] = torch.tensor(prompt + answer)
        labels[r, len(prompt) : n] = torch.tensor(answer)
        attention_mask[r, :n] = 1
        position_ids[r, :n] = torch.arange(n)
        position_ids[r, n:] = torch.arange(width - n)  # as data.collate: padding restarts at 0
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "position_ids": position_ids,
        "n_tokens": int(attention_mask.sum()),
        **_packed_pairs(examples, pad_id=pad_id),
    }


def _packed_pairs(examples: list[PreferenceExample], *, pad_id: int) -> dict[str, Any]:
    """The same pairs as one row each (packed_pair_logps): prompt, chosen answer, rejected answer, right-padded,
    both answers' positions continuing the prompt's, and each token's segment (pair_mask makes the attention mask
    of them where it is used). pair_from indexes the flattened [pairs x width] hidden states: the position that
    predicts each answer token (pair_targets), in the row order of the whole-row layout (pair_rows: chosen r,
    rejected n + r)."""
    import torch

    n = len(examples)
    width = max(len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in examples)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    positions = torch.zeros((n, width), dtype=torch.long)
    segment = torch.full((n, width), PADDING, dtype=torch.long)
    sources: list[int] = []
    targets: list[int] = []
    rows: list[int] = []
    for r, e in enumerate(examples):
        p, c, k = len(e.prompt_ids), len(e.chosen_ids), len(e.rejected_ids)
        ids[r, : p + c + k] = torch.tensor(e.prompt_ids + e.chosen_ids + e.rejected_ids)
        positions[r, : p + c] = torch.arange(p + c)
        positions[r, p + c : p + c + k] = torch.arange(p, p + k)
        segment[r, :p], segment[r, p : p + c], segment[r, p + c : p + c + k] = PROMPT, CHOSEN, REJECTED
        at = r * width
        # The first token of either answer is predicted by the prompt's last position, the others by the one before.
        sources += [at + p - 1 + j for j in range(c)] + [at + (p - 1 if j == 0 else p + c + j - 1) for j in range(k)]
        targets += e.chosen_ids + e.rejected_ids
        rows += [r] * c + [n + r] * k
    counts = [len(e.chosen_ids) for e in examples] + [len(e.rejected_ids) for e in examples]
    return {"pair_ids": ids, "pair_positions": positions, "pair_segments": segment, "pair_from": _longs(sources),
            "pair_targets": _longs(targets), "pair_rows": _longs(rows), "pair_counts": _longs(counts)}


def _longs(values: list[int]) -> torch.Tensor:
    import torch

    return torch.tensor(values, dtype=torch.long)


def pair_mask(segments: torch.Tensor) -> torch.Tensor:
    """The [pairs, 1, width, width] attention mask of packed pair rows (True: may attend), made on the segments'
    device: causal, and each answer sees the prompt and itself only; padding sees what comes before it."""
    import torch

    width = segments.size(1)
    query, key = segments[:, :, None], segments[:, None, :]
    causal = torch.ones((width, width), dtype=torch.bool, device=segments.device).tril()
    allowed = (key == PROMPT) | (key == query) | (query == PADDING)
    return (causal & (key != PADDING) & allowed)[:, None]


# ---------------------------------------------------------------- log-probs
def sequence_logps(
    model: Any, batch: dict[str, Any], *, chunk_tokens: int = LOGP_CHUNK_TOKENS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of a collated batch (chosen rows, then rejected rows): the summed log-probability (float32) of its
    answer's tokens, and their count, without the full logits: one row per pair where the model's attention takes
    the pair mask (packed_pair_logps), else every answer as a whole row after its prompt (logprobs.labelled_logps)."""
    if "pair_ids" in batch and packs_pairs(model):
        scored = packed_pair_logps(model, batch, chunk_tokens=chunk_tokens)
    else:
        scored = labelled_logps(model, batch, chunk_tokens=chunk_tokens)
    logp_sum = scored.logps.new_zeros(batch["labels"].size(0)).index_add(0, scored.rows, scored.logps)
    return logp_sum, scored.per_row


def packs_pairs(model: Any) -> bool:
    """Whether the model attends as the pair mask and positions say: SDPA (and the CPU's block attention) takes a custom
    4D mask as it is; rotary position embeddings follow position_ids (ALiBi and learned positions follow the token index
    or the 2D mask); and every layer must be plain full attention (a sliding window or a recurrent layer needs masks of
    its own)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    from worker.training.attention import BLOCK_ATTENTION

    lm = causal_lm(model)
    text = lm.config.get_text_config()
    if getattr(lm.config, "_attn_implementation", None) not in ("sdpa", BLOCK_ATTENTION):
        return False
    if getattr(text, "rope_parameters", None) is None or getattr(text, "alibi", False):
        return False
    try:
        cache = DynamicCache(config=lm.config)
    except (AttributeError, KeyError, TypeError, ValueError):
        return False
    return bool(cache.layers) and all(type(layer) is DynamicLayer for layer in cache.layers)


def packed_pair_logps(model: Any, batch: dict[str, Any], *, chunk_tokens: int = LOGP_CHUNK_TOKENS) -> Scored:
    """labelled_logps of a pair batch in one forward of one row per pair (collate_pairs' pair_* layout): each prompt
    runs once for both its answers, padding is only up to the longest pair, and the output layer runs only at the
    positions that predict an answer token."""
    lm = causal_lm(model)
    with body_outputs(lm) as captured:
        model(input_ids=batch["pair_ids"], attention_mask=pair_mask(batch["pair_segments"]),
              position_ids=batch["pair_positions"], use_cache=False, logits_to_keep=1)
    hidden = captured[0]
    flat = hidden.reshape(-1, hidden.size(-1))[batch["pair_from"]]
    logps, correct = score_positions(lm, flat, batch["pair_targets"], empty=hidden.float().flatten()[:0],
                                     chunk_tokens=chunk_tokens)
    return Scored(logps, correct, batch["pair_rows"], batch["pair_counts"])


def reference_logps(
    model: Any, batch: dict[str, Any], *, chunk_tokens: int = LOGP_CHUNK_TOKENS
) -> tuple[torch.Tensor, torch.Tensor]:
    """sequence_logps of the reference model, without gradients and without dropout (eval mode, restored after).

    For a PEFT model the reference is the base model: the same weights with the adapter disabled, so no copy is
    needed. A plain model is scored as it is; for full fine-tuning, call this before training starts and keep the
    numbers (the weights then move away from the reference).
    """
    import torch
    from peft import PeftModel

    inner = without_ddp(model)
    adapter_off = inner.disable_adapter() if isinstance(inner, PeftModel) else contextlib.nullcontext()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), adapter_off:
            return sequence_logps(model, batch, chunk_tokens=chunk_tokens)
    finally:
        model.train(was_training)


# ---------------------------------------------------------------- losses
def preference_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor | None,
    ref_rejected: torch.Tensor | None,
    *,
    loss_type: PreferenceLossType,
    beta: float,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.0,
    rpo_alpha: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss per pair and the (detached) chosen and rejected rewards, from summed answer log-probs and token counts.

    - "sigmoid": DPO, -log sigmoid(beta * (chosen log-ratio - rejected log-ratio)); label_smoothing > 0 makes it
      conservative DPO (the preference is taken as flipped with that probability).
    - "ipo": (delta - 1 / (2 beta))^2 where, as in TRL, each log-ratio is divided by its answer's token count.
    - "simpo": reference-free (refs may be None): mean per-token log-probs, a margin of simpo_gamma, and
      label_smoothing as in "sigmoid"; rewards are beta times the mean log-probs (TRL's CPOTrainer).
    rpo_alpha adds rpo_alpha times the chosen answers' NLL per token, counted over all chosen tokens of the batch
    (TRL's "sft" loss term), to every pair; the mean over pairs is then TRL's loss.
    """
    import torch.nn.functional as F

    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type == "ipo":
        raise ValueError('label_smoothing applies to loss_type "sigmoid" and "simpo", not "ipo"; set it to 0')
    chosen_n, rejected_n = chosen_lengths.float().clamp(min=1), rejected_lengths.float().clamp(min=1)
    policy_chosen, policy_rejected = policy_chosen.float(), policy_rejected.float()

    if loss_type == "simpo":
        chosen_scores, rejected_scores = policy_chosen / chosen_n, policy_rejected / rejected_n
        logits = chosen_scores - rejected_scores - simpo_gamma / beta
        losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    elif loss_type in ("sigmoid", "ipo"):
        if ref_chosen is None or ref_rejected is None:
            raise ValueError(f'loss_type "{loss_type}" needs the reference log-probs')
        chosen_scores, rejected_scores = policy_chosen - ref_chosen.float(), policy_rejected - ref_rejected.float()
        if loss_type == "sigmoid":
            delta = chosen_scores - rejected_scores
            losses = -F.logsigmoid(beta * delta) * (1 - label_smoothing) - F.logsigmoid(-beta * delta) * label_smoothing
        else:
            # Without the length normalisation the squared loss grows with answer length; TRL's comment says the IPO
            # authors confirmed their results use this normalised form.
            delta = chosen_scores / chosen_n - rejected_scores / rejected_n
            losses = (delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f'unknown loss_type {loss_type!r}; use "sigmoid", "ipo" or "simpo"')

    if rpo_alpha:
        losses = losses + rpo_alpha * chosen_nll(policy_chosen, chosen_lengths)
    return losses, beta * chosen_scores.detach(), beta * rejected_scores.detach()


def chosen_nll(policy_chosen: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """The chosen answers' negative log-likelihood per token, over all their tokens together (RPO's term)."""
    return -policy_chosen.float().sum() / chosen_lengths.sum().clamp(min=1)


def pair_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, float]:
    """Means over pairs under the names TRL logs: rewards/chosen, rewards/rejected, rewards/margins and
    rewards/accuracies (the share of pairs whose chosen reward is strictly higher)."""
    return {
        "rewards/chosen": float(chosen_rewards.float().mean()),
        "rewards/rejected": float(rejected_rewards.float().mean()),
        "rewards/margins": float((chosen_rewards - rejected_rewards).float().mean()),
        "rewards/accuracies": float((chosen_rewards > rejected_rewards).float().mean()),
    }
