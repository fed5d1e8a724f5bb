"""The CPU's block attention: the output and gradients of softmax attention under every mask training makes, SDPA
wherever it does not apply, and a bf16 CPU job's model attends with it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from tests.worker.training.factories import make_config
from worker.training import attention
from worker.training.attention import BLOCK_ATTENTION, block_attention, block_attention_forward
from worker.training.model import load_model
from worker.training.preference import packs_pairs

LENGTH = 150  # more than two query blocks, the last one partial


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax attention in float64, each key/value head repeated for its query heads; a query that sees no key
    gets zeros."""
    group = q.size(1) // k.size(1)
    scores = q.double() @ k.double().repeat_interleave(group, 1).transpose(-1, -2) * scale
    probs = torch.softmax(scores.masked_fill(~mask, -torch.inf), -1).nan_to_num(0.0)
    return probs @ v.double().repeat_interleave(group, 1)


def masks() -> dict[str, torch.Tensor | None]:
    causal = torch.ones(LENGTH, LENGTH, dtype=torch.bool).tril()
    keys = torch.zeros(2, LENGTH, dtype=torch.bool)
    keys[0], keys[1, :97] = True, True  # the second row is padded after 97 tokens
    padded = causal[None, None] & keys[:, None, None, :]
    sequence = torch.tensor([0] * 70 + [1] * 80)  # two examples packed in a row
    packed = (causal & (sequence[:, None] == sequence[None, :]))[None, None].expand(2, 1, LENGTH, LENGTH)
    blind = padded.clone()
    blind[1, :, 5] = False  # a query that may attend to no key
    return {"causal (no mask)": None, "padding": padded, "packed": packed, "a query without keys": blind}


@pytest.mark.parametrize("name", list(masks()))
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_block_attention_gives_softmax_attention_and_its_gradients(name: str, dtype: torch.dtype,
                                                                   tolerance: float) -> None:
    mask = masks()[name]
    full = mask if mask is not None else torch.ones(LENGTH, LENGTH, dtype=torch.bool).tril()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, heads, LENGTH, 16, generator=g).to(dtype).requires_grad_() for heads in (6, 2, 2))
    grad = torch.randn(2, 6, LENGTH, 16, generator=g).to(dtype)

    out, _ = block_attention(q, k, v, mask, 0.25)
    out.backward(grad)
    exact = [t.detach().double().requires_grad_() for t in (q, k, v)]
    expected = reference(*exact, full, 0.25)
    expected.backward(grad.double())

    for ours, theirs in zip([out, q.grad, k.grad, v.grad], [expected, *(t.grad for t in exact)], strict=True):
        assert ours.dtype == dtype
        assert torch.isfinite(ours).all()
        assert (ours.double() - theirs).abs().max() <= tolerance * theirs.abs().max()
    if name == "a query without keys":
        assert out[1, :, 5].abs().max() == 0


def test_the_attention_interface_hands_what_blocks_do_not_cover_to_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    module = torch.nn.Module()
    module.is_causal = True
    module.num_key_value_groups = 3
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(1, 2, 9, 16, generator=g), torch.randn(1, 2, 9, 16, generator=g)
    one_query = torch.randn(1, 6, 1, 16, generator=g)  # generation with a cache: one query, nine keys
    float_mask = torch.zeros(1, 1, 9, 9)
    query = torch.randn(1, 6, 9, 16, generator=g)
    cases = [(one_query, k, v, None, {}), (query, k, v, float_mask, {}),
             (query, k, v, None, {"dropout": 0.0, "is_causal": False}),
             (query, k, v[..., :8], None, {}),  # values narrower than the keys (multi-head latent attention)
             (torch.randn(2, 6, 9, 16, generator=g), k, v, None, {})]  # one key/value row for two query rows
    called = []
    monkeypatch.setattr(attention, "block_attention", lambda *a: called.append(a) or block_attention(*a))
    for q, key, value, mask, kwargs in cases:
        ours, _ = block_attention_forward(module, q, key, value, mask, scaling=0.25, **kwargs)
        theirs, _ = sdpa_attention_forward(module, q, key, value, mask, scaling=0.25, **kwargs)
        assert torch.equal(ours, theirs)
    assert not called
    causal_q = torch.randn(1, 6, 9, 16, generator=g)
    ours, _ = block_attention_forward(module, causal_q, k, v, None, scaling=0.25)
    theirs, _ = sdpa_attention_forward(module, causal_q, k, v, None, scaling=0.25)
    assert len(called) == 1 and ours.shape == theirs.shape == (1, 9, 6, 16)
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize(("precision", "checkpointing", "expected"), [
    ("bf16", False, BLOCK_ATTENTION), ("bf16", True, BLOCK_ATTENTION), ("fp32", False, "sdpa")])
def test_a_bf16_cpu_job_attends_in_blocks(tiny_model: Path, precision: str, checkpointing: bool, expected: str) -> None:
    config = make_config(adapter={"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0}, precision=precision,
                         gradient_checkpointing=checkpointing)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = load_model(config, tiny_model, device=torch.device("cpu"), dtype=dtype)
    assert model.config._attn_implementation == expected
    assert packs_pairs(model)  # a DPO job still runs each pair as one row


def test_a_model_attending_in_blocks_gives_the_loss_and_gradients_of_sdpa(tiny_model: Path) -> None:
    config = make_config(adapter={"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0}, precision="bf16")
    torch.manual_seed(0)
    model = load_model(config, tiny_model, device=torch.device("cpu"), dtype=torch.bfloat16)
    assert model.config._attn_implementation == BLOCK_ATTENTION
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 200, (2, 80), generator=g)
    padding = torch.ones(2, 80, dtype=torch.long)
    padding[1, 60:] = 0
    labels = ids.masked_fill(padding == 0, -100)

    def loss_and_grads(implementation: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.set_attn_implementation(implementation)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, attention_mask=padding, labels=labels).loss
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        model.zero_grad(set_to_none=True)
        return loss.detach(), grads

    ours, our_grads = loss_and_grads(BLOCK_ATTENTION)
    theirs, their_grads = loss_and_grads("sdpa")
    assert len(our_grads) == len(their_grads) > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=0)
    for a, b in zip(our_grads, their_grads, strict=True):
        assert (a - b).norm() <= 0.05 * b.norm()


class CountBlockAttention(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.count += func is torch.ops.tuneforge.block_attention.default
        return func(*args, **(kwargs or {}))


def test_a_checkpointed_backward_keeps_the_block_attention_it_ran_and_gives_the_same_gradients(
    tiny_model: Path,
) -> None:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 200, (2, 40), generator=g)
    results = []
    for checkpointing in (False, True):
        config = make_config(adapter={"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0}, precision="bf16",
                             gradient_checkpointing=checkpointing)
        torch.manual_seed(0)
        model = load_model(config, tiny_model, device=torch.device("cpu"), dtype=torch.bfloat16)
        model.train()
        forward, backward = CountBlockAttention(), CountBlockAttention()
        with forward, torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        with backward:
            loss.backward()
        assert forward.count == model.config.num_hidden_layers
        if checkpointing:
            assert backward.count == 0  # kept by the forward, not run again
        results.append([p.grad for p in model.parameters() if p.grad is not None])
    for plain, checkpointed in zip(*results, strict=True):
        torch.testing.assert_close(checkpointed, plain)

