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

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from hf_oto.errors import ConfigError, ResumeError


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


def unit(v: torch.Tensor) -> torch.Tensor:
    """``v`` scaled to unit L2 norm."""
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
    # one entry per finished trial: [groups trialled, relative loss increase (unclipped), harm]
    log: list[list[float]] = field(default_factory=list)

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
        return unit(sal) + config.loss_weight * harm.clamp(0.0, 1.0)

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


class Actuator(Protocol):
    """What CRIC needs from the optimizer: find, copy, restore and decay the slices of some groups."""

    def targets(self, groups: torch.Tensor) -> list: ...

    def snapshot(self, targets: list) -> dict[Any, torch.Tensor]: ...

    def restore(self, targets: list, saved: dict[Any, torch.Tensor]) -> None: ...

    def scale(self, targets: list, factor: float) -> None: ...


class CRIC:
    """CRIC's cycles, step by step: trial a candidate subset, watch the loss, restore, accumulate."""

    def __init__(self, config: CRICConfig):
        config.validate()
        self.config = config
        self.state = CRICState()
        self.rank: torch.Tensor | None = None  # the final ranking, once the last cycle ended
        self._trial: list | None = None  # targets of the current trial (rebuilt after a resume)

    def start_cycle(self, score: torch.Tensor, candidates_of: Callable[[torch.Tensor], torch.Tensor],
                    actuator: Actuator) -> None:
        """Accumulate ``score``, pick this cycle's candidates and trial subset, snapshot the trial slices."""
        cs = self.state
        if cs.sal_sum is None:
            cs.sal_sum = torch.zeros_like(score)
            cs.harm_sum = torch.zeros_like(score)
            cs.harm_n = torch.zeros_like(score)
        cs.sal_sum += unit(score)
        cs.sal_n += 1
        cs.previous, cs.candidates = cs.candidates, candidates_of(cs.ranking(self.config))
        cs.trial = cs.trial_subset(self.config, cs.candidates)
        self._trial = actuator.targets(cs.trial)
        cs.snapshot = actuator.snapshot(self._trial)  # only the trial slices (this rank's rows under FSDP)
        cs.losses = []

    def step(self, loss: float, actuator: Actuator) -> bool:
        """One step of the current cycle; True when CRIC has just finished (its ranking is in ``rank``)."""
        cs, length = self.state, self.config.sampling_steps
        cs.losses.append(loss)
        if self._trial is None:
            self._trial = actuator.targets(cs.trial)
        actuator.scale(self._trial, (length - cs.t - 1) / (length - cs.t))
        if cs.t < length - 1:
            cs.t += 1
            return False
        third = max(len(cs.losses) // 3, 1)
        head, tail = cs.losses[:third], cs.losses[-third:]
        increase = (sum(tail) / len(tail)) / max(sum(head) / len(head), 1e-12) - 1.0
        harm = min(max(increase / self.config.harm_scale, 0.0), 1.0)  # 1 = this trial clearly hurt
        cs.harm_sum[cs.trial] += harm
        cs.harm_n[cs.trial] += 1
        cs.harm_total += harm
        cs.trials += 1
        cs.log.append([float(cs.trial.sum()), increase, harm])
        actuator.restore(self._trial, cs.snapshot)
        cs.snapshot, cs.t, self._trial = {}, 0, None
        cs.cycle += 1
        stable = cs.previous is not None and int((cs.candidates ^ cs.previous).sum()) <= \
            self.config.tolerance * max(int(cs.candidates.sum()), 1)
        if cs.cycle >= self.config.max_cycles or (cs.cycle >= self.config.min_cycles and stable):
            cs.done = True
            self.rank = cs.ranking(self.config)
            return True
        return False

    def load(self, state: dict | None, rank: torch.Tensor | None) -> None:
        """Restore from a checkpoint's ``cric`` and ``cric_rank`` entries."""
        if state is None:
            raise ResumeError("resuming with a changed pruning config is not supported (CRIC on/off changed)")
        self.state = CRICState.from_dict(state)
        self.rank = None if rank is None else rank.clone()
        self._trial = None
