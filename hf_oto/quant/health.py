"""Does the model survive each QFA width? The quantized base's loss per width against full precision.

QFA samples a width per layer every step, so every width's errors flow into every adapter. A width the
model does not survive (SmolLM2-135M at 2 bits, group 32, with positive scales only: perplexity 3e7)
turns the sampled networks into noise, and the adapters then learn corrections that make the other
widths worse. One batch before training says so: :class:`WidthCheck` holds the losses and the warning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from hf_oto.optim import oneshot
from hf_oto.quant.prepare import qfa_layers, set_bits

COLLAPSE_NATS = math.log(10.0)  # a width that multiplies the perplexity by more than 10 has collapsed


def batch_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """The language-model loss on ``batch`` (its input_ids as labels; eval mode, no gradients)."""
    return oneshot.batch_loss(model, [batch])()


@dataclass(frozen=True)
class WidthCheck:
    """The loss of one batch in full precision (``full``) and at each uniform width of the quantized base."""

    full: float
    widths: dict[int, float]

    @classmethod
    def measure(cls, model: nn.Module, batch: dict[str, torch.Tensor], full: float) -> WidthCheck:
        """Each width's loss on ``batch`` (the model already prepared for QFA; ``full``: its loss before)."""
        losses = {}
        for b in sorted(qfa_layers(model)[0][2].bits):
            set_bits(model, b)
            losses[b] = batch_loss(model, batch)
        return cls(full, losses)

    @property
    def collapsed(self) -> list[int]:
        """The widths whose loss exceeds full precision's by more than :data:`COLLAPSE_NATS`."""
        return [b for b, loss in sorted(self.widths.items()) if not loss - self.full <= COLLAPSE_NATS]

    def line(self) -> str:
        parts = ", ".join(f"{b}-bit {loss:.2f}" for b, loss in sorted(self.widths.items()))
        return f"QFA base loss on one training batch: full precision {self.full:.2f}; {parts}"

    def warning(self) -> str | None:
        """One line naming the collapsed widths and what to do, or None."""
        bad = self.collapsed
        if not bad:
            return None
        kept = [b for b in sorted(self.widths) if b not in bad]
        names = ", ".join(f"{b}-bit" for b in bad)
        worst = max(self.widths[b] for b in bad) - self.full
        advice = f"qfa_bits: {kept}" if kept else "wider qfa_bits or a smaller qfa_group_size"
        return (f"warning: the model does not survive {names} quantization (perplexity x{math.exp(worst):.3g} "
                f"on this batch); QFA trains every width's adapters on networks that mix widths, so the other "
                f"widths will get worse too. Consider {advice}.")

