"""The adapters' dropout on a CPU, with its random mask drawn four elements to a 64-bit draw. Imports torch: import it
where it runs.

torch's CPU dropout draws every element's Bernoulli with a scalar call of its Mersenne Twister: on qwen2-152k in bf16
the LoRA inputs' masks took 4-5% of a LoRA step and 5% of a QLoRA one (2.2 ms for a 680 x 896 input, where this
takes 0.8 ms; docs/benchmarks.md, issue 18, stop 31). Here one 64-bit draw gives four 16-bit uniforms and an element
is dropped when its uniform falls in the lowest round(p * 65,536) of them: the same Bernoulli(p) up to p's rounding
to 1/65,536 (0.05 becomes 0.050003; torch's own rounds p to 24 bits), from torch's generator, so a seed and a
checkpointed forward's recomputation (which restores the generator) give the same mask.
"""

from __future__ import annotations

from typing import Any

import torch

LEVELS = 1 << 16  # the draw's resolution: one int16 per element


class PackedDropout(torch.nn.Module):
    """nn.Dropout(p), its mask drawn four elements to a 64-bit draw for a CPU tensor (on other devices torch's
    own dropout, whose generators are not per element)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), not {p}")
        self.p = p
        self.scale = 1.0 / (1.0 - p)
        # drop where the int16 uniform is below this: round(p * 65,536) of the 65,536 values
        self.below = -(LEVELS // 2) + min(round(p * LEVELS), LEVELS - 1)

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return torch.nn.functional.dropout(x, self.p, training=True)
        bits = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_(-(2**63), None)
        keep = bits.view(torch.int16)[: x.numel()].view(x.shape) >= self.below
        return x.mul(keep).mul_(self.scale)


def use_packed_dropout(model: Any) -> None:
    """Swap each adapter's nn.Dropout (PEFT's lora_dropout) for a PackedDropout of the same p."""
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        for name, layer in dropouts.items():
            if type(layer) is torch.nn.Dropout:
                dropouts[name] = PackedDropout(layer.p)
