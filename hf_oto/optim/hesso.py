"""HESSO: a wrapper around a real torch optimizer that drives redundant groups to exactly zero."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from hf_oto.errors import ConfigError, ResumeError
from hf_oto.groups.experts import route_around_removed_experts
from hf_oto.groups.space import ExpertInfo, PruningSpace
from hf_oto.manifest import HESSORecord
from hf_oto.optim import slices
from hf_oto.optim.activations import linear_consumers
from hf_oto.optim.budget import Plan, build_items, select
from hf_oto.optim.config import HESSOConfig
from hf_oto.optim.cric import CRIC, CRICConfig, unit
from hf_oto.optim.criteria import make_criterion
from hf_oto.optim.influence import LayerTurn
from hf_oto.optim.pricing import price_kinds, zeroing_probe
from hf_oto.optim.saliency import group_statistics, lora_factors, sliced_params
from hf_oto.optim.shard import all_reduce_sum, is_sharded, row_range


class HESSO(torch.optim.Optimizer):
    """Half-space style structured sparsity on the groups of a :class:`PruningSpace`.

    ``HESSO(model, space, base_optimizer, config, cric=CRICConfig(...))``. The base optimizer (AdamW
    by default, or any ``torch.optim`` class or instance, with its own param groups) takes every
    step. From ``config.start_pruning_step`` on, ``pruning_steps`` are split into ``pruning_periods``;
    at the start of each period the not-yet-pruned groups are ranked by saliency and the period's
    share of the parameter budget is marked redundant; over the period those groups shrink linearly
    to exactly zero, and from then on they (and their optimizer state) stay zero. With ``cric`` the
    corrective cycle runs first (from ``start_pruning_step``) and the periods start when it ends; it
    needs the training loss, given by ``step(closure)`` or by ``observe_loss(loss)`` before each
    ``step()``. With ``config.pricing="measured"``, ``probe`` returns the loss of the model as it is on
    a fixed batch (no gradients); HESSO calls it with trial groups zeroed at each period start.
    """

    def __init__(
        self,
        model: nn.Module,
        space: PruningSpace,
        base_optimizer: type[torch.optim.Optimizer] | torch.optim.Optimizer = torch.optim.AdamW,
        config: HESSOConfig | None = None,
        *,
        cric: CRICConfig | None = None,
        base_kwargs: dict[str, Any] | None = None,
        param_groups: list[dict[str, Any]] | None = None,
        probe: Callable[[], float] | None = None,
    ):
        config = config or HESSOConfig()
        if not isinstance(config, HESSOConfig):
            raise ConfigError(f"config must be a HESSOConfig, got {type(config).__name__}")
        lora = lora_factors(model)  # LoRA: saliency is judged on the effective weight W + s*B@A
        config = config.resolve(lora=bool(lora), cric=cric is not None, probe=probe is not None,
                                activations=_watchable(model, space))
        if config.pricing == "measured" and probe is None:
            raise ConfigError("pricing 'measured' needs a probe: HESSO(..., probe=fn), fn() returning the model's "
                              "loss on a fixed batch (HFOTOTrainer passes one); or use pricing 'saliency'")
        self.target_params = config.validate(space, cric=cric)

        if isinstance(base_optimizer, torch.optim.Optimizer):
            base = base_optimizer
        else:
            groups = param_groups or [p for p in model.parameters() if p.requires_grad]
            base = base_optimizer(groups, **(base_kwargs or {}))
        self.base = base
        super().__init__(base.param_groups, base.defaults)
        # Share the base optimizer's groups and state: LR schedulers and checkpoints see one truth.
        self.param_groups = base.param_groups
        self.state = base.state

        self.model_params = dict(model.named_parameters())
        missing = {s.param for gs in space.sets for s in gs.slices} - set(self.model_params)
        if missing:
            raise ValueError(f"the pruning space names parameters the model does not have: {sorted(missing)[:3]}")
        self._rows: dict[str, tuple[int, int]] = {}  # FSDP2: (first row, rows) of each sharded param here
        for gs in space.sets:
            for spec in gs.slices:
                p = self.model_params[spec.param]
                if is_sharded(p):
                    if spec.expert is not None:
                        raise ValueError("MoE expert weights sharded by FSDP are not supported by HESSO")
                    self._rows[spec.param] = row_range(p)
        self.space = space
        # a zeroed expert is a removed one: the model routes around it (a no-op without expert groups)
        self._routing = route_around_removed_experts(model, space)
        # whole layers are ranked by how far they turn the residual stream on the training batches
        self._turn = LayerTurn(model, space, training_only=True)
        if self._turn:
            self._turn.attach()
        self._lora = lora
        self.config = config
        self.criterion = make_criterion(config, sliced=tuple(sliced_params(space, lora)))
        self.criterion.attach(model, space)
        self.period_length = config.pruning_steps // config.pruning_periods
        self.step_count = 0
        self.pruned = torch.zeros(len(space), dtype=torch.bool)
        self.redundant = torch.zeros(len(space), dtype=torch.bool)
        self._zero_index: list[slices.Target] | None = None
        self._redundant_index: list[slices.Target] | None = None
        self.cric_config = cric
        self.cric = CRIC(cric) if cric is not None else None
        self.prune_start: int | None = None if cric is not None else config.start_pruning_step
        self._loss: tuple[float, int] | None = None  # (sum, count) of observed losses
        # Pruned slices get zero gradients, so with zero moments the base step keeps them at zero; that is
        # verified for a few steps after each change instead of assumed (see _guard_before).
        self._clean_steps = 0
        self._always_rezero = False
        self._probe = None if probe is None else zeroing_probe(self.model_params, space,
                                                               lambda: self._rank_mean(probe()), self._rows)
        self.prices: list[dict[str, Any]] = []  # measured pricing's trials, one entry per period start

    def record(self) -> HESSORecord:
        """The settings that ran, as the manifest, the model card and checkpoints record them."""
        return HESSORecord.from_dict(dict(self.config.to_dict(), target_params=int(self.target_params),
                                          cric=None if self.cric_config is None else asdict(self.cric_config),
                                          prices=self.prices))

    # Schedule ----------------------------------------------------------------------------------
    def _position(self, step: int) -> tuple[int, int] | None:
        """(period, step within period) if ``step`` lies in a pruning period, else None."""
        if self.prune_start is None:
            return None
        rel = step - self.prune_start
        if rel < 0 or rel >= self.period_length * self.config.pruning_periods:
            return None
        return rel // self.period_length, rel % self.period_length

    def _wants_stats(self, step: int, pos) -> bool:
        """Saliency is measured at each period start, and every ema_interval steps with an EMA."""
        if pos is not None and pos[1] == 0:
            return True
        c = self.config
        if c.saliency_ema is None:
            return False
        start = self.prune_start if self.prune_start is not None else c.start_pruning_step
        begin = c.start_pruning_step - 10 * c.ema_interval
        end = start + self.period_length * c.pruning_periods
        return begin <= step < end and step % c.ema_interval == 0

    # Step --------------------------------------------------------------------------------------
    def observe_loss(self, loss: float | torch.Tensor) -> None:
        """Give the training loss to CRIC before ``step()`` (when not using a closure).

        Several calls before one step (gradient accumulation) are averaged.
        """
        value = float(loss.detach()) if torch.is_tensor(loss) else float(loss)
        total, count = self._loss if self._loss is not None else (0.0, 0)
        self._loss = (total + value, count + 1)

    def _cric_active(self, step: int) -> bool:
        return self.cric is not None and not self.cric.state.done and step >= self.config.start_pruning_step

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        step = self.step_count
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
            self._loss = None
            self.observe_loss(loss)
        cric_now = self._cric_active(step)
        pos = None if cric_now else self._position(step)
        cycle_start = cric_now and self.cric.state.t == 0
        period_start = pos is not None and pos[1] == 0
        # the criterion sees the gradients before the base step moves w, and the update after it
        self.criterion.begin_step(self.model_params, self.space, accumulate=self._accumulating(step),
                                  measure=cycle_start or self._wants_stats(step, pos))
        guard = self._guard_before()
        self.base.step()
        self._guard_after(guard)
        self.criterion.end_step(self.model_params, self.space, self._lora)
        ranked = None
        if cycle_start or period_start:
            ranked = self._with_layer_turn(self.criterion.rank(self.space, ~(self.pruned | self.redundant)))
        if ranked is not None and cycle_start:
            self.cric.start_cycle(ranked, self._full_budget, self)
        elif ranked is not None and period_start:
            self._mark(pos[0], ranked)
            self.criterion.on_period_start()
        if cric_now:
            if self.cric.step(self._need_loss(), self):  # its last cycle ended: the periods start next step
                self.prune_start = step + 1
        elif pos is not None:
            period, t = pos
            factor = (self.period_length - t - 1) / (self.period_length - t)
            self._scale_redundant(factor)
            if t == self.period_length - 1:
                # exact zeros, moments included, for the newly pruned groups (older ones already are)
                self._zero(self._redundant_index, include_state=True)
                self.pruned |= self.redundant
                self.redundant.zero_()
                self._zero_index = self._redundant_index = None
                self._clean_steps = 0
        self.step_count += 1
        return loss

    def _with_layer_turn(self, ranked: torch.Tensor | None) -> torch.Tensor | None:
        """``ranked`` with whole layers ordered by block influence, counted over every rank's batches."""
        if ranked is None or not self._turn:
            return ranked
        device = next(iter(self.model_params.values())).device  # NCCL cannot reduce a CPU tensor
        return self._turn.place(ranked, self.space, all_reduce_sum(self._turn.state(), device))

    def _accumulating(self, step: int) -> bool:
        """Whether the Taylor criterion still needs evidence: until the last period has started."""
        if self.prune_start is None:
            return True
        return step <= self.prune_start + self.period_length * (self.config.pruning_periods - 1)

    def _mark(self, period: int, ranked: torch.Tensor) -> None:
        """Mark the period's share of the budget redundant under ``ranked`` (blended with CRIC's ranking)."""
        if self.cric is not None and self.cric.rank is not None:
            blend = self.cric_config.blend
            ranked = blend * unit(ranked) + (1 - blend) * unit(self.cric.rank)
        if self.config.pricing == "measured":
            ranked = self._price(period, ranked)
        self._mark_redundant(period, ranked)

    def _price(self, period: int, ranked: torch.Tensor) -> torch.Tensor:
        """``ranked`` with each kind scaled to the loss increase measured when it alone pays the budget."""
        c, gone = self.config, self.pruned | self.redundant
        remaining = self.target_params - Plan.from_mask(self.space, gone).pruned_params()
        priced, trials = price_kinds(self.space, ranked, gone, remaining, self._probe, c.rules)
        self.prices.append({"step": self.step_count, "period": period, "kinds": [t.to_dict() for t in trials]})
        return priced

    def _need_loss(self) -> float:
        if self._loss is None:
            raise RuntimeError("CRIC needs the training loss: call step(closure) or observe_loss(loss) before step()")
        (total, count), self._loss = self._loss, None
        return self._rank_mean(total / count)  # CRIC must judge the same (global) loss on every rank

    def _rank_mean(self, value: float) -> float:
        """``value`` averaged over data-parallel ranks (they see different batches but must decide alike)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # reduced on the parameters' device: NCCL cannot reduce a CPU tensor
            device = next(iter(self.model_params.values())).device
            t = all_reduce_sum(torch.tensor([value], dtype=torch.float64), device)
            value = float(t) / torch.distributed.get_world_size()
        return value

    def _items(self, score: torch.Tensor, plan: Plan) -> list:
        """The planner's candidate removals under ``score``, with this run's layout and selection rules."""
        return build_items(self.space, score, plan, self.config.rules)

    def _full_budget(self, score: torch.Tensor, removed: torch.Tensor | None = None) -> torch.Tensor:
        """The groups the whole budget would remove under ``score`` now, on top of ``removed`` (a flag
        per group; none by default: CRIC's candidates)."""
        c = self.config
        plan = Plan(self.space) if removed is None else Plan.from_mask(self.space, removed)
        items = self._items(score, plan)
        select(plan, items, self.target_params, c.tolerance)
        return plan.mask()

    # CRIC's actuator: the trial slices, their snapshot and their decay --------------------------
    def targets(self, groups: torch.Tensor) -> list[slices.Target]:
        """Where the slices of the flagged groups live (this rank's rows under FSDP)."""
        return slices.build_targets(self.space, groups, self.model_params, self._rows)

    def snapshot(self, targets: list[slices.Target]) -> dict[Any, torch.Tensor]:
        """A copy of only the targeted slices."""
        return {tgt.key: slices.gather(v, tgt) for v, tgt in self._each(targets, lambda p: [p.data])}

    def restore(self, targets: list[slices.Target], saved: dict[Any, torch.Tensor]) -> None:
        """Write a :meth:`snapshot` back."""
        for v, tgt in self._each(targets, lambda p: [p.data]):
            slices.scatter_(v, tgt, saved[tgt.key])

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def _mark_redundant(self, period: int, score: torch.Tensor) -> None:
        c = self.config
        target = self.target_params * (period + 1) // c.pruning_periods
        plan = Plan.from_mask(self.space, self.pruned | self.redundant)
        items = self._items(score, plan)
        if period == c.pruning_periods - 1:
            # every rank plans alike: one warning line (rank 0's) is enough
            rank0 = not (torch.distributed.is_available() and torch.distributed.is_initialized()
                         and torch.distributed.get_rank() > 0)
            select(plan, items, target, c.tolerance, warn=rank0)
        else:
            # This period's share comes out of what the whole budget would remove now, so an early
            # period never takes what leaves the budget unreachable later (every FFN chunk when the
            # rest only fits as half of the heads). A coarse item (half of the heads) may overshoot
            # the share, never the budget.
            full = Plan.from_mask(self.space, self._full_budget(score, plan.mask()))
            items = [it for it in items if all(set(ch) <= full.removed[k] for k, ch in it.members)]
            select(plan, items, target, 0.0, cap=self.target_params)
        self.redundant = plan.mask() & ~self.pruned
        self._redundant_index = None

    # Projection --------------------------------------------------------------------------------
    def _each(self, targets: list[slices.Target] | None, tensors_of):
        """(view, target) for every target and every tensor ``tensors_of(param)`` of its parameter."""
        for tgt in targets or ():
            for t in tensors_of(self.model_params[tgt.name]):
                yield slices.view(t, tgt), tgt

    def _reduce_device(self) -> torch.device:
        return self.model_params[next(iter(self._rows))].device

    def _scale_redundant(self, factor: float) -> None:
        if not bool(self.redundant.any()):
            return
        if self._redundant_index is None:
            self._redundant_index = self.targets(self.redundant)
        self.scale(self._redundant_index, factor)

    def scale(self, targets: list[slices.Target], factor: float) -> None:
        """Multiply the targeted parameter slices by ``factor`` in place (optimizer state untouched)."""
        for v, tgt in self._each(targets, lambda p: [p.data]):
            slices.scale_(v, tgt, factor)

    def _pruned_index(self) -> list[slices.Target] | None:
        if not bool(self.pruned.any()):
            return None
        if self._zero_index is None:
            self._zero_index = self.targets(self.pruned)
        return self._zero_index

    def _zero(self, targets: list[slices.Target] | None, include_state: bool) -> None:
        """Targeted slices to exactly zero: parameters, and optimizer moments too when asked."""
        def tensors(p: torch.Tensor) -> list[torch.Tensor]:
            return [p.data] + (slices.moments(self.state, p) if include_state else [])

        for v, tgt in self._each(targets, tensors):
            slices.zero_(v, tgt)

    # A pruned group's gradient is exactly zero when all of its slices are: its channel's output is
    # zero (a zero row feeding a gate or a zero value head) and its consumers read it through zero
    # columns. With zero moments the base step then leaves it at zero, so steady-state steps do no
    # extra work. That is checked, not assumed: for a few steps after each change HESSO verifies
    # that the gradients and the stepped weights of pruned slices are zero (an activation with
    # f(0) != 0, or an optimizer that moves zero weights, fails it) and from the first failure on it
    # zeroes their gradients before and their weights after every step.
    _CHECK_STEPS = 3

    def _guard_before(self) -> tuple[list[slices.Target], bool] | None:
        """Before the base step: (pruned targets, whether their grads were zero) when guarding."""
        targets = self._pruned_index()
        if targets is None or (self._clean_steps >= self._CHECK_STEPS and not self._always_rezero):
            return None
        clean = True
        for g, tgt in self._each(targets, lambda p: [] if p.grad is None else [p.grad]):
            if not self._always_rezero:
                clean = clean and slices.is_zero(g, tgt)
            slices.zero_(g, tgt)
        return targets, clean

    def _guard_after(self, guard: tuple[list[slices.Target], bool] | None) -> None:
        if guard is None:
            return
        targets, clean = guard
        if self._always_rezero:
            self._zero(targets, include_state=False)
            return
        for v, tgt in self._each(targets, lambda p: [p.data]):
            clean = clean and slices.is_zero(v, tgt)
        if self._rows:  # every rank must take the same decision
            clean = float(all_reduce_sum(torch.tensor([float(not clean)]), self._reduce_device())) == 0.0
        if clean:
            self._clean_steps += 1
        else:
            self._always_rezero = True
            self._zero(targets, include_state=True)

    # Reporting ---------------------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        """Group sparsity, pruned parameter fraction, per-kind counts and redundant/important norms."""
        plan = Plan.from_mask(self.space, self.pruned)
        out: dict[str, float] = {
            "group_sparsity": float(self.pruned.float().mean()) if len(self.space) else 0.0,
            "pruned_params": float(plan.pruned_params()),
            "pruned_param_fraction": plan.pruned_params() / max(self.space.prunable_params, 1),
        }
        for kind in sorted({gs.kind for gs in self.space.sets}):
            out[f"pruned_{kind}"] = float(sum(len(plan.removed[k]) for k, gs in enumerate(self.space.sets)
                                              if gs.kind == kind))
        sq = group_statistics(self.model_params, self.space).sq
        important = ~(self.pruned | self.redundant)
        out["norm_redundant"] = float(sq[self.redundant].sum().sqrt())
        out["norm_important"] = float(sq[important].sum().sqrt())
        return out

    # Checkpoints -------------------------------------------------------------------------------
    def _fingerprint(self) -> dict[str, Any]:
        names = [gs.name(0) for gs in self.space.sets]
        return {"groups": len(self.space), "sets": len(names), "first": names[:1], "last": names[-1:]}

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        sd = self.base.state_dict()
        sd["hesso"] = {
            "step_count": self.step_count,
            "pruned": self.pruned.clone(),
            "redundant": self.redundant.clone(),
            # the criterion's evidence, under the entry the checkpoint format has always used for it
            "ema": self.criterion.state() if self.criterion.state_key == "ema" else None,
            "taylor": self.criterion.state() if self.criterion.state_key == "taylor" else None,
            "activations": self.criterion.state() if self.criterion.state_key == "activations" else None,
            "record": dataclasses.replace(self.record(), prices=()).to_dict(),
            "space": self._fingerprint(),
            "prune_start": self.prune_start,
            "cric": None if self.cric is None else self.cric.state.to_dict(),
            "cric_rank": None if self.cric is None or self.cric.rank is None else self.cric.rank.clone(),
            "clean_steps": self._clean_steps,
            "always_rezero": self._always_rezero,
            "prices": [dict(p) for p in self.prices],
            "layer_turn": self._turn.state() if self._turn else None,
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        sd = dict(state_dict)
        h = sd.pop("hesso", None)
        if h is None:
            raise ResumeError("this optimizer state was not saved by HESSO (no 'hesso' entry)")
        if h["space"] != self._fingerprint():
            raise ResumeError("the saved HESSO state belongs to a different pruning space (model or groups changed)")
        changed = _saved_record(h).changed(self.record())
        if changed:
            raise ResumeError(f"resuming with a changed pruning config is not supported (changed: {changed})")
        self.base.load_state_dict(sd)
        self.state = self.base.state
        self.param_groups = self.base.param_groups
        self.step_count = h["step_count"]
        self.pruned = h["pruned"].clone()
        self.redundant = h["redundant"].clone()
        self.criterion.load(h.get(self.criterion.state_key))
        self._zero_index = self._redundant_index = None
        self.prune_start = h["prune_start"]
        self._clean_steps, self._always_rezero = h["clean_steps"], h["always_rezero"]
        self.prices = [dict(p) for p in h.get("prices", [])]
        if self._turn:
            self._turn.load(h.get("layer_turn"))  # None: saved before layers were ranked by it
        if self.cric is not None:
            self.cric.load(h["cric"], h["cric_rank"])


def _watchable(model: nn.Module, space: PruningSpace) -> bool:
    """Whether the ``wanda_sp`` criterion can rank ``space`` (what "auto" needs to pick it, in the uniform
    layout: :meth:`HESSOConfig.resolve`): some linear consumes its groups, and no group is a whole expert
    (experts have no consumer it watches)."""
    return bool(linear_consumers(model, space)) and not any(isinstance(gs.info, ExpertInfo) for gs in space.sets)


def _saved_record(h: dict[str, Any]) -> HESSORecord:
    """The settings a HESSO state was saved with; states from before the record (hf-oto 0.1 to 0.2)
    kept them as three entries, and options added since then were absent where they were at their
    defaults, which :class:`HESSORecord` reads as what ran before them."""
    if "record" in h:
        return HESSORecord.from_dict(h["record"])
    return HESSORecord.from_dict(dict(h["settings"], weights=h["weights"], cric=h["cric_config"]))
