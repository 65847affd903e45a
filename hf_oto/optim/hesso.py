"""HESSO: a wrapper around a real torch optimizer that drives redundant groups to exactly zero."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import nn

from hf_oto.groups.space import PruningSpace
from hf_oto.optim.budget import Layout, Plan, build_items, max_prunable, select
from hf_oto.optim.saliency import SaliencyWeights, group_statistics, saliency


class HESSO(torch.optim.Optimizer):
    """Half-space style structured sparsity on the groups of a :class:`PruningSpace`.

    The base optimizer (AdamW by default, or any ``torch.optim`` class or instance, with its own
    param groups) takes every step. From ``start_pruning_step`` on, ``pruning_steps`` are split into
    ``pruning_periods``; at the start of each period the not-yet-pruned groups are ranked by
    saliency and the period's share of the parameter budget is marked redundant; over the period
    those groups shrink linearly to exactly zero, and from then on they (and their optimizer state)
    stay zero.
    """

    def __init__(
        self,
        model: nn.Module,
        space: PruningSpace,
        *,
        base_optimizer: type[torch.optim.Optimizer] | torch.optim.Optimizer = torch.optim.AdamW,
        base_kwargs: dict[str, Any] | None = None,
        param_groups: list[dict[str, Any]] | None = None,
        target_sparsity: float | None = 0.5,
        target_params: int | None = None,
        start_pruning_step: int = 0,
        pruning_steps: int = 100,
        pruning_periods: int = 10,
        layout: Layout = "global",
        ffn_multiple: int = 8,
        min_keep: int = 1,
        weights: SaliencyWeights | None = None,
        saliency_ema: float | None = None,
        ema_interval: int = 10,
        tolerance: float = 0.01,
    ):
        if pruning_periods < 1:
            raise ValueError(f"pruning_periods must be at least 1, got {pruning_periods}")
        if pruning_steps < pruning_periods:
            raise ValueError(
                f"pruning_steps ({pruning_steps}) must be at least pruning_periods ({pruning_periods}): "
                "each period needs a step"
            )
        if start_pruning_step < 0:
            raise ValueError(f"start_pruning_step must be >= 0, got {start_pruning_step}")
        if layout not in ("global", "uniform"):
            raise ValueError(f"layout must be 'global' or 'uniform', got {layout!r}")
        if saliency_ema is not None and not 0.0 <= saliency_ema < 1.0:
            raise ValueError(f"saliency_ema must be in [0, 1), got {saliency_ema}")
        if target_params is None:
            if target_sparsity is None or not 0.0 < target_sparsity < 1.0:
                raise ValueError(f"target_sparsity must be in (0, 1), got {target_sparsity}")
            target_params = int(round(space.prunable_params * target_sparsity))
        reachable = max_prunable(space, layout=layout, multiple=ffn_multiple, min_keep=min_keep)
        if not 0 < target_params <= reachable:
            raise ValueError(
                f"target of {target_params:,} pruned parameters cannot be reached: the constraints "
                f"(layout={layout!r}, ffn_multiple={ffn_multiple}, min_keep={min_keep}) allow at most "
                f"{reachable:,} of {space.prunable_params:,} prunable parameters"
            )

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
        self.space = space
        self.settings = dict(
            target_params=int(target_params), start_pruning_step=start_pruning_step,
            pruning_steps=pruning_steps, pruning_periods=pruning_periods, layout=layout,
            ffn_multiple=ffn_multiple, min_keep=min_keep, saliency_ema=saliency_ema,
            ema_interval=ema_interval, tolerance=tolerance,
        )
        self.weights = weights or SaliencyWeights()
        self.period_length = pruning_steps // pruning_periods
        self.step_count = 0
        self.pruned = torch.zeros(len(space), dtype=torch.bool)
        self.redundant = torch.zeros(len(space), dtype=torch.bool)
        self.ema: torch.Tensor | None = None
        self._zero_index: dict | None = None
        self._redundant_index: dict | None = None

    # Schedule ----------------------------------------------------------------------------------
    def _position(self, step: int) -> tuple[int, int] | None:
        """(period, step within period) if ``step`` lies in a pruning period, else None."""
        s = self.settings
        rel = step - s["start_pruning_step"]
        if rel < 0 or rel >= self.period_length * s["pruning_periods"]:
            return None
        return rel // self.period_length, rel % self.period_length

    def _wants_stats(self, step: int, pos) -> bool:
        """Saliency is measured at each period start, and every ema_interval steps with an EMA."""
        if pos is not None and pos[1] == 0:
            return True
        s = self.settings
        if s["saliency_ema"] is None:
            return False
        begin = s["start_pruning_step"] - 10 * s["ema_interval"]
        end = s["start_pruning_step"] + self.period_length * s["pruning_periods"]
        return begin <= step < end and step % s["ema_interval"] == 0

    # Step --------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        step = self.step_count
        pos = self._position(step)
        snapshot = None
        if self._wants_stats(step, pos):
            snapshot = {n: self.model_params[n].detach().clone() for n in self._sliced_params()}
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        else:
            loss = None
        self._zero_pruned_grads()  # zero grads + zero moments => the base step leaves them at zero
        self.base.step()
        if snapshot is not None:
            update = {n: self.model_params[n].detach() - snapshot.pop(n) for n in list(snapshot)}
            score = saliency(group_statistics(self.model_params, self.space, update), self.weights)
            del update
            beta = self.settings["saliency_ema"]
            if beta is not None:
                self.ema = score if self.ema is None else beta * self.ema + (1 - beta) * score
            if pos is not None and pos[1] == 0:
                self._mark_redundant(pos[0], self.ema if beta is not None else score)
        if pos is not None:
            period, t = pos
            factor = (self.period_length - t - 1) / (self.period_length - t)
            self._scale_redundant(factor)
            if t == self.period_length - 1:
                self.pruned |= self.redundant
                self.redundant.zero_()
                self._zero_index = self._redundant_index = None
                self._zero_pruned(include_state=True)  # once: the moments of newly pruned groups
        self._zero_pruned(include_state=False)
        self.step_count += 1
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def _sliced_params(self) -> list[str]:
        return sorted({s.param for gs in self.space.sets if gs.prunable for s in gs.slices})

    def _mark_redundant(self, period: int, score: torch.Tensor) -> None:
        s = self.settings
        target = s["target_params"] * (period + 1) // s["pruning_periods"]
        plan = Plan(self.space)
        taken = self.pruned | self.redundant
        for k, gs in enumerate(self.space.sets):
            off = self.space.set_offset(k)
            plan.removed[k] = {j for j in range(gs.count) if bool(taken[off + j])}
        items = build_items(self.space, score, plan, layout=s["layout"], multiple=s["ffn_multiple"],
                            min_keep=s["min_keep"])
        select(plan, items, target, s["tolerance"] if period == s["pruning_periods"] - 1 else 0.0)
        chosen = torch.zeros_like(self.pruned)
        for k, removed in enumerate(plan.removed):
            off = self.space.set_offset(k)
            for j in removed:
                chosen[off + j] = True
        self.redundant = chosen & ~self.pruned
        self._redundant_index = None

    # Projection --------------------------------------------------------------------------------
    def _indices(self, mask: torch.Tensor) -> dict[tuple[str, int, int | None], torch.Tensor]:
        out: dict[tuple[str, int, int | None], list[torch.Tensor]] = defaultdict(list)
        for k, gs in enumerate(self.space.sets):
            off = self.space.set_offset(k)
            sel = torch.nonzero(mask[off:off + gs.count]).flatten()
            if len(sel) == 0:
                continue
            for spec in gs.slices:
                out[(spec.param, spec.dim, spec.expert)].append(spec.index[sel].flatten())
        return {key: torch.unique(torch.cat(v)) for key, v in out.items()}

    def _apply(self, index, fn, include_state: bool) -> None:
        for (name, dim, expert), idx in index.items():
            p = self.model_params[name]
            targets = [p.data]
            if include_state:
                targets += [v for v in self.state.get(p, {}).values()
                            if torch.is_tensor(v) and v.shape == p.shape]
            for t in targets:
                view, d = (t[expert], dim - 1) if expert is not None else (t, dim)
                fn(view, d, idx.to(t.device))

    def _scale_redundant(self, factor: float) -> None:
        if not bool(self.redundant.any()):
            return
        if self._redundant_index is None:
            self._redundant_index = self._indices(self.redundant)

        def scale(view, d, idx):
            view.index_copy_(d, idx, view.index_select(d, idx) * factor)

        self._apply(self._redundant_index, scale, include_state=False)

    def _pruned_index(self) -> dict | None:
        if not bool(self.pruned.any()):
            return None
        if self._zero_index is None:
            self._zero_index = self._indices(self.pruned)
        return self._zero_index

    def _zero_pruned(self, include_state: bool) -> None:
        """Pruned slices back to exactly zero (parameters; optimizer moments too when asked)."""
        index = self._pruned_index()
        if index is not None:
            self._apply(index, lambda view, d, idx: view.index_fill_(d, idx, 0.0), include_state)

    def _zero_pruned_grads(self) -> None:
        index = self._pruned_index()
        if index is None:
            return
        for (name, dim, expert), idx in index.items():
            g = self.model_params[name].grad
            if g is not None:
                view, d = (g[expert], dim - 1) if expert is not None else (g, dim)
                view.index_fill_(d, idx.to(g.device), 0.0)

    # Reporting ---------------------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        """Group sparsity, pruned parameter fraction, per-kind counts and redundant/important norms."""
        plan = Plan(self.space)
        for k, gs in enumerate(self.space.sets):
            off = self.space.set_offset(k)
            plan.removed[k] = {j for j in range(gs.count) if bool(self.pruned[off + j])}
        out: dict[str, float] = {
            "group_sparsity": float(self.pruned.float().mean()) if len(self.space) else 0.0,
            "pruned_params": float(plan.pruned_params()),
            "pruned_param_fraction": plan.pruned_params() / max(self.space.prunable_params, 1),
        }
        for kind in sorted({gs.kind for gs in self.space.sets}):
            out[f"pruned_{kind}"] = float(sum(len(plan.removed[k]) for k, gs in enumerate(self.space.sets)
                                              if gs.kind == kind))
        sq = group_statistics(self.model_params, self.space)["sq"]
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
            "ema": None if self.ema is None else self.ema.clone(),
            "settings": dict(self.settings),
            "weights": vars(self.weights).copy(),
            "space": self._fingerprint(),
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        sd = dict(state_dict)
        h = sd.pop("hesso", None)
        if h is None:
            raise ValueError("this optimizer state was not saved by HESSO (no 'hesso' entry)")
        if h["space"] != self._fingerprint():
            raise ValueError("the saved HESSO state belongs to a different pruning space (model or groups changed)")
        if h["settings"] != self.settings or h["weights"] != vars(self.weights):
            changed = {k for k in self.settings if h["settings"].get(k) != self.settings[k]}
            raise ValueError(f"resuming with a changed pruning config is not supported (changed: {sorted(changed)})")
        self.base.load_state_dict(sd)
        self.state = self.base.state
        self.param_groups = self.base.param_groups
        self.step_count = h["step_count"]
        self.pruned = h["pruned"].clone()
        self.redundant = h["redundant"].clone()
        self.ema = None if h["ema"] is None else h["ema"].clone()
        self._zero_index = self._redundant_index = None
