from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from worker.training.data import IGNORE_INDEX, prompt_ids, tokenize_chat
from worker.training.preference import (
    PreferenceExample,
    PreferenceLossType,
    collate_pairs,
    packs_pairs,
    pair_mask,
    pair_metrics,
    preference_loss,
    reference_logps,
    sequence_logps,
    tokenize_preference,
)

# Three pairs of summed answer log-probs and answer token counts; the hand computations below use these numbers.
POLICY_CHOSEN = [-10.0, -20.0, -7.0]
POLICY_REJECTED = [-12.0, -18.0, -9.5]
REF_CHOSEN = [-11.0, -19.0, -8.0]
REF_REJECTED = [-11.5, -19.5, -10.0]
CHOSEN_LENGTHS = [4, 10, 2]
REJECTED_LENGTHS = [5, 8, 3]
# (policy - ref) for chosen: [1, -1, 1]; for rejected: [-0.5, 1.5, 0.5]; DPO's delta: [1.5, -2.5, 0.5].


def _loss(
    loss_type: PreferenceLossType, beta: float, *, with_ref: bool = True, **options: Any
) -> tuple[list[float], ...]:
    losses, chosen, rejected = preference_loss(
        torch.tensor(POLICY_CHOSEN),
        torch.tensor(POLICY_REJECTED),
        torch.tensor(REF_CHOSEN) if with_ref else None,
        torch.tensor(REF_REJECTED) if with_ref else None,
        loss_type=loss_type,
        beta=beta,
        chosen_lengths=torch.tensor(CHOSEN_LENGTHS),
        rejected_lengths=torch.tensor(REJECTED_LENGTHS),
        **options,
    )
    return losses.tolist(), chosen.tolist(), rejected.tolist()


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


# ---------------------------------------------------------------- losses against hand computations
def test_sigmoid_loss_is_dpo_on_the_difference_of_log_ratios() -> None:
    losses, chosen_rewards, rejected_rewards = _loss("sigmoid", 0.1)
    assert losses == pytest.approx([-_log_sigmoid(0.1 * 1.5), -_log_sigmoid(0.1 * -2.5), -_log_sigmoid(0.1 * 0.5)])
    assert chosen_rewards == pytest.approx([0.1, -0.1, 0.1])
    assert rejected_rewards == pytest.approx([-0.05, 0.15, 0.05])


def test_label_smoothing_makes_the_sigmoid_loss_conservative() -> None:
    losses, _, _ = _loss("sigmoid", 0.1, label_smoothing=0.2)
    expected = [-0.8 * _log_sigmoid(0.1 * d) - 0.2 * _log_sigmoid(-0.1 * d) for d in (1.5, -2.5, 0.5)]
    assert losses == pytest.approx(expected)
    # A pair the policy already gets right is pushed less hard than without smoothing.
    assert losses[0] > -_log_sigmoid(0.15)


def test_ipo_loss_normalises_each_log_ratio_by_its_answer_length() -> None:
    losses, chosen_rewards, _ = _loss("ipo", 0.1)
    # chosen log-ratio / length: 1/4, -1/10, 1/2; rejected: -0.5/5, 1.5/8, 0.5/3; target margin 1 / (2 * 0.1) = 5.
    expected = [(0.25 + 0.1 - 5) ** 2, (-0.1 - 0.1875 - 5) ** 2, (0.5 - 0.5 / 3 - 5) ** 2]
    assert losses == pytest.approx(expected)
    assert chosen_rewards == pytest.approx([0.1, -0.1, 0.1])  # rewards stay beta x the summed log-ratio, as TRL logs


def test_simpo_loss_is_reference_free_length_normalised_with_a_margin() -> None:
    losses, chosen_rewards, rejected_rewards = _loss("simpo", 2.0, with_ref=False, simpo_gamma=0.5)
    # mean log-probs, chosen: -2.5, -2, -3.5; rejected: -2.4, -2.25, -9.5/3; gamma / beta = 0.25.
    logits = [-2.5 + 2.4 - 0.25, -2.0 + 2.25 - 0.25, -3.5 + 9.5 / 3 - 0.25]
    assert losses == pytest.approx([-_log_sigmoid(2.0 * z) for z in logits])
    assert chosen_rewards == pytest.approx([-5.0, -4.0, -7.0])
    assert rejected_rewards == pytest.approx([-4.8, -4.5, -2 * 9.5 / 3])

    smoothed, _, _ = _loss("simpo", 2.0, with_ref=False, simpo_gamma=0.5, label_smoothing=0.1)
    assert smoothed == pytest.approx([-0.9 * _log_sigmoid(2 * z) - 0.1 * _log_sigmoid(-2 * z) for z in logits])


def test_rpo_alpha_adds_the_chosen_nll_per_token_over_the_whole_batch() -> None:
    plain, _, _ = _loss("sigmoid", 0.1)
    with_rpo, _, _ = _loss("sigmoid", 0.1, rpo_alpha=0.5)
    # 37 nats over 16 chosen tokens (a mean of per-answer means would be (2.5 + 2 + 3.5) / 3 instead).
    assert [b - a for a, b in zip(plain, with_rpo, strict=True)] == pytest.approx([0.5 * 37 / 16] * 3)


def test_pair_metrics_are_means_over_pairs() -> None:
    _, chosen_rewards, rejected_rewards = preference_loss(
        torch.tensor(POLICY_CHOSEN),
        torch.tensor(POLICY_REJECTED),
        torch.tensor(REF_CHOSEN),
        torch.tensor(REF_REJECTED),
        loss_type="sigmoid",
        beta=0.1,
        chosen_lengths=torch.tensor(CHOSEN_LENGTHS),
        rejected_lengths=torch.tensor(REJECTED_LENGTHS),
    )
    metrics = pair_metrics(chosen_rewards, rejected_rewards)
    assert metrics == pytest.approx(
        {
            "rewards/chosen": 0.1 / 3,
            "rewards/rejected": 0.15 / 3,
            "rewards/margins": (0.15 - 0.25 + 0.05) / 3,
            "rewards/accuracies": 2 / 3,
        }
    )


def test_loss_settings_that_cannot_apply_are_refused() -> None:
    with pytest.raises(ValueError, match="needs the reference log-probs"):
        _loss("sigmoid", 0.1, with_ref=False)
    with pytest.raises(ValueError, match='not "ipo"'):
        _loss("ipo", 0.1, label_smoothing=0.1)
    with pytest.raises(ValueError, match="unknown loss_type"):
        _loss("hinge", 0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="beta must be > 0"):
        _loss("sigmoid", 0.0)


# ---------------------------------------------------------------- the same numbers through TRL's own code
def _trl_dpo_loss(loss_types: list[str], loss_weights: list[float], beta: float) -> float:
    """TRL 1.16's DPOTrainer._compute_loss on a stand-in model whose per-token log-probs sum to the fixed numbers."""
    trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
    lengths = CHOSEN_LENGTHS + REJECTED_LENGTHS
    logps = POLICY_CHOSEN + POLICY_REJECTED
    width = max(lengths) + 1
    completion_mask = torch.zeros(len(lengths), width, dtype=torch.long)
    per_token = torch.zeros(len(lengths), width - 1)
    for row, (n, total) in enumerate(zip(lengths, logps, strict=True)):
        completion_mask[row, 1 : n + 1] = 1
        per_token[row, :n] = total / n
    outputs = SimpleNamespace(
        log_probs=per_token,
        entropy=torch.zeros_like(per_token),
        mean_logits=torch.zeros_like(per_token),
        is_top1=torch.zeros_like(per_token).bool(),
    )
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t, gather_for_metrics=lambda t: t)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=accelerator,
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=loss_types,
        loss_weights=loss_weights,
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(len(lengths), width, dtype=torch.long),
        "attention_mask": torch.ones(len(lengths), width, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": torch.tensor(REF_CHOSEN),
        "ref_rejected_logps": torch.tensor(REF_REJECTED),
    }
    loss = trl_dpo.DPOTrainer._compute_loss(trainer, lambda **kwargs: outputs, inputs, False)
    return float(loss)


@pytest.mark.parametrize(
    ("loss_type", "rpo_alpha", "trl_types", "trl_weights"),
    [
        ("sigmoid", 0.0, ["sigmoid"], [1.0]),
        ("ipo", 0.0, ["ipo"], [1.0]),
        ("sigmoid", 0.5, ["sigmoid", "sft"], [1, 0.5]),
    ],
)
def test_losses_match_trl_dpo_trainer(
    loss_type: PreferenceLossType, rpo_alpha: float, trl_types: list[str], trl_weights: list[float]
) -> None:
    losses, _, _ = _loss(loss_type, 0.1, rpo_alpha=rpo_alpha)
    assert sum(losses) / len(losses) == pytest.approx(_trl_dpo_loss(trl_types, trl_weights, 0.1), rel=1e-6)


@pytest.mark.parametrize(("loss_type", "gamma"), [("simpo", 0.5), ("sigmoid", 0.0)])
def test_label_smoothed_losses_match_trl_cpo_trainer(loss_type: PreferenceLossType, gamma: float) -> None:
    """CPOTrainer keeps TRL's conservative (label-smoothed) sigmoid and SimPO; its "sigmoid" has no reference, which
    is DPO with reference log-probs of zero."""
    cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    trainer = SimpleNamespace(
        alpha=0.0,
        beta=2.0,
        loss_type=loss_type,
        simpo_gamma=gamma,
        label_smoothing=0.1,
        accelerator=SimpleNamespace(device=torch.device("cpu")),
    )
    chosen, rejected = torch.tensor(POLICY_CHOSEN), torch.tensor(POLICY_REJECTED)
    if loss_type == "simpo":  # CPOTrainer averages the log-probs itself for SimPO
        chosen, rejected = chosen / torch.tensor(CHOSEN_LENGTHS), rejected / torch.tensor(REJECTED_LENGTHS)
    trl_losses, trl_chosen, trl_rejected = cpo.CPOTrainer.cpo_loss(trainer, chosen, rejected)
    zeros = torch.zeros(3)
    ours = preference_loss(
        torch.tensor(POLICY_CHOSEN),
        torch.tensor(POLICY_REJECTED),
        zeros,
        zeros,
        loss_type=loss_type,
        beta=2.0,
        chosen_lengths=torch.tensor(CHOSEN_LENGTHS),
        rejected_lengths=torch.tensor(REJECTED_LENGTHS),
        label_smoothing=0.1,
        simpo_gamma=gamma,
    )
    for mine, theirs in zip(ours, (trl_losses, trl_chosen, trl_rejected), strict=True):
        assert mine.tolist() == pytest.approx(theirs.tolist(), rel=1e-6)


# ---------------------------------------------------------------- data
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "say river stone"}]
PREFERRED = [{"role": "assistant", "content": "river stone"}]
NON_PREFERRED = [{"role": "assistant", "content": "apple music garden city"}]
RECORD = {"input": {"messages": MESSAGES}, "preferred_output": PREFERRED, "non_preferred_output": NON_PREFERRED}


def test_each_answer_is_tokenised_as_the_supervised_chat_with_that_turn(tokenizer: Any) -> None:
    example = tokenize_preference(RECORD, tokenizer, max_seq_length=256)
    assert example.prompt_ids == prompt_ids(tokenizer, {"messages": MESSAGES})
    batch = collate_pairs([example], pad_id=tokenizer.pad_token_id)
    for row, answer in ((0, PREFERRED), (1, NON_PREFERRED)):
        chat = tokenize_chat(tokenizer, MESSAGES + answer, train_on_inputs=False)
        n = len(chat.input_ids)
        assert batch["input_ids"][row, :n].tolist() == chat.input_ids
        assert batch["labels"][row, :n].tolist() == chat.labels
    assert tokenizer.decode(example.chosen_ids) == "river stone<|im_end|>\n"
    assert not example.truncated


def test_answers_are_truncated_and_the_prompt_kept_whole(tokenizer: Any) -> None:
    whole = tokenize_preference(RECORD, tokenizer, max_seq_length=256)
    cut = tokenize_preference(RECORD, tokenizer, max_seq_length=len(whole.prompt_ids) + 2)
    assert cut.prompt_ids == whole.prompt_ids
    assert (cut.chosen_ids, cut.rejected_ids) == (whole.chosen_ids[:2], whole.rejected_ids[:2])
    assert cut.truncated
    with pytest.raises(ValueError, match=f"the prompt is {len(whole.prompt_ids)} tokens, which leaves no room"):
        tokenize_preference(RECORD, tokenizer, max_seq_length=len(whole.prompt_ids))


def test_the_records_tools_reach_the_chat_template(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = "{% if tools %}{{ tools | tojson }}{% endif %}" + tokenizer.chat_template
    tools = [{"type": "function", "function": {"name": "lookup_river"}}]
    example = tokenize_preference(
        {**RECORD, "input": {"messages": MESSAGES, "tools": tools}}, tokenizer, max_seq_length=256
    )
    assert "lookup_river" in tokenizer.decode(example.prompt_ids)
    assert tokenizer.decode(example.chosen_ids) == "river stone<|im_end|>\n"


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ([], "expected a JSON object"),
        ({"preferred_output": PREFERRED, "non_preferred_output": NON_PREFERRED}, '"input" must be an object'),
        ({**RECORD, "input": {"messages": []}}, '"input.messages" must be a non-empty list'),
        ({**RECORD, "preferred_output": [{"role": "user", "content": "x"}]}, "assistant messages only"),
        ({**RECORD, "non_preferred_output": None}, '"non_preferred_output" must be a non-empty list'),
        ({**RECORD, "input": {"messages": [{"role": "robot", "content": "x"}]}}, "unknown role 'robot'"),
    ],
)
def test_malformed_records_are_refused_with_the_reason(tokenizer: Any, record: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tokenize_preference(record, tokenizer, max_seq_length=256)


def test_collate_pairs_puts_chosen_rows_first_and_labels_only_the_answers() -> None:
    examples = [PreferenceExample([1, 2, 3], [4, 5], [6]), PreferenceExample([7], [8, 9, 10], [11, 12])]
    batch = collate_pairs(examples, pad_id=0)
    x = IGNORE_INDEX
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [7, 8, 9, 10, 0], [1, 2, 3, 6, 0], [7, 11, 12, 0, 0]]
    assert batch["labels"].tolist() == [[x, x, x, 4, 5], [x, 8, 9, 10, x], [x, x, x, 6, x], [x, 11, 12, x, x]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 0], [0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]
    assert batch["n_tokens"] == 16


# ---------------------------------------------------------------- log-probs on the tiny model
def _pair_batch(tokenizer: Any) -> dict[str, Any]:
    other = {
        "input": {"messages": [{"role": "user", "content": "name a colour"}]},
        "preferred_output": [{"role": "assistant", "content": "blue"}],
        "non_preferred_output": [{"role": "assistant", "content": "the water is green and the light is red"}],
    }
    examples = [tokenize_preference(r, tokenizer, max_seq_length=256) for r in (RECORD, other)]
    return collate_pairs(examples, pad_id=tokenizer.pad_token_id)


def _naive_logps(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """The textbook computation: every position's full logits, log_softmax, pick the labels."""
    logits = (
        model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
            use_cache=False,
        )
        .logits[:, :-1]
        .float()
    )
    targets = batch["labels"][:, 1:]
    picked = logits.log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * (targets != IGNORE_INDEX)).sum(dim=1)


def _base_model(tiny_model: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model)


def _lora_model(tiny_model: Path) -> Any:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    # init_lora_weights=False: random B as well as A, so the adapter changes the outputs from the start.
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    return get_peft_model(_base_model(tiny_model), config)


def test_sequence_logps_matches_full_logits_while_scoring_only_answer_positions_in_chunks(
    tiny_model: Path, tokenizer: Any
) -> None:
    model = _base_model(tiny_model)
    batch = _pair_batch(tokenizer)
    head_inputs: list[tuple[int, ...]] = []
    model.lm_head.register_forward_hook(lambda _m, args, _out: head_inputs.append(tuple(args[0].shape)))
    logp_sum, n_tokens = sequence_logps(model, batch, chunk_tokens=3)
    head_inputs_of_ours = list(head_inputs)

    assert n_tokens.tolist() == (batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1).tolist()
    assert torch.allclose(logp_sum, _naive_logps(model, batch), atol=1e-5)
    # One forward of one row per pair (each prompt once, both answers after it); the model's own head ran on one
    # position per row, ours on chunks of at most 3 answer positions.
    pairs = batch["input_ids"].size(0) // 2
    hidden = model.config.hidden_size
    assert head_inputs_of_ours[0] == (pairs, 1, hidden)
    assert all(len(shape) == 2 and shape[0] <= 3 for shape in head_inputs_of_ours[1:])
    assert sum(shape[0] for shape in head_inputs_of_ours[1:]) == int(n_tokens.sum()) > 3


def test_a_pair_row_is_its_prompt_once_then_each_answer_seeing_the_prompt_and_itself() -> None:
    batch = collate_pairs([PreferenceExample([1, 2, 3], [4, 5], [6]), PreferenceExample([7, 8], [9], [10, 11])],
                          pad_id=0)
    assert batch["pair_ids"].tolist() == [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 0]]
    assert batch["pair_positions"].tolist()[0] == [0, 1, 2, 3, 4, 3]  # the rejected answer starts where the prompt ends
    assert batch["pair_positions"].tolist()[1][:5] == [0, 1, 2, 2, 3]
    mask = pair_mask(batch["pair_segments"])
    sees = mask[0, 0].int().tolist()
    assert sees[4] == [1, 1, 1, 1, 1, 0]  # the chosen answer's 2nd token: the prompt and the chosen answer so far
    assert sees[5] == [1, 1, 1, 0, 0, 1]  # the rejected answer: the prompt and itself, not the chosen answer
    assert mask[1, 0, 4].int().tolist() == [1, 1, 0, 1, 1, 0]
    assert mask[1, 0, 5].int().tolist() == [1, 1, 1, 1, 1, 0]  # padding: what comes before it, never padding
    # Each answer token is predicted by the position before it; an answer's first token by the prompt's last.
    assert batch["pair_targets"].tolist() == [4, 5, 6, 9, 10, 11]
    assert batch["pair_from"].tolist() == [2, 3, 2, 6 + 1, 6 + 1, 6 + 3]
    assert batch["pair_rows"].tolist() == [0, 0, 2, 1, 3, 3]  # chosen rows first, then the rejected ones
    assert batch["pair_counts"].tolist() == [2, 1, 1, 2]


def test_only_models_whose_positions_follow_position_ids_pack_pairs() -> None:
    """ALiBi (Falcon's alibi=True) biases attention by token index, so a rejected answer after the chosen one would
    sit at the wrong distance from its prompt; rotary models read position_ids."""
    from transformers import FalconConfig, FalconForCausalLM

    small = {"vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
             "attn_implementation": "sdpa"}
    assert packs_pairs(FalconForCausalLM(FalconConfig(**small, alibi=False)))
    assert not packs_pairs(FalconForCausalLM(FalconConfig(**small, alibi=True)))


def test_sequence_logps_keeps_one_row_per_pair_with_gradient_checkpointing(tiny_model: Path, tokenizer: Any) -> None:
    model = _lora_model(tiny_model)
    batch = _pair_batch(tokenizer)
    model.eval()
    with torch.no_grad():
        plain, _ = sequence_logps(model, batch)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    head_inputs: list[tuple[int, ...]] = []
    model.get_output_embeddings().register_forward_hook(lambda _m, args, _out: head_inputs.append(tuple(args[0].shape)))
    checkpointed, _ = sequence_logps(model, batch)
    assert head_inputs[0] == (batch["input_ids"].size(0) // 2, 1, model.config.hidden_size)
    assert torch.allclose(checkpointed, plain, atol=1e-5)


def test_sequence_logps_runs_every_row_whole_where_attention_cannot_take_the_pair_mask(
    tiny_model: Path, tokenizer: Any
) -> None:
    """Eager attention adds its mask as floats: the pair mask is SDPA's. The rows then run whole (one forward of
    2n rows), with the same numbers."""
    model = _lora_model(tiny_model)
    batch = _pair_batch(tokenizer)
    model.eval()
    with torch.no_grad():
        packed, _ = sequence_logps(model, batch)
        model.set_attn_implementation("eager")
        head_inputs: list[tuple[int, ...]] = []
        model.get_output_embeddings().register_forward_hook(
            lambda _m, args, _out: head_inputs.append(tuple(args[0].shape)))
        whole, _ = sequence_logps(model, batch)
    assert head_inputs[0] == (batch["input_ids"].size(0), 1, model.config.hidden_size)
    assert torch.allclose(whole, packed, atol=1e-5)


def test_sequence_logps_gradients_match_full_logits_on_a_lora_model(tiny_model: Path, tokenizer: Any) -> None:
    model = _lora_model(tiny_model)
    batch = _pair_batch(tokenizer)
    params = [p for p in model.parameters() if p.requires_grad]
    logp_sum, _ = sequence_logps(model, batch, chunk_tokens=4)
    ours = torch.autograd.grad(logp_sum.sum(), params)
    naive = _naive_logps(model, batch)
    theirs = torch.autograd.grad(naive.sum(), params)
    assert torch.allclose(logp_sum, naive, atol=1e-5)
    for mine, expected in zip(ours, theirs, strict=True):
        assert torch.allclose(mine, expected, atol=1e-5)


def test_sequence_logps_under_bf16_autocast_is_float32_and_close(tiny_model: Path, tokenizer: Any) -> None:
    model = _lora_model(tiny_model)
    batch = _pair_batch(tokenizer)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp_sum, _ = sequence_logps(model, batch, chunk_tokens=5)
        naive = _naive_logps(model, batch)
    assert logp_sum.dtype == torch.float32
    assert torch.allclose(logp_sum, naive, rtol=2e-2)


def test_sequence_logps_applies_the_models_logit_softcapping(tokenizer: Any) -> None:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        final_logit_softcapping=1.5,
        initializer_range=0.5,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Gemma2ForCausalLM(config)
    batch = _pair_batch(tokenizer)
    logp_sum, _ = sequence_logps(model, batch, chunk_tokens=7)
    assert torch.allclose(logp_sum, _naive_logps(model, batch), atol=1e-4)


def test_reference_logps_of_a_lora_model_are_the_base_models(tiny_model: Path, tokenizer: Any) -> None:
    model = _lora_model(tiny_model)
    model.train()
    batch = _pair_batch(tokenizer)
    with torch.no_grad():
        adapted = _naive_logps(model, batch)
        base = _naive_logps(_base_model(tiny_model), batch)
    assert (adapted - base).abs().max() > 0.1  # the adapter matters, so the comparison below means something

    ref, n_tokens = reference_logps(model, batch, chunk_tokens=3)
    assert torch.allclose(ref, base, atol=1e-5)
    assert not ref.requires_grad
    assert n_tokens.tolist() == (batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1).tolist()
    # Afterwards the adapter is on again and the model is back in training mode.
    assert model.training
    assert torch.allclose(sequence_logps(model, batch)[0], adapted, atol=1e-5)


def test_reference_logps_of_a_plain_model_are_its_own_without_gradients(tiny_model: Path, tokenizer: Any) -> None:
    model = _base_model(tiny_model)
    batch = _pair_batch(tokenizer)
    ref, _ = reference_logps(model, batch)
    assert not ref.requires_grad
    with torch.no_grad():
        assert torch.allclose(ref, _naive_logps(model, batch), atol=1e-5)


def test_a_developer_message_in_a_pair_renders_as_a_system_message(tokenizer: Any) -> None:
    """A pair's prompt may carry OpenAI's "developer" role (the upload accepts it): tokenised as "system"."""
    def pair(role: str) -> dict[str, Any]:
        return {"input": {"messages": [{"role": role, "content": "be brief"}, {"role": "user", "content": "hi"}]},
                "preferred_output": [{"role": "assistant", "content": "hello"}],
                "non_preferred_output": [{"role": "assistant", "content": "go away"}]}

    assert tokenize_preference(pair("developer"), tokenizer, max_seq_length=256) == tokenize_preference(
        pair("system"), tokenizer, max_seq_length=256)
