"""Elastic sizes: one fine-tuning run that trains nested sub-networks of several sizes (once-for-all).

The pruning criterion ranks every group while the full model trains; with measured pricing (an option
here: the trainer's "auto" takes the criterion's units, which measured better for elastic sizes) each
kind of group is then priced by the loss its removal costs on the step's batch, tried on a masked view.
From that ranking the planner (the same knapsack, layout and rules as HESSO's) takes the largest size's
removals first and each smaller size's on top of the previous ones, so the sizes are nested: the 50%
model sits inside the 70% model, which sits inside the full one. After ``start`` steps of full-model
training (shrinking delayed as in DεpS), every step also trains sub-networks, the smallest and
``samples`` others (the sandwich rule), as masked views of the same weights
(:class:`~hf_oto.groups.mask.MaskedView`), distilled in place from the full model's logits. The
keep-sets are refreshed from the ranking every ``refresh_every`` steps until ``freeze``; after it they
stay fixed, so each size ends its training with the groups it is extracted with. Nothing is zeroed: the
full model stays whole, and any trained size is cut out of it afterwards (``hf-oto export-size``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hf_oto.errors import ConfigError, ResumeError
from hf_oto.groups.mask import MaskedView
from hf_oto.groups.space import PruningSpace
from hf_oto.optim.budget import Plan, build_items, resolve_target, select
from hf_oto.optim.config import HESSOConfig
from hf_oto.optim.criteria import make_criterion
from hf_oto.optim.influence import LayerTurn
from hf_oto.optim.pricing import price_kinds
from hf_oto.optim.saliency import lora_factors, sliced_params
from hf_oto.optim.shard import all_reduce_sum

ELASTIC_TARGETS = ("full", "teacher")


@dataclass(frozen=True)
class ElasticConfig:
    """Which sizes one run trains and when.

    ``sizes``: kept fractions of the prunable parameters, each in (0, 1) (the full model, 1.0, is always
    trained). ``start``: the optimizer step at which sub-networks join (before it only the full model
    trains and the ranking gathers evidence; at least 1). ``freeze``: the step after which the keep-sets
    stay fixed (default: ``start``, one ranking). ``refresh_every``: steps between rankings from
    ``start`` to ``freeze`` (0: only at ``start``). ``samples``: sizes drawn each step besides the
    smallest (the sandwich rule's random members; drawn from the other sizes by a seeded rule of the
    step, so a resumed run draws the same). ``temperature``: of the in-place distillation. ``target``: what the
    sub-networks are distilled from, ``"full"`` (the full model's logits on the same batch, in place) or
    ``"teacher"`` (the dense teacher's, which needs ``distill``). ``label_weight``: the share of each
    sub-network's loss taken by the language-model loss on the labels (0: distillation alone).
    """

    sizes: tuple[float, ...]
    start: int = 1
    freeze: int | None = None
    refresh_every: int = 0
    samples: int = 1
    temperature: float = 1.0
    seed: int = 0
    target: str = "full"
    label_weight: float = 0.0

    def __post_init__(self) -> None:
        sizes = tuple(float(s) for s in self.sizes)
        if not sizes:
            raise ConfigError("elastic_sizes needs at least one size")
        bad = [s for s in sizes if not 0.0 < s <= 1.0]
        if bad:
            raise ConfigError(f"elastic_sizes must lie in (0, 1] (kept fractions of the prunable parameters), got "
                              f"{bad[0]}")
        sizes = tuple(sorted({s for s in sizes if s < 1.0}, reverse=True))
        if not sizes:
            raise ConfigError("elastic_sizes names only the full model (1.0): give at least one size below 1")
        object.__setattr__(self, "sizes", sizes)
        if self.start < 1:
            raise ConfigError(f"elastic_start must be at least one step (the ranking needs evidence), got {self.start}")
        if self.freeze is not None and self.freeze < self.start:
            raise ConfigError(f"elastic_freeze ({self.freeze}) must not come before elastic_start ({self.start})")
        if self.refresh_every < 0:
            raise ConfigError(f"elastic_refresh must be >= 0, got {self.refresh_every}")
        if self.samples < 0:
            raise ConfigError(f"elastic_samples must be >= 0, got {self.samples}")
        if self.temperature <= 0:
            raise ConfigError(f"elastic_temperature must be positive, got {self.temperature}")
        if self.target not in ELASTIC_TARGETS:
            raise ConfigError(f"elastic_target must be one of {ELASTIC_TARGETS}, got {self.target!r}")
        if not 0.0 <= self.label_weight <= 1.0:
            raise ConfigError(f"elastic_label_weight must be in [0, 1], got {self.label_weight}")

    @property
    def last_ranking(self) -> int:
        return self.start if self.freeze is None else self.freeze

    def check_steps(self, total_steps: int) -> None:
        """Refuse a schedule whose sub-networks would never train."""
        if self.start >= total_steps:
            raise ConfigError(f"elastic_start is step {self.start} but training has {total_steps} steps: the "
                              "sub-networks would never train; start earlier or train longer")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def size_targets(space: PruningSpace, sizes: tuple[float, ...], config: HESSOConfig) -> list[int]:
    """Pruned-parameter targets of ``sizes`` (largest size first), each checked against the constraints:
    a size smaller than the layout, ``ffn_multiple`` and ``min_keep`` can reach is refused, named."""
    out = []
    for size in sizes:
        try:
            out.append(resolve_target(space, 1.0 - size, None, config.rules))
        except ConfigError as e:
            raise ConfigError(f"elastic size {size}: {e}") from None
    return out


def nested_removals(space: PruningSpace, score: torch.Tensor, targets: list[int], config: HESSOConfig) -> torch.Tensor:
    """One row of removed-group flags per target (pruned parameters, ascending), each row containing the
    one before it: the planner continues from the previous size's plan."""
    plan = Plan(space)
    rows = []
    for target in targets:
        select(plan, build_items(space, score, plan, config.rules), target, config.tolerance)
        rows.append(plan.mask().clone())
    return torch.stack(rows)


ELASTIC_REFUSED = "wanda_sp"
ELASTIC_REFUSAL = ("elastic_sizes rank with fisher, taylor or hesso: the wanda_sp criterion would also count the "
                   "masked sub-networks' activations (set pruning_criterion to one of those, or auto)")


class Elastic(torch.optim.Optimizer):
    """A wrapper around a torch optimizer that ranks groups and holds the nested keep-sets of an elastic run.

    It takes every step with the base optimizer (sharing its param groups and state, so LR schedulers
    and checkpoints see one truth), feeds the criterion and re-plans the sizes on schedule. The trainer
    asks :meth:`sizes_for_step` which sub-networks to run and :meth:`removed` for their flags.
    ``view_space``: the same groups named on the model's own layers, for the masked views, when ``space``
    names other parameters (under QFA, the quantized layers' gates and adapters).
    """

    def __init__(self, model: nn.Module, space: PruningSpace, base: torch.optim.Optimizer,
                 config: HESSOConfig, elastic: ElasticConfig, *, probe: Callable[[], float] | None = None,
                 view_space: PruningSpace | None = None):
        lora = lora_factors(model)
        self.config = config.resolve(lora=bool(lora), probe=probe is not None, activations=False)
        if self.config.criterion == ELASTIC_REFUSED:
            raise ConfigError(ELASTIC_REFUSAL)
        if self.config.pricing == "measured" and probe is None:
            raise ConfigError("pricing 'measured' needs a probe: Elastic(..., probe=fn), fn() returning the model's "
                              "loss on a fixed batch (HFOTOTrainer passes one); or use pricing 'saliency'")
        self.elastic = elastic
        self.space = space
        self.targets = size_targets(space, elastic.sizes, self.config)
        self.base = base
        super().__init__(base.param_groups, base.defaults)
        self.param_groups = base.param_groups
        self.state = base.state
        self.model_params = dict(model.named_parameters())
        self._lora = lora
        self.criterion = make_criterion(self.config, sliced=tuple(sliced_params(space, lora)))
        if view_space is not None and len(view_space) != len(space):
            raise ValueError("view_space must hold the same groups as space, in the same order")
        # with QFA, ``space`` names the quantized layers' gates and adapters, ``view_space`` the model's linears
        self.view = MaskedView(model, view_space or space)
        self._loss = probe
        self.prices: list[dict[str, Any]] = []  # measured pricing's trials, one entry per ranking
        # whole layers are ranked by block influence (as HESSO does), counted on the full model's passes only
        self._turn = LayerTurn(model, space, training_only=True)
        if self._turn:
            self._turn.attach()
        self.step_count = 0
        self.removed_flags: torch.Tensor | None = None  # (sizes, groups), largest size first
        self.rankings = 0

    # Schedule ----------------------------------------------------------------------------------
    def _ranks_after(self, step: int) -> bool:
        """Whether the keep-sets are (re)planned once optimizer step ``step`` is taken (for step + 1)."""
        e, nxt = self.elastic, step + 1
        if nxt < e.start or nxt > e.last_ranking:
            return False
        return nxt == e.start or (e.refresh_every > 0 and (nxt - e.start) % e.refresh_every == 0)

    def sizes_for_step(self) -> tuple[float, ...]:
        """The sizes whose sub-networks train in the coming step: none before ``start``; then the smallest
        and ``samples`` of the others, drawn by a rule seeded with the step (the same after a resume)."""
        if self.removed_flags is None or self.step_count < self.elastic.start:
            return ()
        sizes = self.elastic.sizes
        others = list(sizes[:-1])
        rng = random.Random(self.elastic.seed * 1_000_003 + self.step_count)
        drawn = rng.sample(others, min(self.elastic.samples, len(others)))
        return (sizes[-1], *sorted(drawn))

    def removed(self, size: float) -> torch.Tensor:
        """The removed-group flags of ``size`` (one of the configured sizes) under the current keep-sets."""
        if self.removed_flags is None:
            raise RuntimeError("the keep-sets are planned at elastic_start; none exist yet")
        try:
            return self.removed_flags[self.elastic.sizes.index(size)]
        except ValueError:
            raise ConfigError(f"size {size} is not one of this run's sizes {list(self.elastic.sizes)}") from None

    @contextlib.contextmanager
    def subnetwork(self, size: float) -> Iterator[None]:
        """Run the model inside this block as the sub-network of ``size`` (a masked view: no weight changes)."""
        flags = self.removed(size)
        if self._turn:
            self._turn.detach()
        try:
            with self.view.removed(flags):
                yield
        finally:
            if self._turn:
                self._turn.attach()

    # Step --------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        step = self.step_count
        ranks = self._ranks_after(step)
        accumulate = step < self.elastic.last_ranking
        self.criterion.begin_step(self.model_params, self.space, accumulate=accumulate, measure=ranks)
        self.base.step()
        self.criterion.end_step(self.model_params, self.space, self._lora)
        if ranks:
            self._plan()
        self.step_count += 1
        return loss

    def _plan(self) -> None:
        score = self.criterion.rank(self.space, torch.ones(len(self.space), dtype=torch.bool))
        if score is None:
            raise RuntimeError(f"the {self.config.criterion} criterion had no evidence at step {self.step_count + 1}")
        device = next(iter(self.model_params.values())).device  # NCCL cannot reduce a CPU tensor
        if self._turn:  # activations differ per data-parallel rank: their counts are summed first
            score = self._turn.place(score, self.space, all_reduce_sum(self._turn.state(), device))
        if self.config.pricing == "measured":  # kinds priced by the loss their removal costs, tried on masked views
            score, trials = price_kinds(self.space, score, torch.zeros(len(self.space), dtype=torch.bool),
                                        self.targets[-1], lambda flags: self._masked_loss(flags, device),
                                        self.config.rules)
            self.prices.append({"step": self.step_count + 1, "kinds": [t.to_dict() for t in trials]})
        self.removed_flags = nested_removals(self.space, score, self.targets, self.config)
        self.rankings += 1

    @torch.no_grad()
    def _masked_loss(self, flags: torch.Tensor, device: torch.device) -> float:
        """The probe's loss with the flagged groups masked, averaged over data-parallel ranks."""
        with self.view.removed(flags):
            value = float(self._loss())
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            total = all_reduce_sum(torch.tensor([value], dtype=torch.float64), device)
            value = float(total) / torch.distributed.get_world_size()
        return value

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    # Reporting -----------------------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        """Per size: the fraction of prunable parameters its keep-set removes."""
        if self.removed_flags is None:
            return {}
        total = max(self.space.prunable_params, 1)
        return {f"size_{s:g}_pruned_fraction": Plan.from_mask(self.space, row).pruned_params() / total
                for s, row in zip(self.elastic.sizes, self.removed_flags, strict=True)}

    def record(self) -> dict[str, Any]:
        """The settings that ran (elastic schedule, resolved criterion, rules), as checkpoints record them."""
        c = self.config
        return {"elastic": self.elastic.to_dict(), "criterion": c.criterion, "selection": c.selection,
                "pricing": c.pricing, "layout": c.layout, "ffn_multiple": c.ffn_multiple, "min_keep": c.min_keep,
                "weights": dataclasses.asdict(c.weights), "saliency_ema": c.saliency_ema}

    # Checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        sd = self.base.state_dict()
        sd["elastic"] = {
            "step_count": self.step_count,
            "removed": None if self.removed_flags is None else self.removed_flags.clone(),
            "rankings": self.rankings,
            "evidence": self.criterion.state(),
            "layer_turn": self._turn.state() if self._turn else None,
            "prices": [dict(p) for p in self.prices],
            "record": self.record(),
            "groups": len(self.space),
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        sd = dict(state_dict)
        e = sd.pop("elastic", None)
        if e is None:
            raise ResumeError("this optimizer state was not saved by an elastic run (no 'elastic' entry)")
        if e["groups"] != len(self.space):
            raise ResumeError("the saved elastic state belongs to a different pruning space (model or groups changed)")
        mine, saved = self.record(), dict(e["record"])
        # settings added since the checkpoint was written: it trained with their defaults
        saved["elastic"] = {**{f.name: f.default for f in dataclasses.fields(ElasticConfig)
                               if f.default is not dataclasses.MISSING}, **saved.get("elastic", {})}
        changed = sorted(k for k in set(mine) | set(saved) if mine.get(k) != saved.get(k))
        if changed:
            raise ResumeError(f"resuming with changed elastic settings is not supported (changed: {changed})")
        self.base.load_state_dict(sd)
        self.state = self.base.state
        self.param_groups = self.base.param_groups
        self.step_count = e["step_count"]
        self.removed_flags = None if e["removed"] is None else e["removed"].clone()
        self.rankings = e["rankings"]
        self.prices = [dict(p) for p in e.get("prices", [])]
        self.criterion.load(e["evidence"])
        if self._turn:
            self._turn.load(e["layer_turn"])

