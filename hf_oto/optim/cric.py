"""CRIC: the Corrective Redundant Identification Cycle that runs before HESSO's pruning periods.

Each cycle ranks groups by their accumulated saliency, takes the full-budget bottom set as
candidates, and trials a subset of them: the trial groups decay to exactly zero over
``sampling_steps`` while the training loss is watched; then only their slices are restored from a
snapshot. A trial's harm is the mean loss of the cycle's last third (trial groups nearly gone) over
that of its first third (barely touched), minus one, in units of ``harm_scale`` and clipped to
[0, 1]: a paired measure, steadier than single batches, though drift of training within the cycle
still counts, so ``harm_scale`` should sit above the loss noise. A group's harm is the mean over
the trials that removed it minus the mean over the trials that did not, so sharing a trial with a
harmful group costs nothing. The final ranking is the mean saliency plus ``loss_weight`` times the
harm: a structure whose removal hurts is kept even when single-shot saliency calls it redundant.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hf_oto.errors import ConfigError


@dataclass(frozen=True)
class CRICConfig:
    """Settings of the corrective cycle (steps count optimizer steps)."""

    sampling_steps: int = 20
    max_cycles: int = 6
    min_cycles: int = 3
    trial_sparsities: tuple[float, ...] = (0.25, 0.5, 0.75)
    tolerance: float = 0.02
    loss_weight: float = 1.0
    harm_scale: float = 0.05  # a trial that raises the loss by this fraction fully protects its groups
    blend: float = 0.5  # weight of fresh saliency (vs the CRIC ranking) at each period start
    seed: int = 0
    trial_subsets: bool = True  # trial a random part of the candidates (varies co-trialled groups)

    def validate(self) -> None:
        if self.sampling_steps < 2:
            raise ConfigError(f"CRIC sampling_steps must be >= 2, got {self.sampling_steps}")
        if not 1 <= self.min_cycles <= self.max_cycles:
            raise ConfigError(f"CRIC needs 1 <= min_cycles <= max_cycles, got {self.min_cycles}, {self.max_cycles}")
        if not self.trial_sparsities or not all(0 < t <= 1 for t in self.trial_sparsities):
            raise ConfigError(f"CRIC trial_sparsities must lie in (0, 1], got {self.trial_sparsities}")
        if self.harm_scale <= 0:
            raise ConfigError(f"CRIC harm_scale must be > 0, got {self.harm_scale}")
        if not 0 <= self.blend <= 1:
            raise ConfigError(f"CRIC blend must be in [0, 1], got {self.blend}")


def _copy(value):
    if torch.is_tensor(value):
        return value.clone()
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm().clamp_min(1e-12)


@dataclass
class CRICState:
    cycle: int = 0
    t: int = 0  # step within the cycle
    done: bool = False
    sal_sum: torch.Tensor | None = None
    sal_n: int = 0
    harm_sum: torch.Tensor | None = None
    harm_n: torch.Tensor | None = None
    harm_total: float = 0.0  # over all trials, to compare "with the group" to "without it"
    trials: int = 0
    candidates: torch.Tensor | None = None
    previous: torch.Tensor | None = None
    trial: torch.Tensor | None = None
    snapshot: dict[str, torch.Tensor] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        """A copy of the state that shares no tensor with this object (for checkpoints)."""
        return _copy(vars(self))

    @classmethod
    def from_dict(cls, d: dict) -> CRICState:
        return cls(**_copy(d))

    def ranking(self, config: CRICConfig) -> torch.Tensor:
        """Mean accumulated saliency plus the weighted, saturating harm (higher = keep).

        A group's harm is the mean loss increase of the trials that removed it minus that of the
        trials that did not: a group that merely shared a trial with a harmful one scores ~0.
        """
        sal = self.sal_sum / max(self.sal_n, 1)
        with_g = self.harm_sum / self.harm_n.clamp_min(1)
        n_without = self.trials - self.harm_n
        without_g = (self.harm_total - self.harm_sum) / n_without.clamp_min(1)
        harm = torch.where(self.harm_n > 0, with_g - without_g, torch.zeros_like(with_g))
        return _unit(sal) + config.loss_weight * harm.clamp(0.0, 1.0)

    def trial_subset(self, config: CRICConfig, candidates: torch.Tensor) -> torch.Tensor:
        frac = config.trial_sparsities[self.cycle % len(config.trial_sparsities)]
        idx = torch.nonzero(candidates).flatten()
        if not config.trial_subsets:
            keep = idx[: max(1, round(frac * len(idx)))]
        else:
            gen = torch.Generator().manual_seed(config.seed * 100_003 + self.cycle)
            keep = idx[torch.randperm(len(idx), generator=gen)[: max(1, round(frac * len(idx)))]]
        out = torch.zeros_like(candidates)
        out[keep] = True
        return out
