"""One table of the depth benchmark: width, depth and both, in the uniform and per-layer layouts.

    python scripts/summarize_depth.py [scripts/benchmark_results/depth_toy]
    python scripts/summarize_depth.py scripts/benchmark_results/smollm2/depth_sweep

reads the ``results.json`` of each folder below the given one (written by ``scripts/benchmark.py``,
commands in each folder's ``results.md``; the folder's name says its granularity and layout, see
``FOLDERS``) and writes ``summary.md`` beside them. Rows measured out of domain (the real model) get
those columns too.
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
         "block_influence_kd": "ShortGPT-style block influence, one-shot + the same training",
         "block_influence_pp_kd": "block influence per parameter freed, one-shot + the same training"}


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
    rows, dense, original = [], None, None
    for folder, (granularity, layout) in FOLDERS.items():
        path = root / folder / "results.json"
        if not path.is_file():
            continue
        stored = json.loads(path.read_text())
        original = original or next(iter(stored.get("references", {}).values()), None)
        for r in stored["rows"]:
            if r["method"] == "dense":
                dense = dense or r
                continue
            rows.append((r["sparsity"], layout, granularity, NAMES.get(r["method"], r["method"]), r))
    if dense is None:
        raise SystemExit(f"summarize_depth: no results.json with a dense row under {root}")
    ood = "ood_ppl" in dense and original is not None and "ood_ppl" in original

    def extra(r: dict) -> str:
        if not ood:
            return ""
        cloze = f"{r['cloze']:.0%}" if r.get("cloze") is not None else "-"
        return f" {r['ood_ppl']:.2f} | {r['ood_ppl'] / original['ood_ppl']:.3f} | {cloze} |"

    head = " out-of-domain ppl | x original | cloze |" if ood else ""
    lines = [f"| target | layout | granularity | method | params | kept (heads / kv / FFN; layers) | perplexity | "
             f"x dense control |{head}", "|---|---|---|---|---|---|---|---|" + "---|" * (3 if ood else 0)]
    if ood:
        lines.append(f"| - | - | - | original (no training) | {original['params']:,} | all | {original['ppl']:.2f} | "
                     f"{original['ppl'] / dense['eval_ppl']:.3f} |{extra(original)}")
    lines.append(f"| - | - | - | dense + the same training (control) | {dense['params']:,} | all | "
                 f"{dense['eval_ppl']:.2f} | 1.000 |{extra(dense)}")
    for sparsity, layout, granularity, method, r in sorted(rows, key=lambda r: r[:4]):
        lines.append(f"| {sparsity:.0%} | {layout} | {granularity} | {method} | {r['params']:,} | "
                     f"{shape(r.get('kept', {}))} | {r['eval_ppl']:.2f} | {r['eval_ppl'] / dense['eval_ppl']:.3f} |"
                     f"{extra(r)}")
    text = "\n".join(lines) + "\n"
    (root / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
