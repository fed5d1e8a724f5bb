"""The preference-tuning (DPO) parts of the recipe: pairs instead of examples, the reference log-probabilities,
the pair loss of a step and the validation preference accuracy. recipe.py calls these where a supervised run
calls their supervised counterparts; everything else (set-up, resume, checkpoints, pause, processes) is shared.

The reference costs no second model: its log-probabilities are computed once, before the first step, by the
model as loaded (an adapter is disabled while they are, so a LoRA/QLoRA run's reference is its base model; a run
that continues from a fine-tuned adapter or a full fine-tune is scored as it starts, so an SFT -> DPO job's
reference is the SFT model). They are kept with the run's work files and in every checkpoint, so a resumed run
(on any host) uses the very same numbers. SimPO needs none.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worker.training.data import EpochPlan, batch_to_device, open_jsonl
from worker.training.evaluate import split_for_evaluation
from worker.training.preference import (
    PreferenceExample,
    collate_pairs,
    preference_loss,
    reference_logps,
    sequence_logps,
    tokenize_preference,
)
from worker.training.reporting import Reporter

if TYPE_CHECKING:
    import torch

    from worker.training.recipe import Run

# In the work directory and in every checkpoint: {"train": [n, 2], "valid": [m, 2]} (chosen, rejected) log-probs.
REFERENCE_FILE = "reference_logps.pt"
# What a DPO step and evaluation report, beside the loss (CSV columns, events, checkpoints).
TRAIN_METRICS = ("train_rewards_chosen", "train_rewards_rejected", "train_rewards_margin",
                 "train_preference_accuracy")
VALID_METRICS = ("preference_accuracy", "rewards_margin", "rewards_chosen", "rewards_rejected")


def load_pairs(path: Path, tokenizer: Any, *, max_seq_length: int, reporter: Reporter) -> list[PreferenceExample]:
    """Read and tokenise a preference JSONL file; answers longer than max_seq_length allows are cut (reported)."""
    pairs: list[PreferenceExample] = []
    truncated = 0
    with open_jsonl(path) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                pair = tokenize_preference(json.loads(line), tokenizer, max_seq_length=max_seq_length)
            except (json.JSONDecodeError, ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path.name} line {line_no}: {exc}") from exc
            truncated += pair.truncated
            pairs.append(pair)
    if truncated:
        reporter.event(f"{truncated} pair(s) in {path.name} had an answer cut to fit max_seq_length={max_seq_length} "
                       "tokens; raise max_seq_length to keep them whole", level="warn",
                       data={"file": path.name, "truncated": truncated, "max_seq_length": max_seq_length})
    if not pairs:
        raise ValueError(f"{path.name} has no preference pairs")
    return pairs


def pair_tokens(pair: PreferenceExample, *, packed: bool = True) -> int:
    """The tokens one pair puts through the model: its prompt once and each answer once in its packed row
    (preference.packed_pair_logps); where the model cannot take that row (preference.packs_pairs), two rows of the
    prompt and an answer, each as wide as the longer answer's (logprobs.labelled_logps). What batches are grouped
    and split into forward passes by."""
    if packed:
        return len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids)
    return 2 * (len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids)))


def collate(indexes: list[int], pairs: list[PreferenceExample], *, pad_id: int) -> dict[str, Any]:
    """collate_pairs for the pairs at `indexes`, remembering them (to look their reference up)."""
    import torch

    batch = collate_pairs([pairs[i] for i in indexes], pad_id=pad_id)
    batch["index"] = torch.tensor(indexes, dtype=torch.long)
    return batch


# ---------------------------------------------------------------- the reference
def disable_model_dropout(model: Any) -> None:
    """The model's own dropout off (its nn.Dropout layers and attention dropout; the adapters' follows the job's
    adapter.dropout, 0 unless it gives one): the policy is compared with a reference scored in eval mode, and with
    dropout the two differ before any update (TRL's DPOTrainer does the same by default)."""
    import torch

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout) and "lora_dropout" not in name:
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def setup_reference(run: Run, *, resume_from: Path | None, continued: bool) -> None:
    """The reference log-probabilities: a resumed run's from its checkpoint, a new run's computed now."""
    import torch

    preference = run.config.preference
    assert preference is not None
    disable_model_dropout(run.model)
    if preference.loss_type == "simpo":
        return  # reference-free
    saved = Path(resume_from) / REFERENCE_FILE if resume_from is not None else None
    if saved is not None and saved.is_file():
        run.reference = torch.load(saved, map_location="cpu", weights_only=True)
    elif resume_from is not None and (run.full or continued):
        raise ValueError(f"the checkpoint at {Path(resume_from).name} lacks the reference log-probabilities "
                         f"({REFERENCE_FILE}); this run's reference is its starting weights, which are gone")
    else:
        started = time.perf_counter()
        run.reference = {"train": _score_all(run, run.train_examples, adapter_off=not continued),
                         "valid": _score_all(run, run.valid_examples, adapter_off=not continued)}
        n = len(run.train_examples) + len(run.valid_examples)
        run.reporter.event(f"computed the reference log-probabilities of {n} pairs in "
                           f"{time.perf_counter() - started:.1f} s (one pass before training; no second model)",
                           data={"pairs": n})
    if run.procs.is_main:
        torch.save(run.reference, run.output_dir / REFERENCE_FILE)


def _score_all(run: Run, pairs: list[Any], *, adapter_off: bool) -> torch.Tensor:
    """[len(pairs), 2] (chosen, rejected) summed log-probs of the model as it is now, without gradients."""
    import torch

    table = torch.zeros((len(pairs), 2), dtype=torch.float32)
    lengths = [run.tokens(p) for p in pairs]
    order = sorted(range(len(pairs)), key=lambda i: lengths[i])
    size = run.config.batch_size
    # batches of batch_size pairs, each as forward passes within the evaluation's budget
    plan = split_for_evaluation([[[i] for i in order[start : start + size]] for start in range(0, len(order), size)],
                                lengths)
    was_training = run.model.training
    run.model.eval()
    try:
        for rows in plan:
            indexes = [i for row in rows for i in row]
            batch = batch_to_device(collate(indexes, pairs, pad_id=run.pad_id), run.device)
            with run.autocast():
                if adapter_off:
                    logps, _ = reference_logps(run.model, batch)
                else:
                    with torch.no_grad():
                        logps, _ = sequence_logps(run.model, batch)
            table[indexes] = logps.float().cpu().view(2, -1).T
    finally:
        run.model.train(was_training)
    return table


def save_reference(run: Run, checkpoint: Path) -> None:
    """Into a checkpoint directory, so a resume anywhere uses the same reference."""
    import torch

    if run.reference is not None:
        torch.save(run.reference, Path(checkpoint) / REFERENCE_FILE)


# ---------------------------------------------------------------- loss and evaluation
def pair_loss(run: Run, model: Any, batch: dict[str, Any], *, split: str) -> tuple[torch.Tensor, dict[str, float]]:
    """The summed loss of the batch's pairs (for the caller to normalise) and the sums the metrics need."""
    preference = run.config.preference
    assert preference is not None
    with run.autocast():
        logps, counts = sequence_logps(model, batch)
    k = logps.size(0) // 2
    reference = None if run.reference is None else run.reference[split][batch["index"].cpu()].to(logps.device)
    losses, chosen, rejected = preference_loss(
        logps[:k], logps[k:], None if reference is None else reference[:, 0],
        None if reference is None else reference[:, 1], loss_type=preference.loss_type, beta=preference.beta,
        chosen_lengths=counts[:k], rejected_lengths=counts[k:], label_smoothing=preference.label_smoothing,
        simpo_gamma=preference.simpo_gamma or 0.0, rpo_alpha=preference.rpo_alpha or 0.0)
    return losses.sum(), {"pairs": float(k), "chosen": float(chosen.sum()), "rejected": float(rejected.sum()),
                          "correct": float((chosen > rejected).sum())}


def step_metrics(sums: dict[str, float], pairs: int) -> dict[str, float]:
    """A step's means over its pairs (sums over every process's micro-batches)."""
    pairs = max(pairs, 1)
    return {"train_rewards_chosen": sums["chosen"] / pairs, "train_rewards_rejected": sums["rejected"] / pairs,
            "train_rewards_margin": (sums["chosen"] - sums["rejected"]) / pairs,
            "train_preference_accuracy": sums["correct"] / pairs}


def evaluate_pairs(run: Run, mine: EpochPlan) -> dict[str, float]:
    """Loss, preference accuracy and rewards on the validation pairs: `mine` is this process's share, one forward
    pass a batch (recipe.evaluate_on), and the processes' sums are added."""
    import torch

    from worker.training import distributed

    totals = {"loss": 0.0, "pairs": 0.0, "chosen": 0.0, "rejected": 0.0, "correct": 0.0}
    was_training = run.model.training
    run.model.eval()
    try:
        with torch.no_grad():
            for rows in mine:
                indexes = [i for row in rows for i in row]
                batch = batch_to_device(collate(indexes, run.valid_examples, pad_id=run.pad_id), run.device)
                loss_sum, sums = pair_loss(run, run.model, batch, split="valid")
                totals["loss"] += float(loss_sum)
                for key in ("pairs", "chosen", "rejected", "correct"):
                    totals[key] += sums[key]
    finally:
        run.model.train(was_training)
    loss, pairs, chosen, rejected, correct = distributed.all_sum(
        run.procs, [totals["loss"], totals["pairs"], totals["chosen"], totals["rejected"], totals["correct"]])
    pairs = max(pairs, 1.0)
    return {"loss": loss / pairs, "preference_accuracy": correct / pairs, "rewards_margin": (chosen - rejected) / pairs,
            "rewards_chosen": chosen / pairs, "rewards_rejected": rejected / pairs}
