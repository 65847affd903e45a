"""What the jobs return and the tables they print at the end."""

from __future__ import annotations

from dataclasses import dataclass, field

from hf_oto.job.log import log

NAN = float("nan")


@dataclass(frozen=True)
class PruneSummary:
    """What ``hf-oto prune`` reports. Processes other than the main one write nothing to report: they get
    ``output`` only. ``kept`` maps each kind of group to (kept, total); ``lm_eval`` task -> metric -> value;
    ``ppl_export_reloaded`` is NaN where the reload did not run, and ``reload_note`` says why."""

    output: str
    params_before: int = 0
    params_after: int = 0
    prunable_removed: float = NAN
    ppl_initial: float = NAN
    ppl_trained_pruned: float = NAN
    ppl_export_reloaded: float = NAN
    reload_note: str | None = None
    token_accuracy: float = NAN
    kept: dict[str, tuple[int, int]] = field(default_factory=dict)
    train_tokens: int = 0
    lm_eval: dict[str, dict[str, float]] | None = None

    def rows(self) -> list[tuple[str, str]]:
        rows = [
            ("parameters before", f"{self.params_before:,}"),
            ("parameters after (export)",
             f"{self.params_after:,} ({100 * self.params_after / self.params_before:.1f}%)"),
            ("prunable parameters removed", f"{100 * self.prunable_removed:.1f}%"),
            ("eval perplexity, initial model", f"{self.ppl_initial:.2f}"),
            ("eval perplexity, trained + pruned", f"{self.ppl_trained_pruned:.2f}"),
            ("eval perplexity, export reloaded without hf_oto", self.reload_note or f"{self.ppl_export_reloaded:.2f}"),
            ("eval next-token accuracy, trained + pruned", f"{100 * self.token_accuracy:.1f}%"),
            ("training tokens", f"{self.train_tokens:,}"),
        ]
        rows += [(f"kept {kind}", f"{k} / {t}") for kind, (k, t) in sorted(self.kept.items())]
        rows += [(f"lm-eval {task} {metric}", f"{value:.4f}")
                 for task, metrics in (self.lm_eval or {}).items() for metric, value in metrics.items()]
        rows.append(("pruned model", self.output))
        return rows


@dataclass(frozen=True)
class QFASummary:
    """What a QFA run of ``hf-oto prune`` reports: where the run was saved (for ``qfa-search``), the
    held-out perplexity at the start (widest width) and after training at every uniform width (with
    ``elastic_sizes``, of every size's masked view too)."""

    output: str
    ppl_initial: float = NAN
    ppl_uniform: dict[int, float] = field(default_factory=dict)
    ppl_sizes: dict[float, dict[int, float]] = field(default_factory=dict)  # elastic QFA: size -> width -> perplexity


@dataclass(frozen=True)
class ElasticSummary:
    """What an elastic run of ``hf-oto prune`` reports: where the run was saved (for ``export-size``), and per
    size (1.0: the full model) the share of prunable parameters its keep-set removes and its held-out
    perplexity, measured on the masked view (what ``export-size`` writes)."""

    output: str
    ppl_initial: float = NAN
    ppl: dict[float, float] = field(default_factory=dict)
    removed: dict[float, float] = field(default_factory=dict)

    def rows(self) -> list[tuple[str, str]]:
        rows = [("eval perplexity, initial model", f"{self.ppl_initial:.2f}")]
        rows += [(f"size {s:g}: prunable removed {100 * self.removed[s]:.1f}%, eval perplexity", f"{p:.2f}")
                 for s, p in sorted(self.ppl.items(), reverse=True)]
        rows.append(("elastic run (for export-size)", self.output))
        return rows


@dataclass(frozen=True)
class OneShotSummary:
    """What ``hf-oto oneshot`` reports: parameters, the share of prunable ones removed, and held-out
    perplexity before, after, and of the export reloaded without hf_oto (NaN where ``verify_export`` was off)."""

    output: str
    params_before: int
    params_after: int
    prunable_removed: float
    ppl_before: float
    ppl_after: float
    ppl_export_reloaded: float


def print_summary(s: PruneSummary) -> None:
    print_table(s.rows())


def print_table(rows: list[tuple[str, str]]) -> None:
    """Name/value rows between two rules, names padded to one width."""
    width = max(len(r[0]) for r in rows)
    rule = "=" * (width + 40)
    log().info("\n".join(["", rule, *(f"{name:<{width}}  {value}" for name, value in rows), rule]))
