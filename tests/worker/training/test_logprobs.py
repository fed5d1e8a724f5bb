"""The supervised loss without the full logits: the same loss, accuracy and gradients as the full-logits path,
with the output layer run only at labelled positions, a chunk at a time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.worker.training.factories import chat_records
from worker.training.data import IGNORE_INDEX, collate, tokenize_record
from worker.training.evaluate import forward_logits, token_loss_sum
from worker.training.logprobs import token_loss


def lora_model(tiny_model: Path) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    return model


def full_model(tiny_model: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model)  # everything trains, the output layer too


@pytest.mark.parametrize(("make", "head_calls"), [(lora_model, 0), (full_model, 2)],
                         ids=["frozen-head", "trained-head"])
def test_the_chunked_loss_equals_the_full_logits_loss_and_gradients(tiny_model: Path, tokenizer: Any, make: Any,
                                                                     head_calls: int) -> None:
    """A frozen output layer (adapters) makes each chunk's gradient in the forward from blocks of its weight (the
    layer itself is not called); a trained one (full fine-tuning) recomputes each chunk in backward: it runs
    twice per labelled position."""
    examples = [tokenize_record(r, tokenizer, train_on_inputs=False) for r in chat_records(6, seed=3)]
    batch = collate([[i] for i in range(6)], examples, pad_id=tokenizer.pad_token_id or 0, packing=False)
    labelled = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert 0 < labelled < batch["labels"][:, 1:].numel() / 2  # the prompts carry no label
    model = make(tiny_model)
    full_loss, full_count, full_correct = token_loss_sum(forward_logits(model, batch), batch["labels"])
    full_loss.backward()
    full_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    head = (model.get_base_model() if hasattr(model, "get_base_model") else model).get_output_embeddings()
    seen: list[int] = []
    hook = head.register_forward_hook(lambda _m, args, _o: seen.append(args[0].shape[0] * args[0].shape[-2]
                                                                        if args[0].dim() == 3 else args[0].shape[0]))
    try:
        loss, count, correct = token_loss(model, batch, chunk_tokens=7)
        loss.backward()
    finally:
        hook.remove()
    assert (count, correct) == (full_count, full_correct) and count == labelled
    assert float(loss) == pytest.approx(float(full_loss), rel=1e-5)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == full_grads.keys() and grads
    worst = {n: float((grads[n] - full_grads[n]).abs().max() / full_grads[n].abs().max()) for n in grads}
    assert max(worst.values()) < 1e-4, worst
    # The output layer saw one position per row (the forward's logits_to_keep=1), then chunks of at most 7
    # labelled positions; never a whole batch.
    assert seen[0] == batch["input_ids"].shape[0] and max(seen[1:], default=0) <= 7
    assert sum(seen[1:]) == head_calls * labelled


class ProductShapes(TorchDispatchMode):
    """The output shapes of the matrix products run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            self.shapes.append(tuple(out.shape))
        return out


@pytest.mark.parametrize(("scale", "softcap", "bias"), [(1.0, None, False), (1.7, None, True), (0.5, 5.0, False)])
def test_the_fused_output_layer_matches_autograd_through_the_logits(
    scale: float, softcap: float | None, bias: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gradient made in the forward (one-hot - softmax, through the scale and the softcap's tanh), a block of
    the vocabulary at a time with the softmax's sums rescaled as the running maximum grows, is what autograd gives
    through the full logits, for any weights of the log-probabilities downstream (DPO's are not uniform); no
    product is wider than a block, and evaluation's scores are the same."""
    from worker.training import fused_head

    monkeypatch.setattr(fused_head, "vocab_block_rows", lambda positions, **_: 64)  # 8 blocks, the last one short
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 500, bias=bias).requires_grad_(False)
    hidden = torch.randn(37, 32, requires_grad=True)
    targets, weights = torch.randint(0, 500, (37,)), torch.randn(37)
    targets[:4] = torch.tensor([0, 63, 64, 499])  # each end of a block
    logits = head(hidden) * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    expected = logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    (expected * weights).sum().backward()
    expected_grad, hidden.grad = hidden.grad, None
    with ProductShapes() as products:
        logps, correct = fused_head.FusedHeadLogps.apply(hidden, targets, head, scale, softcap, 8)
    (logps * weights).sum().backward()
    assert torch.allclose(logps, expected, atol=1e-5)
    assert torch.equal(correct, logits.argmax(-1) == targets)
    assert float((hidden.grad - expected_grad).abs().max()) < 1e-5 * float(expected_grad.abs().max())
    assert products.shapes and max(rows * cols for rows, cols in products.shapes) <= 8 * 64
    # Without a gradient (evaluation): the same figures from one product per block instead of two.
    with torch.no_grad(), ProductShapes() as scoring:
        plain, plain_correct = fused_head.head_logps(hidden, targets, head, scale, softcap, 8)
    assert torch.allclose(plain, expected, atol=1e-5) and torch.equal(plain_correct, correct)
    assert len(scoring.shapes) * 2 == len(products.shapes)
    assert max(rows * cols for rows, cols in scoring.shapes) <= 8 * 64


def test_the_argmax_is_right_for_the_first_of_tied_logits_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whether the argmax was right comes from each block's maximum and the largest logit before each target, not
    from each block's argmax: a target tied with an earlier entry, in its own block or an earlier one, is wrong, and
    the first of the tied entries right, as argmax's first index has it; with the gradient and without."""
    from worker.training import fused_head

    monkeypatch.setattr(fused_head, "vocab_block_rows", lambda positions, **_: 64)
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 500, bias=False).requires_grad_(False)
    head.weight.copy_(torch.randint(-3, 4, (500, 8)).float())  # small integers: every logit exact, ties exact
    axis = torch.eye(8) * 9
    head.weight[[100, 300]] = axis[0]  # tied across blocks (1 and 4)
    head.weight[[65, 70]] = axis[1]  # tied within block 1
    head.weight[7] = axis[2]
    hidden = torch.eye(8)[[0, 0, 1, 1, 2, 2]].requires_grad_()
    targets = torch.tensor([100, 300, 65, 70, 7, 8])
    logits = head(hidden)
    assert torch.equal(logits.argmax(-1) == targets, torch.tensor([True, False, True, False, True, False]))
    _, correct = fused_head.FusedHeadLogps.apply(hidden, targets, head, 1.0, None, 8)
    with torch.no_grad():
        _, plain_correct = fused_head.head_logps(hidden, targets, head, 1.0, None, 8)
    assert torch.equal(correct, logits.argmax(-1) == targets) and torch.equal(plain_correct, correct)


def test_fewer_positions_sweep_the_vocabulary_in_longer_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sweep's block holds about VOCAB_BLOCK_LOGITS logits, within VOCAB_BLOCK_ROWS: a few positions (a pass's
    answers) take long blocks, a chunk of many positions short ones, and the log-probabilities do not change."""
    from app.schemas.training import VOCAB_BLOCK_LOGITS, VOCAB_BLOCK_ROWS, vocab_block_rows
    from worker.training import fused_head

    monkeypatch.setattr(fused_head, "last_level_cache_bytes", lambda: None)  # any host: no cache to fit
    low, high = VOCAB_BLOCK_ROWS
    assert vocab_block_rows(1) == high and vocab_block_rows(10**6) == low
    for positions in range(VOCAB_BLOCK_LOGITS // high, VOCAB_BLOCK_LOGITS // low + 1):
        assert 2**-0.5 <= positions * vocab_block_rows(positions) / VOCAB_BLOCK_LOGITS <= 2**0.5, positions
    torch.manual_seed(3)
    head = torch.nn.Linear(8, 3 * high, bias=False).requires_grad_(False)
    # 4 positions; 1,000; 1,030 in chunks of 1,024 and 6: each chunk's block from its own positions
    for positions, blocks in ((4, {high}), (1000, {low}), (1030, {low, high})):
        hidden, targets = torch.randn(positions, 8), torch.randint(0, 3 * high, (positions,))
        with torch.no_grad(), ProductShapes() as scoring:
            logps, _ = fused_head.head_logps(hidden, targets, head, 1.0, None, 1024)
        assert {cols for _, cols in scoring.shapes} == blocks
        expected = head(hidden).log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
        assert torch.allclose(logps, expected, atol=1e-5)


def test_a_block_takes_at_most_a_share_of_the_hosts_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """However few the positions, a block's weight takes at most 1/VOCAB_BLOCK_CACHE_SHARE of the last-level
    cache (a Zen 4's 32 MB: qwen2-152k's fp32 rows 2,048 at a time, bf16 ones 4,096), and the sweep's products
    follow it, in the product's own precision."""
    from app.schemas.training import VOCAB_BLOCK_CACHE_SHARE, VOCAB_BLOCK_ROWS, vocab_block_rows
    from worker.training import fused_head

    low, high = VOCAB_BLOCK_ROWS
    zen4 = 32 * 2**20
    assert vocab_block_rows(14) == high
    assert vocab_block_rows(14, row_bytes=896 * 4, cache_bytes=zen4) == 2048
    assert vocab_block_rows(14, row_bytes=896 * 2, cache_bytes=zen4) == 4096
    assert vocab_block_rows(10**6, row_bytes=896 * 2, cache_bytes=zen4) == low  # many positions: the rule's own
    assert vocab_block_rows(14, row_bytes=896 * 2, cache_bytes=2**40) == high  # a large cache: no cap
    torch.manual_seed(4)
    head = torch.nn.Linear(8, 3 * high, bias=False).requires_grad_(False)
    hidden, targets = torch.randn(4, 8), torch.randint(0, 3 * high, (4,))
    expected = head(hidden).log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    # fp32 rows of 8 are 32 bytes: this cache holds 1,024 of them in its share; bf16 rows twice as many
    monkeypatch.setattr(fused_head, "last_level_cache_bytes", lambda: VOCAB_BLOCK_CACHE_SHARE * 1024 * 32)
    for autocast, rows in ((False, 1024), (True, 2048)):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), ProductShapes() as scoring:
            logps, _ = fused_head.head_logps(hidden, targets, head, 1.0, None, 1024)
        assert {cols for _, cols in scoring.shapes} == {rows}
        assert torch.allclose(logps, expected, atol=0.1 if autocast else 1e-5)


def test_a_block_of_minus_infinity_logits_makes_no_nan(monkeypatch: pytest.MonkeyPatch) -> None:
    """A block whose logits are all -inf (a bias that rules entries out) adds nothing: no NaN from its maximum."""
    from worker.training import fused_head

    monkeypatch.setattr(fused_head, "vocab_block_rows", lambda positions, **_: 64)
    torch.manual_seed(2)
    head = torch.nn.Linear(16, 256, bias=True).requires_grad_(False)
    head.bias[:64] = -torch.inf  # the first block, so the running maximum starts at -inf
    hidden = torch.randn(5, 16, requires_grad=True)
    targets = torch.randint(64, 256, (5,))
    expected = head(hidden).log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    expected.sum().backward()
    expected_grad, hidden.grad = hidden.grad, None
    logps, _ = fused_head.FusedHeadLogps.apply(hidden, targets, head, 1.0, None, 8)
    logps.sum().backward()
    assert torch.allclose(logps, expected, atol=1e-5)
    assert torch.allclose(hidden.grad, expected_grad, atol=1e-5)


def test_the_fused_output_layer_under_bf16_autocast_stays_near_fp32() -> None:
    """Under autocast the products run in bf16 (as the layer's own would) and the sums in fp32. At a confident
    position (p_target 0.94 to 1) the gradient is a small difference: with the target's share kept out of the bf16
    product each row's gradient stays within 15% of fp32's (about 6% here, and 7% with the unblocked layer before the
    sweep); through the product it was 28% off."""
    from worker.training.fused_head import FusedHeadLogps

    torch.manual_seed(1)
    head = torch.nn.Linear(64, 5000, bias=False).requires_grad_(False)
    targets = torch.randint(0, 5000, (24,))
    hidden = torch.randn(24, 64) * 0.5
    confident = torch.arange(24) < 12
    rows = head.weight[targets[confident]]
    hidden[confident] += rows / rows.norm(dim=-1, keepdim=True) * torch.linspace(20, 40, 12)[:, None]
    hidden.requires_grad_(True)
    exact, _ = FusedHeadLogps.apply(hidden, targets, head, 1.0, None, 1024)
    exact.sum().backward()
    exact_grad, hidden.grad = hidden.grad, None
    assert float(exact[confident].exp().min()) > 0.9
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, _ = FusedHeadLogps.apply(hidden, targets, head, 1.0, None, 1024)
    low.sum().backward()
    assert low.dtype == torch.float32
    assert float((low - exact).abs().max()) < 0.05
    off = (hidden.grad - exact_grad).norm(dim=-1) / exact_grad.norm(dim=-1)
    assert float(off[confident].max()) < 0.15 and float(off[~confident].max()) < 0.01


def test_the_models_own_output_layer_computes_nothing_while_the_body_is_read(tiny_model: Path) -> None:
    """Its one position per row would be thrown away (and costs a copy of the whole weight per row on a CPU in
    bf16); afterwards the output layer is itself again."""
    from worker.training.logprobs import body_outputs

    model = lora_model(tiny_model)
    lm = model.get_base_model()
    head = lm.get_output_embeddings()
    outputs: list[tuple[int, ...]] = []
    head.register_forward_hook(lambda _m, _args, out: outputs.append(tuple(out.shape)))
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    with body_outputs(lm) as captured:
        returned = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits
    hidden = lm.config.hidden_size
    assert [tuple(h.shape) for h in captured] == [(2, 4, hidden)]
    assert outputs == [(2, 1, 0)] and returned.numel() == 0
    assert "forward" not in vars(head)  # the class's forward again
    assert tuple(head(captured[0]).shape) == (2, 4, lm.config.vocab_size)
    # A forward some library set on the instance is its forward again afterwards.
    head.forward = wrapped = lambda hidden: torch.zeros(hidden.shape[:-1] + (3,))
    with body_outputs(lm):
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    assert vars(head)["forward"] is wrapped and outputs[-1] == (2, 1, 0)
