"""HFOTOTrainingArguments: TrainingArguments plus the pruning settings."""

from __future__ import annotations

import os
from dataclasses import MISSING, astuple, dataclass, field, fields
from typing import Any, ClassVar

from transformers import TrainingArguments

from hf_oto.errors import ConfigError
from hf_oto.export.formats import ExportFormat
from hf_oto.groups.depth import Granularity
from hf_oto.groups.space import Layout
from hf_oto.io import JSONObject
from hf_oto.optim import CRICConfig, HESSOConfig, SaliencyWeights
from hf_oto.optim.budget import SELECTIONS
from hf_oto.optim.criteria import TRAINING_CRITERIA
from hf_oto.optim.elastic import ElasticConfig
from hf_oto.optim.pricing import PRICINGS
from hf_oto.quant.config import QFAConfig
from hf_oto.trainer.distill import DistillConfig

# Settings that are about where the pruned model goes or where the teacher runs, not how pruning
# runs (free to change on resume).
# Which rule decides "pruning_criterion: auto": 1 picked fisher where 2 (since 2026-12-06) picks wanda_sp;
# 3 (session 16) picks wanda_sp in the uniform layout only (per-layer widths: fisher, as under rule 1).
# Checkpoints record it; one saved without it was trained under rule 1 and resumes under it.
AUTO_RULE = 3
_OUTPUT_FIELDS = ("pruned_output_dir", "overwrite_pruned_output_dir", "export_format", "distill_teacher_device",
                  "qfa_run_dir", "verify_export")


def _same_as(config_cls: type, name: str, help: str) -> Any:
    """A trainer field whose default is ``config_cls``'s own (declared once, in the config dataclass)."""
    f = next(f for f in fields(config_cls) if f.name == name)
    default = f.default if f.default is not MISSING else f.default_factory()
    if isinstance(default, tuple):  # argparse and YAML give lists
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class HFOTOTrainingArguments(TrainingArguments):
    """``TrainingArguments`` with the HESSO/CRIC settings.

    Schedule values below 1 are fractions of the total optimizer steps; values of 1 or more are steps.
    """

    target_sparsity: float = _same_as(
        HESSOConfig, "target_sparsity", "fraction of prunable parameters to remove (0 with qfa: quantize only)")
    target_params: int | None = field(default=None, metadata={"help": "remove this many parameters instead"})
    pruning_layout: Layout = _same_as(
        HESSOConfig, "layout",
        "'uniform' (same counts in every layer: stock config, loads everywhere), 'per_layer_ffn' (attention "
        "uniform, FFN widths per layer: DeciLM for Llama) or 'global' (per-layer sizes of everything: remote code)")
    pruning_granularity: Granularity = field(
        default="width",
        metadata={"help": "what may be removed: 'width' (attention heads, kv groups, FFN channels), 'depth' (whole "
                          "decoder layers: the export has fewer layers; with a per-layer pruning_layout also a layer's "
                          "whole attention or MLP block) or 'both' (one budget chooses)"},
    )
    prune_experts: bool = field(
        default=False,
        metadata={"help": "MoE models: whole routed experts may go too (with their router rows; the export has fewer "
                          "experts per layer, the same number in every layer); a removed expert gets no tokens"},
    )
    pruning_exclude: list[str] | None = field(
        default=None,
        metadata={"help": "keep these out of pruning: 'layers:0,-1' (layer indexes, -1 the last; 'layers:2-5' a "
                          "range) or module-name patterns such as '*.self_attn' or 'model.layers.3.mlp'"},
    )
    export_format: ExportFormat = field(
        default="auto",
        metadata={"help": "how a per-layer export is written: 'auto' (DeciLM where expressible, else "
                          "remote code), 'decilm' or 'remote_code'"},
    )
    pruning_selection: str = _same_as(
        HESSOConfig, "selection",
        "rank removals by mean saliency ('saliency') or saliency per parameter freed ('per_param'); 'auto': per_param "
        "with the fisher criterion (a loss increase on one scale for every kind) unless use_cric, saliency otherwise")
    pruning_criterion: str = _same_as(
        HESSOConfig, "criterion",
        "how groups are ranked: 'fisher' (sum over every step up to each period start of (w.g)^2 per group: the "
        "loss increase its removal costs, on one scale for heads and channels), 'taylor' (sum of |w*g|, relative "
        "within each kind), 'hesso' (HESSO's weighted one-step saliency), 'wanda_sp' (activation-weighted "
        "magnitude of the consuming layer's input columns, activations from the training passes), or 'auto': "
        "wanda_sp; fisher with elastic_sizes, qfa or prune_experts; hesso with LoRA (frozen base weights have no "
        "gradient) or with saliency_ema; taylor with use_cric")
    pruning_pricing: str = _same_as(
        HESSOConfig, "pricing",
        "'measured' (at each period start, each kind of group pays a share of the budget alone on the step's batch "
        "and its scores are scaled to the measured loss increase, so heads and FFN channels trade at measured "
        "rates), 'saliency' (the criterion's units as they are), or 'auto': measured")
    start_pruning_step: float = field(default=0.05, metadata={"help": "warm-up before pruning (fraction or steps)"})
    pruning_steps: float = field(default=0.2, metadata={"help": "length of the pruning phase (fraction or steps)"})
    pruning_periods: int = _same_as(HESSOConfig, "pruning_periods", "number of pruning periods")
    ffn_multiple: int = _same_as(HESSOConfig, "ffn_multiple", "kept FFN widths are multiples of this")
    min_keep: int = _same_as(HESSOConfig, "min_keep", "groups kept at least in every set")
    saliency_weights: str = field(
        default=",".join(str(v) for v in astuple(SaliencyWeights())),
        metadata={"help": "weights of magnitude, avg_magnitude, cosine_similarity, taylor_first_order"},
    )
    saliency_ema: float | None = _same_as(HESSOConfig, "saliency_ema", "EMA factor of saliency (None: one batch)")
    use_cric: bool = field(default=False, metadata={"help": "run CRIC corrective cycles before the periods"})
    cric_sampling_steps: int = _same_as(CRICConfig, "sampling_steps", "steps per CRIC cycle")
    cric_max_cycles: int = _same_as(CRICConfig, "max_cycles", "most CRIC cycles")
    distill: bool = field(
        default=False, metadata={"help": "learn from the dense starting model's logits (KL) while pruning"})
    distill_weight: float = _same_as(
        DistillConfig, "weight", "share of the distillation term: (1-w)*LM loss + w*T^2*KL")
    distill_temperature: float = _same_as(DistillConfig, "temperature", "softmax temperature of the KL term")
    distill_hidden_weight: float = _same_as(
        DistillConfig, "hidden_weight", "weight of a per-layer hidden-state term (relative squared error)")
    distill_teacher_device: str = _same_as(
        DistillConfig, "teacher_device", "'same' (the student's device) or 'cpu' (saves accelerator memory)")
    distill_teacher_dtype: str = _same_as(
        DistillConfig, "teacher_dtype", "the teacher's weights: 'same' as the student's, 'bfloat16' / 'float16' "
                                        "(half the memory, faster where the device has fast half-precision "
                                        "products), or 'auto' (bfloat16 where the device multiplies it fast)")
    elastic_sizes: list[float] | None = field(
        default=None,
        metadata={"help": "elastic (once-for-all) sizes, kept fractions of the prunable parameters (e.g. 0.3 0.5 "
                          "0.7): one run trains these nested sub-networks with the full model, nothing is removed, "
                          "and hf-oto export-size cuts any of them out afterwards (replaces target_sparsity)"})
    elastic_start: float = field(
        default=0.1, metadata={"help": "when sub-networks join (fraction or steps); before it the full model trains "
                                       "alone and the ranking gathers evidence (0.1: measured best, see README)"})
    elastic_freeze: float | None = field(
        default=None, metadata={"help": "after this step the keep-sets stay fixed (fraction or steps; default: "
                                        "elastic_start, one ranking)"})
    elastic_refresh: float = field(
        default=0, metadata={"help": "steps between re-rankings from elastic_start to elastic_freeze (fraction or "
                                     "steps; 0: rank once)"})
    elastic_samples: int = _same_as(ElasticConfig, "samples", "sizes drawn per step besides the smallest")
    elastic_temperature: float = _same_as(ElasticConfig, "temperature", "temperature of the in-place distillation")
    elastic_target: str = _same_as(ElasticConfig, "target", "what sub-networks distil from: full (the full model, in "
                                                            "place) or teacher (the dense teacher; needs distill)")
    elastic_label_weight: float = _same_as(ElasticConfig, "label_weight", "share of each sub-network's loss taken "
                                                                          "by the language-model loss")
    qfa: bool = field(default=False, metadata={"help": "quantization-aware once-for-all training (LLM-QFA)"})
    qfa_bits: list[int] = _same_as(QFAConfig, "bits", "bit-widths to serve")
    qfa_group_size: int = _same_as(QFAConfig, "group_size", "input columns per quantization scale")
    qfa_symmetric: bool = _same_as(QFAConfig, "symmetric", "symmetric quantization (the only form offered)")
    qfa_target_modules: list[str] | None = _same_as(
        QFAConfig, "target_modules", "linears to quantize (default: every linear in the decoder layers)")
    qfa_quantizer: str = _same_as(QFAConfig, "quantizer", "'gptq' (calibrated) or 'rtn' (fast)")
    qfa_calibration_batches: int = _same_as(QFAConfig, "calibration_batches", "training batches GPTQ calibrates on")
    qfa_schedule: str = _same_as(
        QFAConfig, "schedule", "per-layer width sampling: 'uniform' or 'triangular' (balanced)")
    qfa_period: int | None = _same_as(QFAConfig, "period", "triangular wave period in steps (None: the run)")
    qfa_seed: int = _same_as(QFAConfig, "seed", "seed of the width sampling")
    qfa_rank: int = _same_as(QFAConfig, "rank", "rank of each width's adapter")
    qfa_alpha: float = _same_as(QFAConfig, "alpha", "adapter scaling numerator (alpha / rank)")
    qfa_shared_rank: int | None = _same_as(
        QFAConfig, "shared_rank", "rank of the adapter every width adds (None: qfa_rank; 0: none)")
    qfa_run_dir: str | None = field(
        default=None, metadata={"help": "where the QFA run is saved for qfa-search (default: <output_dir>/qfa_run)"})
    pruned_output_dir: str | None = field(
        default=None, metadata={"help": "where save_pruned_model writes (default: <output_dir>/pruned)"}
    )
    overwrite_pruned_output_dir: bool = field(
        default=False, metadata={"help": "replace an earlier hf-oto export in pruned_output_dir"}
    )
    verify_export: bool = field(
        default=True, metadata={"help": "hf-oto prune and oneshot: reload the export in a fresh Python process that "
                                        "cannot import hf_oto and score it on the eval blocks; false skips that "
                                        "second load of the model (its weight files are still checked whole)"}
    )

    # the rule "pruning_criterion: auto" follows (see AUTO_RULE); a resumed older checkpoint sets its own
    auto_rule: ClassVar[int] = AUTO_RULE

    def steps(self, value: float, total: int) -> int:
        """A schedule value as optimizer steps (fractions of ``total`` below 1)."""
        return int(round(value * total)) if value < 1 else int(value)

    def hesso_config(self, total_steps: int, *, lora: bool = False) -> HESSOConfig:
        """The :class:`HESSOConfig` these arguments describe, for ``total_steps`` optimizer steps, with "auto"
        decided (``lora``: the model trains LoRA adapters, which decides ``pruning_criterion="auto"``)."""
        self._check_choices()
        try:
            weights = SaliencyWeights(*(float(x) for x in self.saliency_weights.split(",")))
        except (TypeError, ValueError):
            raise ConfigError(f"saliency_weights needs 4 comma-separated numbers, got {self.saliency_weights!r}") \
                from None
        target = self.target_sparsity
        start, steps, periods = (self.steps(self.start_pruning_step, total_steps),
                                 self.steps(self.pruning_steps, total_steps), self.pruning_periods)
        if self.elastic:  # each size is its own target, on the elastic schedule: HESSO's target and schedule
            kept = [float(s) for s in self.elastic_sizes if 0 < float(s) < 1]  # are not used (0 in a QFA config)
            target, start, steps, periods = (1.0 - min(kept) if kept else 0.5), 0, 1, 1
        config = HESSOConfig(
            target_sparsity=target, target_params=self.target_params, layout=self.pruning_layout,
            start_pruning_step=start, pruning_steps=steps, pruning_periods=periods,
            ffn_multiple=self.ffn_multiple, min_keep=self.min_keep, weights=weights, saliency_ema=self.saliency_ema,
            selection=self.pruning_selection, criterion=self.pruning_criterion, pricing=self.pruning_pricing,
        )
        return self._resolve(config, lora)

    @property
    def ranks_by_activations(self) -> bool:
        """Whether "auto" may pick the ``wanda_sp`` criterion (in the uniform layout, which
        :meth:`HESSOConfig.resolve` decides; under rule 2 in any layout): not for elastic sizes (their masked
        passes would count), QFA (its layers are quantized) or whole experts (no linear consumes them), nor
        when resuming a checkpoint trained under rule 1 (:data:`AUTO_RULE`)."""
        return not (self.auto_rule < 2 or self.elastic or self.qfa or self.prune_experts)

    def _check_choices(self) -> None:
        """Bad criterion/selection/pricing values, named as the user typed them."""
        for name, allowed in (("pruning_criterion", TRAINING_CRITERIA), ("pruning_selection", SELECTIONS),
                              ("pruning_pricing", PRICINGS)):
            if getattr(self, name) not in ("auto", *allowed):
                raise ConfigError(f"{name} must be one of {('auto', *allowed)}, got {getattr(self, name)!r}")

    def _resolve(self, config: HESSOConfig, lora: bool) -> HESSOConfig:
        """``config`` with "auto" decided for this run (the trainer always has a loss probe)."""
        return config.resolve(lora=lora, cric=self.use_cric, probe=True, activations=self.ranks_by_activations,
                              any_layout=self.auto_rule == 2)

    def _decided(self, lora: bool) -> HESSOConfig:
        """The criterion, selection and pricing as :meth:`HESSOConfig.resolve` decides "auto" for this run."""
        self._check_choices()
        return self._resolve(HESSOConfig(criterion=self.pruning_criterion, selection=self.pruning_selection,
                                         pricing=self.pruning_pricing, saliency_ema=self.saliency_ema,
                                         layout=self.pruning_layout), lora)

    def resolved_pricing(self) -> str:
        """``pruning_pricing`` with "auto" decided (:meth:`HESSOConfig.resolve`): measured."""
        return self._decided(lora=False).pricing

    def resolved_selection(self, lora: bool) -> str:
        """``pruning_selection`` with "auto" decided (:meth:`HESSOConfig.resolve`)."""
        return self._decided(lora).selection

    def resolved_criterion(self, lora: bool) -> str:
        """``pruning_criterion`` with "auto" decided (:meth:`HESSOConfig.resolve`)."""
        return self._decided(lora).criterion

    def cric_config(self) -> CRICConfig | None:
        """The :class:`CRICConfig` these arguments describe (None without ``use_cric``)."""
        if not self.use_cric:
            return None
        return CRICConfig(sampling_steps=self.cric_sampling_steps, max_cycles=self.cric_max_cycles,
                          min_cycles=min(3, self.cric_max_cycles))

    def distill_config(self) -> DistillConfig | None:
        """The :class:`DistillConfig` these arguments describe (None without ``distill``)."""
        if not self.distill:
            return None
        return DistillConfig(weight=self.distill_weight, temperature=self.distill_temperature,
                             hidden_weight=self.distill_hidden_weight, teacher_device=self.distill_teacher_device,
                             teacher_dtype=self.distill_teacher_dtype)

    @property
    def elastic(self) -> bool:
        """Whether this is an elastic (once-for-all sizes) run."""
        return self.elastic_sizes is not None

    def elastic_config(self, total_steps: int) -> ElasticConfig | None:
        """The :class:`ElasticConfig` these arguments describe for ``total_steps`` (None without elastic_sizes)."""
        if self.elastic_sizes is None:
            return None
        start = max(self.steps(self.elastic_start, total_steps), 1)
        freeze = None if self.elastic_freeze is None else self.steps(self.elastic_freeze, total_steps)
        return ElasticConfig(sizes=tuple(self.elastic_sizes), start=start, freeze=freeze,
                             refresh_every=self.steps(self.elastic_refresh, total_steps) if self.elastic_refresh else 0,
                             samples=self.elastic_samples, temperature=self.elastic_temperature, seed=self.seed,
                             target=self.elastic_target, label_weight=self.elastic_label_weight)

    def qfa_config(self) -> QFAConfig | None:
        """The :class:`QFAConfig` these arguments describe (None without ``qfa``)."""
        if not self.qfa:
            return None
        return QFAConfig(bits=tuple(self.qfa_bits), group_size=self.qfa_group_size, symmetric=self.qfa_symmetric,
                         target_modules=None if self.qfa_target_modules is None else tuple(self.qfa_target_modules),
                         quantizer=self.qfa_quantizer, calibration_batches=self.qfa_calibration_batches,
                         schedule=self.qfa_schedule, period=self.qfa_period, seed=self.qfa_seed,
                         rank=self.qfa_rank, alpha=self.qfa_alpha, shared_rank=self.qfa_shared_rank)

    @property
    def prunes(self) -> bool:
        """False only for a quantize-only QFA run (``qfa`` with ``target_sparsity: 0`` and no ``elastic_sizes``)."""
        return not (self.qfa and not self.elastic and self.target_params is None and not self.target_sparsity)

    def qfa_dir(self) -> str:
        """Where the QFA run is saved: ``qfa_run_dir``, else ``<output_dir>/qfa_run``."""
        return self.qfa_run_dir or os.path.join(self.output_dir, "qfa_run")

    def pruned_dir(self) -> str:
        """Where the pruned model is written: ``pruned_output_dir``, else ``<output_dir>/pruned``."""
        return self.pruned_output_dir or os.path.join(self.output_dir, "pruned")

    def pruning_settings(self) -> JSONObject:
        """The pruning fields (those added to TrainingArguments), and the rule "auto" follows, as recorded in
        checkpoints."""
        base = {f.name for f in fields(TrainingArguments)}
        out = {f.name: getattr(self, f.name) for f in fields(self)
               if f.name not in base and f.name not in _OUTPUT_FIELDS}
        return dict(out, auto_rule=self.auto_rule)
