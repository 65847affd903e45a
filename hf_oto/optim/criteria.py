"""How HESSO ranks groups while it trains: one strategy object per criterion, in one registry.

HESSO drives the schedule; a criterion only watches and ranks. Each training step HESSO calls
:meth:`~TrainingCriterion.begin_step` before the base optimizer moves the weights (the gradients are
there) and :meth:`~TrainingCriterion.end_step` after it (the update is known). At a CRIC cycle or a
period start it asks for :meth:`~TrainingCriterion.rank` and, after a period's removals are marked,
calls :meth:`~TrainingCriterion.on_period_start`. Their evidence is part of HESSO's state dict, so a
resumed run ranks exactly as an uninterrupted one.

``"wanda_sp"`` also watches the training passes' activations, through forward hooks that
:meth:`~TrainingCriterion.attach` installs on the model.

The one-shot criteria (magnitude, Taylor on calibration batches, Wanda-sp) are
:class:`~hf_oto.optim.importance.Importance` objects in :mod:`hf_oto.optim.oneshot`: they score a
model once and have no training-time state. Their names are :data:`~hf_oto.optim.oneshot.ONESHOT_CRITERIA`,
these are :data:`TRAINING_CRITERIA`. ``"taylor"`` and ``"wanda_sp"`` are in both on purpose: each names
one quantity (the sum of ``|w * g|`` over a group; the activation-weighted magnitude of its input
columns), which HESSO measures over training steps and ``hf-oto oneshot`` over calibration batches;
the command says which evidence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from hf_oto.errors import ConfigError
from hf_oto.groups.space import PruningSpace
from hf_oto.optim.activations import InputNorms, activation_scores, linear_consumers
from hf_oto.optim.importance import Evidence, HESSOSaliency, per_kind_relative
from hf_oto.optim.saliency import LoraFactors, SaliencyWeights, group_statistics
from hf_oto.optim.shard import all_reduce_sum, is_sharded

if TYPE_CHECKING:
    from hf_oto.optim.config import HESSOConfig


@dataclass
class TrainingCriterion:
    """The base strategy: no evidence, no ranking. Subclasses set ``name`` and override what they need."""

    name: ClassVar[str] = ""
    state_key: ClassVar[str] = ""  # the HESSO state-dict entry that holds the evidence (checkpoint format)

    def begin_step(self, params: dict[str, torch.Tensor], space: PruningSpace, *, accumulate: bool,
                   measure: bool) -> None:
        """Before the base step. ``accumulate``: the schedule still needs evidence; ``measure``: a
        ranking is wanted from this step."""

    def end_step(self, params: dict[str, torch.Tensor], space: PruningSpace,
                 lora: dict[str, LoraFactors]) -> None:
        """After the base step."""

    def attach(self, model: nn.Module, space: PruningSpace) -> None:
        """Called once by the optimizer with the model it trains (a criterion that watches activations hooks it)."""

    def rank(self, space: PruningSpace, alive: torch.Tensor) -> torch.Tensor | None:
        """The groups' scores now (higher = keep); ``alive`` flags the groups not pruned or marked."""
        return None

    def on_period_start(self) -> None:
        """A period's removals were just marked under :meth:`rank`."""

    def state(self) -> torch.Tensor | None:
        """The evidence to checkpoint (a copy), or None."""
        return None

    def load(self, value: torch.Tensor | None) -> None:
        """Restore what :meth:`state` returned."""


@dataclass
class AccumulatedFisher(TrainingCriterion):
    """``sum_t (w . g_t)^2`` per group over every step from the first (not reset at period starts):
    the empirical Fisher estimate of the loss increase when the group is removed."""

    name: ClassVar[str] = "fisher"
    state_key: ClassVar[str] = "taylor"
    evidence: torch.Tensor | None = None

    def _term(self, params: dict[str, torch.Tensor], space: PruningSpace) -> torch.Tensor:
        return group_statistics(params, space, grad_only=True).xg.square()

    def begin_step(self, params, space, *, accumulate, measure) -> None:
        if accumulate:
            term = self._term(params, space)
            self.evidence = term if self.evidence is None else self.evidence.add_(term)

    def rank(self, space, alive):
        return self.evidence

    def state(self):
        return None if self.evidence is None else self.evidence.clone()

    def load(self, value):
        self.evidence = None if value is None else value.clone()


@dataclass
class AccumulatedTaylor(AccumulatedFisher):
    """``sum |w * g|`` per group over the steps since the previous period start, relative within each
    kind (over the groups still alive)."""

    name: ClassVar[str] = "taylor"

    def _term(self, params, space):
        return group_statistics(params, space, grad_only=True).ag

    def rank(self, space, alive):
        return None if self.evidence is None else per_kind_relative(space, self.evidence, alive)

    def on_period_start(self) -> None:
        self.evidence = None  # its per-kind means move with the alive set: each period ranks on its own steps


@dataclass
class UpdateSaliency(TrainingCriterion):
    """HESSO's weighted saliency of one step's update (magnitude, average magnitude, cosine between
    weight and update, |w . g|), measured when a ranking is wanted, optionally smoothed by an EMA."""

    name: ClassVar[str] = "hesso"
    state_key: ClassVar[str] = "ema"
    weights: SaliencyWeights = field(default_factory=SaliencyWeights)
    ema_beta: float | None = None
    sliced: tuple[str, ...] = ()  # parameters whose update it reads (prunable slices, LoRA factors)
    ema: torch.Tensor | None = None
    score: torch.Tensor | None = None
    _snapshot: dict[str, torch.Tensor] | None = None

    def begin_step(self, params, space, *, accumulate, measure) -> None:
        if measure:
            self._snapshot = {n: params[n].detach().clone() for n in self.sliced}

    def end_step(self, params, space, lora) -> None:
        if self._snapshot is None:
            return
        snapshot, self._snapshot = self._snapshot, None
        # the update reuses the snapshot's memory: no second copy of the prunable weights
        update = {n: snapshot.pop(n).neg_().add_(params[n].detach()) for n in list(snapshot)}
        score = HESSOSaliency(self.weights)(space, Evidence(params, update=update, lora=lora))
        del update
        if self.ema_beta is not None:
            self.ema = score if self.ema is None else self.ema_beta * self.ema + (1 - self.ema_beta) * score
        self.score = score

    def rank(self, space, alive):
        return self.ema if self.ema_beta is not None else self.score

    def state(self):
        return None if self.ema is None else self.ema.clone()

    def load(self, value):
        self.ema = None if value is None else value.clone()


@dataclass
class ActivationWeighted(TrainingCriterion):
    """Wanda-sp on the training passes: per group, ``sum_j ||X_j||_2 * sum_i |W_ij|`` over its input columns
    of the consuming linear (``o_proj``, ``down_proj``), with ``X_j`` summed over every training token from
    the first step until the last period starts and ``W`` the weights at ranking time; relative within
    each kind. The same quantity as the one-shot ``wanda_sp``, on the training data instead of
    calibration batches. Data-parallel ranks sum their activations before ranking."""

    name: ClassVar[str] = "wanda_sp"
    state_key: ClassVar[str] = "activations"
    norms: InputNorms | None = None
    _model: nn.Module | None = None

    def attach(self, model, space) -> None:
        consumers = linear_consumers(model, space)
        if not consumers:
            raise ConfigError("the wanda_sp criterion found no linear layer that consumes the prunable groups "
                              "(quantized QFA layers and MoE experts are not watched); use pruning_criterion fisher")
        if any(is_sharded(m.weight) for m in consumers.values()):
            raise ConfigError("the wanda_sp criterion reads whole weight columns; FSDP-sharded weights are not "
                              "supported (use pruning_criterion fisher)")
        self._model = model
        self.norms = InputNorms(consumers, training_only=True).attach()

    def begin_step(self, params, space, *, accumulate, measure) -> None:
        if not accumulate and self.norms is not None and self.norms.attached:
            self.norms.detach()  # no ranking is left to make: stop watching

    def rank(self, space, alive):
        if self.norms is None or self._model is None:
            raise RuntimeError("the wanda_sp criterion was not attached to a model")
        device = next(self._model.parameters()).device  # NCCL cannot reduce a CPU tensor
        flat = all_reduce_sum(self.norms.flat(), device)
        if not bool((flat > 0).any()):
            raise RuntimeError("the wanda_sp criterion saw no training pass (a forward pass with gradients on) "
                               "before its first ranking")
        sums = self.norms.unflatten(flat)
        score = activation_scores(self._model, space, self.norms.consumers, sums)
        return per_kind_relative(space, score, alive)

    def state(self):
        return None if self.norms is None or not self.norms.sums else self.norms.flat()

    def load(self, value):
        if self.norms is not None:
            self.norms.load_flat(value)


REGISTRY: dict[str, type[TrainingCriterion]] = {c.name: c for c in (UpdateSaliency, AccumulatedTaylor,
                                                                     AccumulatedFisher, ActivationWeighted)}
TRAINING_CRITERIA: tuple[str, ...] = tuple(REGISTRY)


def make_criterion(config: HESSOConfig, *, sliced: tuple[str, ...] = ()) -> TrainingCriterion:
    """The strategy ``config.criterion`` names (``sliced``: the parameters HESSO's saliency reads updates of)."""
    cls = REGISTRY[config.criterion]
    if cls is UpdateSaliency:
        return UpdateSaliency(weights=config.weights, ema_beta=config.saliency_ema, sliced=sliced)
    return cls()
