"""Importance: one protocol for every way of scoring groups, HESSO's saliency and the one-shot criteria.

A criterion gets the pruning space and the :class:`Evidence` at hand (parameters; the last update
inside HESSO; calibration batches for one-shot pruning) and returns one score per group, in the
space's flat order, higher meaning keep. The planner (``budget``) turns scores into removals the same
way for all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import torch
from torch import nn

from hf_oto.groups.space import PruningSpace
from hf_oto.optim.saliency import LoraFactors, SaliencyWeights, group_statistics, saliency


@dataclass(frozen=True)
class Evidence:
    """What a criterion may look at."""

    params: dict[str, torch.Tensor]
    model: nn.Module | None = None
    update: dict[str, torch.Tensor] | None = None  # the last step's change of each parameter (HESSO)
    batches: list[dict[str, torch.Tensor]] = field(default_factory=list)  # calibration batches (one-shot criteria)
    lora: dict[str, LoraFactors] = field(default_factory=dict)

    @classmethod
    def of(cls, model: nn.Module, batches: list[dict[str, torch.Tensor]] | None = None) -> Evidence:
        return cls(params=dict(model.named_parameters()), model=model, batches=list(batches or []))


class Importance(Protocol):
    """Scores every group of ``space`` (flat order; higher = keep)."""

    needs_batches: ClassVar[bool]

    def __call__(self, space: PruningSpace, evidence: Evidence) -> torch.Tensor: ...


def per_kind_relative(space: PruningSpace, score: torch.Tensor, alive: torch.Tensor | None = None) -> torch.Tensor:
    """Scores divided by the mean score of their kind (over the ``alive`` groups when given), so heads
    and FFN channels compete on relative importance."""
    out = score.clone()
    kinds: dict[str, list[tuple[int, int]]] = {}
    for k, gs in enumerate(space.sets):
        kinds.setdefault(gs.kind, []).append((space.set_offset(k), gs.count))
    for spans in kinds.values():
        values = torch.cat([score[o:o + n] for o, n in spans])
        if alive is not None:
            keep = torch.cat([alive[o:o + n] for o, n in spans])
            values = values[keep] if bool(keep.any()) else values
        mean = values.mean().clamp_min(1e-12)
        for o, n in spans:
            out[o:o + n] = score[o:o + n] / mean
    return out


@dataclass(frozen=True)
class HESSOSaliency:
    """HESSO's weighted criteria: magnitude, average magnitude, cosine(parameter, update), |x . g|."""

    weights: SaliencyWeights = field(default_factory=SaliencyWeights)
    needs_batches: ClassVar[bool] = False

    def __call__(self, space: PruningSpace, evidence: Evidence) -> torch.Tensor:
        stats = group_statistics(evidence.params, space, evidence.update, evidence.lora)
        return saliency(stats, self.weights)


@dataclass(frozen=True)
class Magnitude:
    """The group's L2 norm over all of its slices."""

    needs_batches: ClassVar[bool] = False

    def __call__(self, space: PruningSpace, evidence: Evidence) -> torch.Tensor:
        return group_statistics(evidence.params, space).sq.sqrt()
