"""LoRA's input dropout with its mask drawn from 16-bit random numbers on CPU.

peft drops out each LoRA layer's input with ``nn.Dropout``, whose CPU kernel draws one
``bernoulli_`` sample per element: 6% of a training step of the 134M benchmark model in the
profile (``bench/README.md``). Four 16-bit lanes of one 64-bit draw give the same mask for a
quarter of the random numbers (``bench/bench_dropout.py``). Other devices keep the stock kernel.

The drop probability is rounded to a multiple of 1/65536 (0.05 becomes 0.0500031) and kept
values are scaled by the exact inverse of the rounded keep probability, so the expected output
is the input, as with ``nn.Dropout``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LEVELS = 1 << 16


class SixteenBitDropout(torch.nn.Module):
    """``nn.Dropout(p)`` whose CPU mask compares 16-bit random integers with ``p``."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.dropped_levels = round(p * LEVELS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.device.type != "cpu" or not 0 < self.dropped_levels < LEVELS:
            return F.dropout(x, self.p, self.training)
        count = x.numel()
        # random_ over the whole int64 range: every bit of every 16-bit lane is uniform.
        draws = torch.empty((count + 3) // 4, dtype=torch.int64).random_(-(1 << 63), (1 << 63) - 1)
        keep = draws.view(torch.int16)[:count].view(x.shape) >= self.dropped_levels - (LEVELS >> 1)
        return x * keep * (LEVELS / (LEVELS - self.dropped_levels))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_sixteen_bit_dropout(model: torch.nn.Module) -> int:
    """Replace the ``nn.Dropout`` of every LoRA layer's ``lora_dropout`` in place; returns how many."""
    replaced = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        for name, dropout in dropouts.items():
            if type(dropout) is torch.nn.Dropout:
                dropouts[name] = SixteenBitDropout(dropout.p)
                replaced += 1
    return replaced
