"""HFOTOTrainingArguments: TrainingArguments plus the pruning settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments


@dataclass
class HFOTOTrainingArguments(TrainingArguments):
    """``TrainingArguments`` with the HESSO/CRIC settings.

    Schedule values below 1 are fractions of the total optimizer steps; values of 1 or more are steps.
    """

    target_sparsity: float = field(default=0.5, metadata={"help": "fraction of prunable parameters to remove"})
    target_params: int | None = field(default=None, metadata={"help": "remove this many parameters instead"})
    pruning_layout: str = field(
        default="uniform",
        metadata={"help": "'uniform' (same counts in every layer: stock config) or 'global' (per-layer sizes)"},
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
    pruned_output_dir: str | None = field(default=None, metadata={"help": "where save_pruned_model writes"})

    def steps(self, value: float, total: int) -> int:
        """A schedule value as optimizer steps (fractions of ``total`` below 1)."""
        return int(round(value * total)) if value < 1 else int(value)
