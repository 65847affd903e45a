"""The table the main job prints at the end."""

from __future__ import annotations

from typing import Any

from hf_oto.job.log import log


def print_summary(s: dict[str, Any]) -> None:
    rows = [
        ("parameters before", f"{s['params_before']:,}"),
        ("parameters after (export)", f"{s['params_after']:,} ({100 * s['params_after'] / s['params_before']:.1f}%)"),
        ("prunable parameters removed", f"{100 * s['prunable_removed']:.1f}%"),
        ("eval perplexity, initial model", f"{s['ppl_initial']:.2f}"),
        ("eval perplexity, trained + pruned", f"{s['ppl_trained_pruned']:.2f}"),
        ("eval perplexity, export reloaded without hf_oto", f"{s['ppl_export_reloaded']:.2f}"),
        ("eval next-token accuracy, trained + pruned", f"{100 * s['token_accuracy']:.1f}%"),
        ("training tokens", f"{s['train_tokens']:,}"),
    ]
    rows += [(f"kept {kind}", f"{k} / {t}") for kind, (k, t) in sorted(s["kept"].items())]
    rows += [(f"lm-eval {task} {metric}", f"{value:.4f}")
             for task, metrics in (s.get("lm_eval") or {}).items() for metric, value in metrics.items()]
    rows.append(("pruned model", s["output"]))
    print_table(rows)


def print_table(rows: list[tuple[str, str]]) -> None:
    """Name/value rows between two rules, names padded to one width."""
    width = max(len(r[0]) for r in rows)
    rule = "=" * (width + 40)
    log().info("\n".join(["", rule, *(f"{name:<{width}}  {value}" for name, value in rows), rule]))
