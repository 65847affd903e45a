"""One table of the depth benchmark: width, depth and both, in the uniform and per-layer layouts.

    python scripts/summarize_depth.py [scripts/benchmark_results/depth_toy]

reads the ``results.json`` of each folder below (written by ``scripts/benchmark.py``, commands in each
folder's ``results.md``) and writes ``summary.md`` beside them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# folder -> (granularity, layout)
FOLDERS = {"width": ("width", "uniform"), "depth": ("depth", "uniform"), "both": ("both", "uniform"),
           "width_per_layer": ("width", "per_layer_ffn"), "depth_blocks": ("depth", "per_layer_ffn"),
           "both_blocks": ("both", "per_layer_ffn")}
NAMES = {"hesso_kd": "HESSO + distillation",
         "block_influence_kd": "ShortGPT-style block influence, one-shot + the same training"}


def shape(kept: dict) -> str:
    ffn = kept.get("ffn")
    ffn = ffn if isinstance(ffn, int) else f"{min(ffn)}-{max(ffn)}"
    out = f"{kept.get('heads')} / {kept.get('kv_heads')} / {ffn}; {kept.get('layers', 'all')} layers"
    for key, name in (("no_attention", "without attention"), ("no_mlp", "without MLP")):
        if key in kept:
            out += f", {kept[key]} {name}"
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", nargs="?", default=str(ROOT / "scripts" / "benchmark_results" / "depth_toy"))
    root = Path(p.parse_args().folder)
    rows, dense = [], None
    for folder, (granularity, layout) in FOLDERS.items():
        path = root / folder / "results.json"
        if not path.is_file():
            continue
        for r in json.loads(path.read_text())["rows"]:
            if r["method"] == "dense":
                dense = dense or (r["params"], r["eval_ppl"])
                continue
            rows.append((r["sparsity"], layout, granularity, NAMES.get(r["method"], r["method"]), r["params"],
                         shape(r.get("kept", {})), r["eval_ppl"]))
    if dense is None:
        raise SystemExit(f"summarize_depth: no results.json with a dense row under {root}")
    lines = ["| target | layout | granularity | method | params | kept (heads / kv / FFN; layers) | perplexity | "
             "x dense control |", "|---|---|---|---|---|---|---|---|",
             f"| - | - | - | dense + the same training (control) | {dense[0]:,} | all | {dense[1]:.2f} | 1.000 |"]
    for sparsity, layout, granularity, method, params, kept, ppl in sorted(rows, key=lambda r: r[:3]):
        lines.append(f"| {sparsity:.0%} | {layout} | {granularity} | {method} | {params:,} | {kept} | {ppl:.2f} | "
                     f"{ppl / dense[1]:.3f} |")
    text = "\n".join(lines) + "\n"
    (root / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
