"""Selective activation checkpointing: a checkpointed forward keeps its products' and attention's outputs within a
per-pass budget, the backward recomputes none of those, and the gradients are those of an uncheckpointed step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.worker.training.factories import make_config
from worker.training.checkpointing import SavedOutputs, kept_ops
from worker.training.model import load_model


class CountProducts(TorchDispatchMode):
    """Counts the matrix products and attention kernels that run (a product served from the checkpoint's store
    does not reach this mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.count += func in kept_ops()
        return func(*args, **(kwargs or {}))


def load(tiny_model: Path, adapter_type: str, *, checkpointing: bool) -> tuple[torch.nn.Module, SavedOutputs | None]:
    adapter = {"type": "full"} if adapter_type == "full" else {"type": adapter_type, "r": 4, "alpha": 8, "dropout": 0.1}
    config = make_config(adapter=adapter, gradient_checkpointing=checkpointing)
    torch.manual_seed(0)  # the adapters' initial weights
    model = load_model(config, tiny_model, device=torch.device("cpu"), dtype=torch.float32)
    model.train()
    budgets = [hook.__self__ for module in model.modules() for hook in module._forward_pre_hooks.values()
               if isinstance(getattr(hook, "__self__", None), SavedOutputs)]
    assert len(budgets) == (1 if checkpointing else 0)
    return model, (budgets[0] if budgets else None)


def step(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], int]:
    """One forward and backward on fixed tokens; the adapters' gradients and how many products the backward ran."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 200, (2, 24), generator=g)
    torch.manual_seed(2)  # the dropout masks
    loss = model(input_ids=ids, labels=ids).loss
    counter = CountProducts()
    with counter:
        loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads, counter.count


@pytest.mark.parametrize(("adapter_type", "trained"), [("lora", 2 * 2 * 7), ("qlora", 2 * 2 * 7), ("full", 21)])
def test_a_checkpointed_backward_recomputes_no_product_it_kept_and_gives_the_same_gradients(
    tiny_model: Path, adapter_type: str, trained: int
) -> None:
    plain, _ = load(tiny_model, adapter_type, checkpointing=False)
    # As checkpointing does: the backward then also runs the products into the first layer's input.
    plain.enable_input_require_grads()
    want, backward_products = step(plain)
    model, budget = load(tiny_model, adapter_type, checkpointing=True)
    assert budget is not None
    grads, products = step(model)
    assert budget.used_bytes > 0
    assert products == backward_products  # the forward's products came from the store
    # LoRA: A and B of all-linear in both layers; full: every tensor of the model (the output layer is tied)
    assert grads.keys() == want.keys() and len(grads) == trained
    for name in want:
        torch.testing.assert_close(grads[name], want[name], msg=name)
    # With nothing kept, the backward reruns the layers' products: what the budget saves.
    budget.limit_bytes = 0
    again, recomputing = step(model)
    assert budget.used_bytes == 0 and recomputing > products
    for name in want:
        torch.testing.assert_close(again[name], want[name], msg=name)


def test_a_pass_keeps_no_more_than_its_budget_and_each_pass_has_all_of_it(tiny_model: Path) -> None:
    model, budget = load(tiny_model, "lora", checkpointing=True)
    assert budget is not None
    step(model)
    everything = budget.used_bytes
    budget.limit_bytes = everything // 3
    step(model)
    first = budget.used_bytes
    assert 0 < first <= everything // 3
    budget.used_bytes = budget.limit_bytes  # as a pass that spent it all leaves it
    step(model)  # the next forward starts from an empty budget
    assert budget.used_bytes == first
