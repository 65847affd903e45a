"""One-shot structured pruning on the same groups and budget as HESSO (the benchmark's baselines).

Four criteria, each a score per group (higher = keep):

- ``"magnitude"``: the group's L2 norm over all of its slices.
- ``"taylor"``: first-order Taylor importance on calibration batches (LLM-Pruner style): the sum
  over the group's elements of ``|w * g|``, with ``g`` the gradient accumulated over the batches.
- ``"wanda_sp"``: activation-weighted magnitude (Wanda-sp / FLAP style): for the group's input
  columns of the consuming ``nn.Linear`` (``o_proj`` for heads, ``down_proj`` for FFN channels),
  ``sum_j ||X_j||_2 * sum_i |W_ij|`` with ``X_j`` the calibration activations of input feature j.
- ``"routing"``: whole routed experts (``prune_experts``) by the router weight they receive on the
  calibration tokens (how often they are picked, weighted by their gate: the frequency criterion of MoE
  expert pruning); other groups by ``taylor``.
- ``"block_influence"``: whole decoder layers (depth groups, ShortGPT style): one minus the mean
  cosine similarity between each token's hidden state entering and leaving the layer on calibration
  batches (a layer that barely turns the residual stream goes first); other groups by magnitude.

Scores are divided by the mean score of their kind, so heads and FFN channels compete on relative
importance (as FLAP standardises attention and MLP separately); given a ``probe``
(:func:`batch_loss`), :func:`oneshot_prune` instead prices each kind by the loss its removal measures
(:mod:`hf_oto.optim.pricing`, as HESSO does). It then takes the lowest groups with the same planner,
layout rules and 1% tolerance that HESSO uses, and zeroes them, so :func:`hf_oto.construct_subnet`
removes them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from hf_oto.errors import ConfigError
from hf_oto.groups.experts import route_around_removed_experts, routes
from hf_oto.groups.space import ExpertInfo, PruningSpace, zero_groups
from hf_oto.optim.activations import InputNorms, activation_scores, linear_consumers
from hf_oto.optim.budget import BudgetRules, Plan, build_items, resolve_target, select
from hf_oto.optim.importance import Evidence, Importance, Magnitude, per_kind_relative
from hf_oto.optim.influence import LayerTurn
from hf_oto.optim.pricing import KindPrice, price_kinds, zeroing_probe
from hf_oto.optim.saliency import group_statistics, slice_sums

Criterion = Literal["magnitude", "taylor", "wanda_sp", "routing", "block_influence"]
ONESHOT_CRITERIA: tuple[str, ...] = ("magnitude", "taylor", "wanda_sp", "routing", "block_influence")


def _progress(batches: list[dict[str, torch.Tensor]]):
    """A progress bar over calibration batches (quiet for a handful)."""
    from tqdm.auto import tqdm

    return tqdm(batches, desc="calibration", unit="batch", disable=len(batches) < 4)


def _forward(model: nn.Module, batch: dict[str, torch.Tensor], with_loss: bool):
    device = next(model.parameters()).device
    ids = batch["input_ids"].to(device)
    out = model(input_ids=ids, labels=ids if with_loss else None)
    return out.loss if with_loss else None


def _taylor(model: nn.Module, space: PruningSpace, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    params = dict(model.named_parameters())
    names = {s.param for gs in space.sets for s in gs.slices}
    saved = {n: (params[n].requires_grad, params[n].grad) for n in names}
    for n in names:
        params[n].requires_grad_(True)
        params[n].grad = None
    was_training = model.training
    model.eval()
    try:
        for b in _progress(batches):
            (_forward(model, b, with_loss=True) / len(batches)).backward()
        scores = []
        with torch.no_grad():
            for gs in space.sets:
                s = torch.zeros(gs.count)
                for spec in gs.slices:
                    p = params[spec.param]
                    if p.grad is not None:
                        s += slice_sums((p.detach().float() * p.grad.float()).abs(), spec).cpu()
                scores.append(s)
    finally:
        for n, (req, grad) in saved.items():
            params[n].grad = grad
            params[n].requires_grad_(req)
        model.train(was_training)
    return torch.cat(scores)


@torch.no_grad()
def _observe(model: nn.Module, batches: list[dict[str, torch.Tensor]], handles: list) -> None:
    """Run the calibration batches in eval mode for the hooks in ``handles``, then remove them."""
    was_training = model.training
    model.eval()
    try:
        for b in _progress(batches):
            _forward(model, b, with_loss=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


@torch.no_grad()
def _wanda_sp(model: nn.Module, space: PruningSpace, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    if any(s.expert is not None for gs in space.sets for s in gs.slices):
        raise ConfigError("wanda_sp needs nn.Linear consumers; MoE expert weights are not supported (use taylor)")
    consumers = linear_consumers(model, space)
    norms = InputNorms(consumers).attach()
    try:
        _observe(model, batches, [])
    finally:
        norms.detach()
    return activation_scores(model, space, consumers, norms.sums)


@dataclass(frozen=True)
class Taylor:
    """First-order Taylor importance on calibration batches (LLM-Pruner style): sum of ``|w * g|``."""

    needs_batches: ClassVar[bool] = True

    def __call__(self, space: PruningSpace, evidence: Evidence) -> torch.Tensor:
        return _taylor(evidence.model, space, evidence.batches)


@dataclass(frozen=True)
class WandaSP:
    """Activation-weighted magnitude of the consuming linear's input columns (Wanda-sp / FLAP style)."""

    needs_batches: ClassVar[bool] = True

    def __call__(self, space: PruningSpace, evidence: Evidence) -> torch.Tensor:
        return _wanda_sp(evidence.model, space, evidence.batches)


@torch.no_grad()
def _block_influence(model: nn.Module, space: PruningSpace, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    turn = LayerTurn(model, space)
    if not turn:
        raise ConfigError("block_influence scores whole layers: prune with pruning_granularity 'depth' or 'both'")
    turn.attach()
    _observe(model, batches, [])
    turn.detach()
    scores = group_statistics(dict(model.named_parameters()), space).sq.sqrt()
    for k, mean in zip(turn.whole.values(), turn.means().tolist(), strict=True):
        scores[space.set_offset(k)] = mean
    return scores


def _routing(model: nn.Module, space: PruningSpace, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    experts = {k: gs.info for k, gs in enumerate(space.sets) if isinstance(gs.info, ExpertInfo) and gs.prunable}
    if not experts:
        raise ConfigError("routing scores whole experts: prune an MoE model with prune_experts")
    mass = {k: torch.zeros(info.count) for k, info in experts.items()}
    tokens = dict.fromkeys(experts, 0)

    def hook(k: int):
        def fn(_module, args, output):
            found = routes(output)
            if found is not None:
                weights, index = found
                mass[k].scatter_add_(0, index.flatten().cpu(), weights.detach().float().flatten().cpu())
                tokens[k] += index.shape[0]
        return fn

    scores = _taylor(model, space, batches)
    _observe(model, batches, [model.get_submodule(info.router).register_forward_hook(hook(k))
                              for k, info in experts.items()])
    for k in experts:
        off = space.set_offset(k)
        scores[off:off + space.sets[k].count] = mass[k] / max(tokens[k], 1)
    return scores


@dataclass(frozen=True)
class Routing:
    """Whole experts by the gate weight they receive on calibration tokens; other groups by Taylor."""

    needs_batches: ClassVar[bool] = True

    def __call__(self, space: PruningSpace, evidence: Evidence) -> torch.Tensor:
        return _routing(evidence.model, space, evidence.batches)


@dataclass(frozen=True)
class BlockInfluence:
    """ShortGPT's block influence of whole layers: 1 - mean cos(hidden in, hidden out); others by magnitude."""

    needs_batches: ClassVar[bool] = True

    def __call__(self, space: PruningSpace, evidence: Evidence) -> torch.Tensor:
        return _block_influence(evidence.model, space, evidence.batches)


BY_NAME: dict[str, Importance] = {"magnitude": Magnitude(), "taylor": Taylor(), "wanda_sp": WandaSP(),
                                  "routing": Routing(), "block_influence": BlockInfluence()}


def oneshot_scores(model: nn.Module, space: PruningSpace, criterion: Criterion | Importance,
                   batches: Iterable[dict[str, torch.Tensor]] | None = None) -> torch.Tensor:
    """Importance per group (flat order of ``space``; higher = keep), relative within each kind.

    ``criterion`` is a name of :data:`ONESHOT_CRITERIA` or any :class:`~hf_oto.optim.importance.Importance`
    (HESSO's own saliency included).
    """
    if isinstance(criterion, str):
        if criterion not in BY_NAME:
            raise ConfigError(f"criterion must be one of {ONESHOT_CRITERIA}, got {criterion!r}")
        criterion = BY_NAME[criterion]
    batches = list(batches or [])
    if criterion.needs_batches and not batches:
        raise ConfigError(f"criterion {type(criterion).__name__} needs calibration batches (dicts with input_ids)")
    return per_kind_relative(space, criterion(space, Evidence.of(model, batches)))


def batch_loss(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> Callable[[], float]:
    """The mean language-model loss of ``model`` as it is over ``batches`` (eval mode, no gradients):
    the probe :func:`oneshot_prune` prices kinds with."""
    batches = list(batches)
    if not batches:
        raise ConfigError("measured pricing needs at least one batch (a dict with input_ids)")

    @torch.no_grad()
    def loss() -> float:
        was_training = model.training
        model.eval()
        try:
            return sum(float(_forward(model, b, with_loss=True)) for b in batches) / len(batches)
        finally:
            model.train(was_training)

    return loss


def oneshot_prune(model: nn.Module, space: PruningSpace, scores: torch.Tensor, *,
                  target_sparsity: float | None = 0.5, target_params: int | None = None,
                  rules: BudgetRules | None = None, probe: Callable[[], float] | None = None,
                  prices: list[KindPrice] | None = None) -> Plan:
    """Zero the lowest-scoring groups (in place) until the parameter target is met; returns the plan.

    ``rules`` (:class:`~hf_oto.optim.budget.BudgetRules`: layout, FFN multiple, min_keep, selection,
    tolerance) default to a uniform layout with FFN widths on multiples of 8. With ``probe`` (the
    model's loss as it is, e.g. :func:`batch_loss`), each kind's scores are first scaled to the loss
    increase measured when that kind alone pays the budget; the trials are appended to ``prices``."""
    rules = rules or BudgetRules()
    target_params = resolve_target(space, target_sparsity, target_params, rules)
    if probe is not None:
        zeroing = zeroing_probe(dict(model.named_parameters()), space, probe)
        routing = route_around_removed_experts(model, space)  # a zeroed expert's trial removes it
        try:
            scores, trials = price_kinds(space, scores, torch.zeros(len(space), dtype=torch.bool), target_params,
                                         zeroing, rules)
        finally:
            routing.remove()
        if prices is not None:
            prices.extend(trials)
    plan = Plan(space)
    select(plan, build_items(space, scores, plan, rules), target_params, rules.tolerance, warn=True)
    zero_groups(model, space, [space[i].name for i in torch.nonzero(plan.mask()).flatten().tolist()])
    return plan
