"""Measured prices: what removing each kind of group costs in loss, found by trying it.

A criterion orders the groups of one kind well, but its units differ across kinds: a kv group frees
the parameters of ~170 FFN channels, and removing one in every layer is far from the small change
that first- and second-order estimates assume. On SmolLM2 the trials measured a kv group per layer
at 11x, and query heads at 45x, the per-parameter loss of the lowest FFN channels; the pruned shapes
at 30% came out the same with and without pricing (``scripts/benchmark_results/hesso_defaults.md``).

Before a plan, each kind pays a common share of the remaining budget alone: the planner picks that
kind's cheapest removal, the groups are zeroed on a batch, the loss is read and the weights are put
back. The kind's scores are then scaled so that their sum over the tried groups equals the measured
loss increase. Kinds trade at measured rates; within a kind the criterion's order stands.
Interactions between kinds are not measured (the plan adds the kinds' prices).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from hf_oto.groups.space import PruningSpace
from hf_oto.optim import slices
from hf_oto.optim.budget import BudgetRules, Item, Plan, build_items, select, take_all

PRICINGS: tuple[str, ...] = ("saliency", "measured")

# The loss of the model with the flagged groups (a bool per group of the space) zeroed; with none
# flagged, the loss as it is. The weights must be as before when it returns.
Probe = Callable[[torch.Tensor], float]


@dataclass(frozen=True)
class KindPrice:
    """One kind's trial: what was removed, what the scores predicted and what the loss said."""

    kind: str
    groups: int
    params: int
    predicted: float  # sum of the criterion's scores over the tried groups
    measured: float  # loss increase when they were zeroed
    factor: float  # the kind's scores are multiplied by this

    def to_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def zeroing_probe(params: dict[str, torch.Tensor], space: PruningSpace, loss: Callable[[], float],
                  rows: dict[str, tuple[int, int]] | None = None) -> Probe:
    """A :data:`Probe` from ``loss`` (the loss of the model as it is, on a fixed batch): it zeroes the
    flagged groups' slices of ``params``, reads ``loss()`` and writes the slices back bit for bit.
    ``rows``: (first row, rows) of this rank's shard of FSDP2-sharded parameters."""

    @torch.no_grad()
    def probe(groups: torch.Tensor) -> float:
        if not bool(groups.any()):
            return loss()
        targets = slices.build_targets(space, groups, params, rows or {})
        views = [(slices.view(params[t.name].data, t), t) for t in targets]
        saved = [slices.gather(v, t) for v, t in views]
        try:
            for v, t in views:
                slices.zero_(v, t)
            return loss()
        finally:
            for (v, t), values in zip(views, saved, strict=True):
                slices.scatter_(v, t, values)

    return probe


def _price_classes(items: list[Item], space: PruningSpace) -> dict[int, str]:
    """Set index -> the class it is priced in: its kind, or the kinds of a chain that moves several
    together ("expert_channel+ffn_channel": a layer's experts with DeepSeek's shared expert)."""
    out: dict[int, str] = {}
    for it in items:
        name = "+".join(sorted({space.sets[k].kind for k, _ in it.members}))
        for k, _ in it.members:
            out[k] = name
    return out


def _alone(space: PruningSpace, removed: torch.Tensor, items: list[Item], size: int,
           tolerance: float) -> Plan:
    """The removal of ``size`` parameters from these items alone (at least the cheapest item)."""
    plan = Plan.from_mask(space, removed)
    select(plan, items, size, tolerance)
    if not bool((plan.mask() & ~removed).any()) and items:
        first = min((it for it in items if it.order == 0), key=lambda it: (it.score, it.order), default=None)
        for k, c in (first.members if first is not None else []):
            plan.removed[k].update(c)
    return plan


def price_kinds(space: PruningSpace, scores: torch.Tensor, removed: torch.Tensor, remaining: int, probe: Probe,
                rules: BudgetRules) -> tuple[torch.Tensor, list[KindPrice]]:
    """``scores`` with each kind scaled to measured loss units, and the trials that set the scales.

    ``removed`` flags the groups already gone (they stay gone in every trial); ``remaining`` is the
    budget still to remove. Each kind is tried at the same size: the remaining budget, or the most
    the smallest kind can free alone when that is less. A kind with nothing removable keeps its scores.
    """
    base_plan = Plan.from_mask(space, removed)
    items = build_items(space, scores, base_plan, rules)
    classes = _price_classes(items, space)
    kinds = sorted(set(classes.values()))
    by_kind = {kind: [it for it in items if classes[it.members[0][0]] == kind] for kind in kinds}
    before = base_plan.pruned_params()
    reach = {kind: take_all(Plan.from_mask(space, removed), its) - before for kind, its in by_kind.items()}
    size = min([remaining, *(r for r in reach.values() if r > 0)]) if reach else 0
    out = scores.clone()
    prices: list[KindPrice] = []
    if size <= 0:
        return out, prices
    base_loss = probe(torch.zeros(len(space), dtype=torch.bool))
    floor = 1e-6 * max(abs(base_loss), 1e-3)  # a removal that does not raise the loss is nearly free
    for kind in kinds:
        plan = _alone(space, removed, by_kind[kind], size, rules.tolerance)
        tried = plan.mask() & ~removed
        if not bool(tried.any()):
            continue
        measured = probe(tried) - base_loss
        predicted = float(scores[tried].clamp_min(0).sum())
        factor = max(measured, floor) / max(predicted, 1e-12)
        for k, gs in enumerate(space.sets):
            if classes.get(k) == kind:
                off = space.set_offset(k)
                out[off:off + gs.count] = scores[off:off + gs.count].clamp_min(0) * factor
        prices.append(KindPrice(kind, int(tried.sum()), plan.pruned_params() - before, predicted, measured, factor))
    return out, prices
