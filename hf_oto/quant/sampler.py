"""Per-layer bit-width configurations, one per optimizer step (uniform or resource-balanced)."""

from __future__ import annotations

import math

import torch

from hf_oto.quant.config import QFAConfig


class BitSampler:
    """The per-layer bit-widths of step ``t``, a pure function of (seed, t): resume needs no state.

    ``uniform``: each layer's width is drawn uniformly from ``config.bits``. ``triangular`` (LLM-QFA's
    resource-balanced schedule): the mean width index follows a triangular wave over ``period``
    steps, from the lowest width (t = 0) to the highest (t = period / 2) and back; each layer takes
    one of the two widths around the mean, with the probability that makes the expected index equal
    the mean. Uniform draws cluster the average width near the middle; the wave trains every average.
    """

    def __init__(self, config: QFAConfig, num_layers: int, period: int):
        self.config = config
        self.num_layers = num_layers
        self.period = max(int(period), 2)

    def _generator(self, step: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.config.seed * 1_000_003 + step) % (2**63 - 1))

    def mean_index(self, step: int) -> float:
        """The triangular wave's target mean index at ``step`` (0 = lowest width)."""
        phase = (step % self.period) / self.period
        return (1.0 - abs(2.0 * phase - 1.0)) * (len(self.config.bits) - 1)

    def sample(self, step: int) -> tuple[int, ...]:
        bits = self.config.bits
        g = self._generator(step)
        if self.config.schedule == "uniform":
            idx = torch.randint(len(bits), (self.num_layers,), generator=g)
        else:
            m = self.mean_index(step)
            lo = math.floor(m)
            up = torch.rand(self.num_layers, generator=g) < (m - lo)
            idx = torch.clamp(lo + up.long(), max=len(bits) - 1)
        return tuple(bits[i] for i in idx.tolist())
