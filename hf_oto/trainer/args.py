"""HFOTOTrainingArguments: TrainingArguments plus the pruning settings."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

from transformers import TrainingArguments

from hf_oto.errors import ConfigError
from hf_oto.export.formats import ExportFormat
from hf_oto.groups.space import Layout
from hf_oto.optim import CRICConfig, HESSOConfig, SaliencyWeights
from hf_oto.trainer.distill import DistillConfig

# Settings that are about where the pruned model goes or where the teacher runs, not how pruning
# runs (free to change on resume).
_OUTPUT_FIELDS = ("pruned_output_dir", "overwrite_pruned_output_dir", "export_format", "distill_teacher_device")


@dataclass
class HFOTOTrainingArguments(TrainingArguments):
    """``TrainingArguments`` with the HESSO/CRIC settings.

    Schedule values below 1 are fractions of the total optimizer steps; values of 1 or more are steps.
    """

    target_sparsity: float = field(default=0.5, metadata={"help": "fraction of prunable parameters to remove"})
    target_params: int | None = field(default=None, metadata={"help": "remove this many parameters instead"})
    pruning_layout: Layout = field(
        default="uniform",
        metadata={"help": "'uniform' (same counts in every layer: stock config, loads everywhere), "
                          "'per_layer_ffn' (attention uniform, FFN widths per layer: DeciLM for Llama) or "
                          "'global' (per-layer sizes of everything: remote code)"},
    )
    export_format: ExportFormat = field(
        default="auto",
        metadata={"help": "how a per-layer export is written: 'auto' (DeciLM where expressible, else "
                          "remote code), 'decilm' or 'remote_code'"},
    )
    pruning_selection: str = field(
        default="saliency",
        metadata={"help": "rank removals by mean saliency ('saliency') or saliency per parameter freed ('per_param')"},
    )
    start_pruning_step: float = field(default=0.1, metadata={"help": "warm-up before pruning (fraction or steps)"})
    pruning_steps: float = field(default=0.5, metadata={"help": "length of the pruning phase (fraction or steps)"})
    pruning_periods: int = field(default=5, metadata={"help": "number of pruning periods"})
    ffn_multiple: int = field(default=8, metadata={"help": "kept FFN widths are multiples of this"})
    min_keep: int = field(default=1, metadata={"help": "groups kept at least in every set"})
    saliency_weights: str = field(
        default="0.25,0.25,0.25,0.25",
        metadata={"help": "weights of magnitude, avg_magnitude, cosine_similarity, taylor_first_order"},
    )
    saliency_ema: float | None = field(default=None, metadata={"help": "EMA factor of saliency (None: one batch)"})
    use_cric: bool = field(default=False, metadata={"help": "run CRIC corrective cycles before the periods"})
    cric_sampling_steps: int = field(default=20, metadata={"help": "steps per CRIC cycle"})
    cric_max_cycles: int = field(default=6, metadata={"help": "most CRIC cycles"})
    distill: bool = field(
        default=False, metadata={"help": "learn from the dense starting model's logits (KL) while pruning"})
    distill_weight: float = field(
        default=0.5, metadata={"help": "share of the distillation term: (1-w)*LM loss + w*T^2*KL"})
    distill_temperature: float = field(default=1.0, metadata={"help": "softmax temperature of the KL term"})
    distill_hidden_weight: float = field(
        default=0.0, metadata={"help": "weight of a per-layer hidden-state term (relative squared error)"})
    distill_teacher_device: str = field(
        default="same", metadata={"help": "'same' (the student's device) or 'cpu' (saves accelerator memory)"})
    pruned_output_dir: str | None = field(
        default=None, metadata={"help": "where save_pruned_model writes (default: <output_dir>/pruned)"}
    )
    overwrite_pruned_output_dir: bool = field(
        default=False, metadata={"help": "replace an earlier hf-oto export in pruned_output_dir"}
    )

    def steps(self, value: float, total: int) -> int:
        """A schedule value as optimizer steps (fractions of ``total`` below 1)."""
        return int(round(value * total)) if value < 1 else int(value)

    def hesso_config(self, total_steps: int) -> HESSOConfig:
        """The :class:`HESSOConfig` these arguments describe, for ``total_steps`` optimizer steps."""
        try:
            weights = SaliencyWeights(*(float(x) for x in self.saliency_weights.split(",")))
        except (TypeError, ValueError):
            raise ConfigError(f"saliency_weights needs 4 comma-separated numbers, got {self.saliency_weights!r}") \
                from None
        return HESSOConfig(
            target_sparsity=self.target_sparsity, target_params=self.target_params, layout=self.pruning_layout,
            start_pruning_step=self.steps(self.start_pruning_step, total_steps),
            pruning_steps=self.steps(self.pruning_steps, total_steps), pruning_periods=self.pruning_periods,
            ffn_multiple=self.ffn_multiple, min_keep=self.min_keep, weights=weights, saliency_ema=self.saliency_ema,
            selection=self.pruning_selection,
        )

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
                             hidden_weight=self.distill_hidden_weight, teacher_device=self.distill_teacher_device)

    def pruned_dir(self) -> str:
        """Where the pruned model is written: ``pruned_output_dir``, else ``<output_dir>/pruned``."""
        return self.pruned_output_dir or os.path.join(self.output_dir, "pruned")

    def pruning_settings(self) -> dict[str, Any]:
        """The pruning fields (those added to TrainingArguments), as recorded in checkpoints."""
        base = {f.name for f in fields(TrainingArguments)}
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in base and f.name not in _OUTPUT_FIELDS}
