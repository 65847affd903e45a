"""The per-layer picture of what a pruned model kept (a PNG next to the model card)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from hf_oto.manifest import Manifest

LABELS = {"attention_head": "attention heads", "kv_group": "kv groups", "query_head": "query heads per kv group",
          "ffn_channel": "FFN channels", "expert_channel": "expert channels", "layer": "whole layer",
          "attention_block": "attention block", "mlp_block": "MLP block"}


def kept_by_layer(manifest: Manifest) -> dict[str, dict[int, tuple[int, int]]]:
    """kind -> layer -> (kept, total), summed over the modules of that layer."""
    out: dict[str, dict[int, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for s in manifest.sets:
        cell = out[s.kind][s.layer]
        cell[0] += len(s.kept)
        cell[1] += s.groups
    return {k: {layer: (v[0], v[1]) for layer, v in sorted(d.items())} for k, d in out.items()}


def plot_kept(manifest: Manifest, path: str | Path) -> Path:
    """Grouped bars: the fraction of each kind of structure kept in every layer."""
    from matplotlib.figure import Figure  # not pyplot: the user's backend and open figures are left alone

    data = kept_by_layer(manifest)
    kinds = [k for k in LABELS if k in data]
    layers = sorted({layer for d in data.values() for layer in d})
    width = 0.8 / max(len(kinds), 1)
    fig = Figure(figsize=(max(6.0, 0.35 * len(layers) * max(len(kinds), 1)), 3.6))
    ax = fig.subplots()
    for i, kind in enumerate(kinds):
        xs = [layer + (i - (len(kinds) - 1) / 2) * width for layer in layers]
        ys = [data[kind][layer][0] / data[kind][layer][1] if layer in data[kind] else 0.0 for layer in layers]
        ax.bar(xs, ys, width=width, label=LABELS[kind])
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction kept")
    ax.set_ylim(0, 1.3)  # room above the bars for the legend
    ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.set_xticks(layers)
    ax.legend(fontsize=8, ncols=min(len(kinds), 3), loc="upper center", frameon=False)
    ax.set_title(f"{manifest.model_type}: {manifest.params_after:,} of {manifest.params_before:,} "
                 "parameters kept", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path
