"""HESSOConfig: every HESSO setting in one frozen, validated object (recorded with ``asdict``).

Its defaults are the defaults: :class:`~hf_oto.trainer.HFOTOTrainingArguments` takes its pruning
fields' defaults from here, and "auto" is decided by one rule, :meth:`HESSOConfig.resolve`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from hf_oto.errors import ConfigError
from hf_oto.groups.space import Layout, PruningSpace
from hf_oto.io import JSONObject
from hf_oto.optim.budget import SELECTIONS, BudgetRules, resolve_target
from hf_oto.optim.cric import CRICConfig
from hf_oto.optim.criteria import TRAINING_CRITERIA
from hf_oto.optim.pricing import PRICINGS
from hf_oto.optim.saliency import SaliencyWeights


@dataclass(frozen=True)
class HESSOConfig:
    """What HESSO removes, when, and how it ranks groups.

    ``target_sparsity`` is the fraction of prunable parameters to remove (or give ``target_params``).
    ``layout="uniform"`` keeps equal counts in every layer, so the export is the stock architecture
    config; ``"per_layer_ffn"`` keeps attention uniform and lets FFN widths differ per layer (exported
    as DeciLM for Llama models, which vLLM and llama.cpp load); ``"global"`` allocates freely (per-layer
    sizes of everything, exported with remote code). After
    ``start_pruning_step`` warm-up steps, ``pruning_steps`` are split into ``pruning_periods``; each
    period marks its share of the budget redundant and shrinks it linearly to exactly zero. Kept FFN
    widths stay multiples of ``ffn_multiple`` and at least ``min_keep`` groups stay in every set.
    ``saliency_ema`` (None: one batch) smooths the criteria, measured every ``ema_interval`` steps.
    The target is met within ``tolerance`` (a fraction of it) where the group sizes allow.
    ``selection`` ranks removals by mean saliency (``"saliency"``) or by saliency per parameter
    freed (``"per_param"``, the knapsack's greedy rule). ``criterion`` is HESSO's weighted saliency
    (``"hesso"``, measured on one step's update at each period start) or ``"taylor"``: the
    first-order Taylor importance ``sum |w * g|`` accumulated over every training step since the
    previous period start (the warm-up for the first), relative within each kind of group; or
    ``"fisher"``: the sum of ``(w . g)^2`` per group over every training step from the first (not
    reset at period starts), the empirical Fisher estimate of the loss increase when the group is
    removed, which is comparable across kinds, so it pairs with ``selection="per_param"`` (a
    knapsack over loss increase per parameter freed); or ``"wanda_sp"``: the activation-weighted
    magnitude of each group's input columns in the linear that consumes it (Wanda-sp), with the input
    activations summed over the training passes until the last period starts and the weights as they are
    at each period start, relative within each kind. ``pricing="measured"`` rescales each kind's
    scores at every period start to the loss increase measured when that kind alone pays a share of
    the remaining budget (:mod:`hf_oto.optim.pricing`; HESSO then needs a ``probe``), so heads and FFN
    channels trade at measured rates; ``"saliency"`` takes the criterion's units as they are.
    ``"auto"`` (the default of all three) is decided by :meth:`resolve` when HESSO is built.
    """

    target_sparsity: float | None = 0.5
    target_params: int | None = None
    layout: Layout = "uniform"
    start_pruning_step: int = 0
    pruning_steps: int = 100
    pruning_periods: int = 5
    ffn_multiple: int = 8
    min_keep: int = 1
    weights: SaliencyWeights = field(default_factory=SaliencyWeights)
    saliency_ema: float | None = None
    ema_interval: int = 10
    tolerance: float = 0.01
    selection: str = "auto"
    criterion: str = "auto"
    pricing: str = "auto"

    def __post_init__(self) -> None:
        for name, allowed in (("pricing", PRICINGS), ("criterion", TRAINING_CRITERIA),
                              ("selection", SELECTIONS)):
            if getattr(self, name) not in ("auto", *allowed):
                raise ConfigError(f"{name} must be one of {('auto', *allowed)}, got {getattr(self, name)!r}")
        if self.criterion not in ("hesso", "auto") and self.saliency_ema is not None:
            raise ConfigError(f"saliency_ema smooths the 'hesso' criterion; {self.criterion!r} already sums its "
                              "evidence over each period (leave saliency_ema unset, or use criterion 'hesso')")
        if self.target_params is None and (self.target_sparsity is None or not 0.0 < self.target_sparsity < 1.0):
            raise ConfigError(f"target_sparsity must be in (0, 1), got {self.target_sparsity}")
        if self.target_params is not None and self.target_params <= 0:
            raise ConfigError(f"target_params must be positive, got {self.target_params}")
        if self.pruning_periods < 1:
            raise ConfigError(f"pruning_periods must be at least 1, got {self.pruning_periods}")
        if self.pruning_steps < self.pruning_periods:
            raise ConfigError(f"pruning_steps ({self.pruning_steps}) must be at least pruning_periods "
                              f"({self.pruning_periods}): each period needs a step")
        if self.start_pruning_step < 0:
            raise ConfigError(f"start_pruning_step must be >= 0, got {self.start_pruning_step}")
        if self.saliency_ema is not None and not 0.0 <= self.saliency_ema < 1.0:
            raise ConfigError(f"saliency_ema must be in [0, 1), got {self.saliency_ema}")
        if self.ema_interval < 1:
            raise ConfigError(f"ema_interval must be >= 1, got {self.ema_interval}")
        BudgetRules(layout=self.layout, ffn_multiple=self.ffn_multiple, min_keep=self.min_keep,
                    tolerance=self.tolerance)  # validates them

    @property
    def resolved(self) -> bool:
        """Whether no setting is left at "auto"."""
        return "auto" not in (self.criterion, self.selection, self.pricing)

    def resolve(self, *, lora: bool = False, cric: bool = False, probe: bool = False,
                activations: bool = True, any_layout: bool = False) -> HESSOConfig:
        """This config with "auto" decided, for a model that trains LoRA adapters (``lora``), with or
        without CRIC, with or without a loss probe for measured pricing (``probe``), and whether its
        linears' activations can rank groups (``activations``: not for elastic sizes, whose masked
        passes would count, nor QFA, whose layers are quantized):

        - criterion: ``"wanda_sp"`` (activation-weighted magnitude on the training passes; on SmolLM2
          at 30% 3.7% lower in-domain perplexity than ``"fisher"``, level on the toy references);
          ``"fisher"`` (the loss increase of a removal, on one scale for every kind and layer) without
          ``activations`` and outside the uniform layout: per-layer widths compare groups across layers,
          where activation magnitudes do not compare (on SmolLM2 ``wanda_sp`` cut layer 1 to 64 FFN
          channels); ``any_layout`` lifts that (checkpoints trained before the rule); ``"hesso"``
          under LoRA (frozen base weights have no gradient) or with ``saliency_ema`` (which smooths
          that saliency); ``"taylor"`` with CRIC (which does not
          combine with the knapsack Fisher pairs with);
        - selection: ``"per_param"`` with fisher and without CRIC, ``"saliency"`` otherwise;
        - pricing: ``"measured"`` when there is a probe (HFOTOTrainer always has one), else ``"saliency"``.
        """
        criterion = self.criterion
        if criterion == "auto":
            criterion = ("hesso" if lora or self.saliency_ema is not None else "taylor" if cric
                         else "wanda_sp" if activations and (any_layout or self.layout == "uniform") else "fisher")
        selection = self.selection
        if selection == "auto":
            selection = "per_param" if criterion == "fisher" and not cric else "saliency"
        pricing = self.pricing if self.pricing != "auto" else "measured" if probe else "saliency"
        return replace(self, criterion=criterion, selection=selection, pricing=pricing)

    def validate(self, space: PruningSpace, *, total_steps: int | None = None,
                 cric: CRICConfig | None = None) -> int:
        """The pruned-parameter target for ``space``, after checking that it can be reached and that the
        schedule (warm-up, CRIC's cycles, pruning) fits in ``total_steps`` when that is given (a config
        with "auto" left is checked as :meth:`resolve` decides it without LoRA)."""
        if not self.resolved:
            return self.resolve(cric=cric is not None).validate(space, total_steps=total_steps, cric=cric)
        if cric is not None:
            cric.validate()
            if self.selection == "per_param":
                # CRIC raises only the groups it trialled (the cheapest under the criterion, mostly FFN
                # channels), so the knapsack then takes the untrialled heads instead: measured on the
                # benchmark's GQA reference at 50%, perplexity 100-149 against 30 without CRIC
                raise ConfigError("CRIC does not combine with selection 'per_param' (it protects only the groups "
                                  "it trialled, so the knapsack removes the others, heads first); use selection "
                                  "'saliency' with CRIC")
        if total_steps is not None:
            cric_steps = cric.sampling_steps * cric.max_cycles if cric is not None else 0
            need = self.start_pruning_step + cric_steps + self.pruning_steps
            if need > total_steps:
                raise ConfigError(
                    f"the pruning schedule needs {need} optimizer steps (warm-up {self.start_pruning_step}"
                    + (f" + CRIC up to {cric_steps}" if cric_steps else "") + f" + pruning {self.pruning_steps}) "
                    f"but training has {total_steps}; shorten start_pruning_step/pruning_steps"
                    + ("/cric_max_cycles" if cric_steps else "") + " or train longer, so the target is reached"
                )
        return resolve_target(space, self.target_sparsity, self.target_params, self.rules)

    @property
    def rules(self) -> BudgetRules:
        """The plan's rules (layout, FFN multiple, min_keep, selection, tolerance) as one object."""
        if self.selection == "auto":
            raise ConfigError("selection 'auto' depends on the criterion and CRIC: resolve() the config first")
        return BudgetRules(layout=self.layout, ffn_multiple=self.ffn_multiple, min_keep=self.min_keep,
                           selection=self.selection, tolerance=self.tolerance)

    def to_dict(self) -> JSONObject:
        """``asdict(self)``: what checkpoints, the manifest and the model card record."""
        return asdict(self)
