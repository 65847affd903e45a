"""Elastic sizes against dedicated runs: one once-for-all run against one HESSO run per size.

Run (CPU; results land in scripts/benchmark_results/elastic/, or smollm2/elastic/ with --reference smollm2):

    .venv/bin/python scripts/bench_elastic.py                      # the benchmark's GQA toy reference
    .venv/bin/python scripts/bench_elastic.py --reference smollm2  # the real model (about an hour)

Takes the benchmark's reference model, data and recovery budget (scripts/benchmark.py; any of its options
may follow). For each size (kept fraction of the prunable parameters) a dedicated HESSO run with
distillation (the benchmark's ``hesso_kd`` row: the trainer's defaults, the same steps) prunes to that
size; one elastic run (``elastic_sizes``, the same steps, distillation from the dense model for the full
model, in-place distillation for the sub-networks) trains every size at once. Each size is cut out of the
elastic run as ``hf-oto export-size`` does and evaluated as it is, without further training. Reported:
perplexity per size (and out-of-domain perplexity and cloze accuracy on the real model), the ratio to the
dedicated run, and the wall time of the elastic run against the dedicated runs' sum, measured in one run.
``--reuse FILE`` takes dedicated rows from a results.json of the benchmark or of this script, measured with
the same settings, instead of rerunning them.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchmark as bench  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    p.add_argument("--elastic_start", type=float, default=0.1, help="when sub-networks join (fraction of steps)")
    p.add_argument("--elastic_refresh", type=float, default=0.0, help="steps between re-rankings (0: rank once)")
    p.add_argument("--elastic_freeze", type=float, default=None, help="last re-ranking (fraction of steps)")
    p.add_argument("--elastic_samples", type=int, default=1)
    p.add_argument("--elastic_target", default="full", choices=("full", "teacher"),
                   help="what the sizes distil from: the full model (in place) or the dense teacher")
    p.add_argument("--elastic_label_weight", type=float, default=0.0,
                   help="share of each size's loss taken by the language-model loss")
    p.add_argument("--elastic_only", action="store_true", help="skip the dedicated rows (with --reuse: take them)")
    p.add_argument("--reuse", help="a results.json (benchmark.py's or this script's) whose hesso_kd rows serve as "
                                   "the dedicated runs")
    p.add_argument("--elastic_out", help="results folder (default: <benchmark --out>/elastic)")
    mine, rest = p.parse_known_args(argv)
    a = bench.parse_args(rest + ["--sparsities", *[str(round(1 - s, 6)) for s in mine.sizes]])
    return mine, a


def evaluate_size(model, space, removed: list[str], layout: str, eval_blocks, a) -> dict[str, Any]:
    """The size cut out as export-size does (a zeroed copy, sliced), evaluated as it is."""
    from hf_oto.groups.space import zero_groups
    from hf_oto.subnet import construct_subnet

    twin = copy.deepcopy(model)
    zero_groups(twin, space, removed)
    final = construct_subnet(twin, space, layout=layout).model
    return dict(params=bench.count(final), kept=bench.kept_shape(final.config), **bench.evaluate_model(final,
                                                                                                      eval_blocks, a))


def elastic_rows(mine, a, ref: Path, train_blocks, eval_blocks, workdir: Path) -> tuple[list[dict[str, Any]], float]:
    from transformers import AutoModelForCausalLM

    from hf_oto.optim.budget import Plan

    torch.manual_seed(a.seed)
    model = AutoModelForCausalLM.from_pretrained(ref)
    t0 = time.perf_counter()
    trainer = bench.train(model, train_blocks, a.steps, a, a.lr, workdir, elastic_sizes=mine.sizes,
                          elastic_start=mine.elastic_start, elastic_refresh=mine.elastic_refresh,
                          elastic_freeze=mine.elastic_freeze, elastic_samples=mine.elastic_samples,
                          elastic_target=mine.elastic_target, elastic_label_weight=mine.elastic_label_weight,
                          pruning_layout=a.layout, ffn_multiple=a.ffn_multiple, distill=True,
                          distill_weight=a.distill_weight, pruning_exclude=a.exclude,
                          pruning_criterion=a.hesso_criterion, pruning_selection=a.hesso_selection)
    seconds = time.perf_counter() - t0
    e = trainer.elastic
    model.eval()
    rows = [dict(method="elastic", size=1.0, sparsity=0.0, **bench.evaluate_model(model, eval_blocks, a),
                 params=bench.count(model))]
    for size, flags in zip(e.elastic.sizes, e.removed_flags, strict=True):
        removed = [e.space[i].name for i in torch.nonzero(flags).flatten().tolist()]
        row = evaluate_size(model, e.space, removed, a.layout, eval_blocks, a)
        fraction = Plan.from_mask(e.space, flags).pruned_params() / e.space.prunable_params
        rows.append(dict(method="elastic", size=size, sparsity=round(1 - size, 6), pruned_fraction=fraction, **row))
        print(f"elastic size {size}: {row}")
    for r in rows:
        r["settings"] = dict(e.record(), criterion=e.config.criterion)
    return rows, seconds


def dedicated_rows(mine, a, ref: Path, train_blocks, eval_blocks, workdir: Path) -> list[dict[str, Any]]:
    rows = []
    reused = json.loads(Path(mine.reuse).read_text()) if mine.reuse else None
    if reused is not None:
        now, then = bench.settings(a), reused.get("settings", {})
        changed = sorted(k for k in now if then.get(k) != now[k])
        if changed:
            raise SystemExit(f"--reuse {mine.reuse}: measured with other settings ({', '.join(changed)})")
    for size in mine.sizes:
        sparsity = round(1 - size, 6)
        stored = (reused or {}).get("rows", []) + (reused or {}).get("dedicated", [])  # benchmark's or this script's
        old = [r for r in stored if r["method"] == "hesso_kd" and r["sparsity"] == sparsity
               and r["seed"] == a.seed and "error" not in r]
        if old:
            rows.append(dict(old[0], size=size, reused=mine.reuse))
            continue
        if mine.elastic_only:
            continue
        row = bench.run_method("hesso_kd", sparsity, ref, train_blocks, eval_blocks, a, workdir / f"hesso-{size}")
        rows.append(dict(row, size=size))
        print(f"dedicated HESSO size {size}: {row.get('eval_ppl')}")
    return rows


def report(mine, a, res: dict[str, Any], out: Path, command: str) -> Path:
    dedicated = {r["size"]: r for r in res["dedicated"]}
    extra = "ood_ppl" in res["elastic"][0]
    head = "| size (kept) | params | dedicated HESSO ppl | elastic ppl | elastic / dedicated |"
    sep = "|---|---|---|---|---|"
    if extra:
        head += " dedicated OOD | elastic OOD | dedicated cloze | elastic cloze |"
        sep += "---|---|---|---|"
    lines = [
        "# Elastic sizes: one once-for-all run against one HESSO run per size",
        "",
        f"- command: `{command}`",
        f"- machine: {res['machine']}; date {res['date']}",
        f"- every run: {a.steps} steps x {a.batch} x {a.block} tokens, lr {a.lr}, layout {a.layout}, FFN multiple "
        f"{a.ffn_multiple}; dedicated rows: the benchmark's `hesso_kd` (trainer defaults, distillation weight "
        f"{a.distill_weight}); elastic: sizes {mine.sizes}, sub-networks from step {mine.elastic_start} "
        f"(fraction), {'re-ranked every ' + str(mine.elastic_refresh) if mine.elastic_refresh else 'ranked once'}, "
        f"{mine.elastic_samples} drawn size(s) per "
        "step beside the smallest, full model distilled from the dense one, sub-networks "
        + ("in place from the full model" if mine.elastic_target == "full" else "from the dense teacher")
        + (f" with {mine.elastic_label_weight} of their loss on the labels" if mine.elastic_label_weight else "")
        + "; every size cut out as export-size does and evaluated without further training",
        f"- reference: {res['reference']}",
        "",
        head,
        sep,
    ]
    for r in sorted(res["elastic"], key=lambda r: -r["size"]):
        d = dedicated.get(r["size"])
        cells = [f"{r['size']:g}", f"{r['params']:,}", "-" if d is None else f"{d['eval_ppl']:.2f}",
                 f"{r['eval_ppl']:.2f}", "-" if d is None else f"{r['eval_ppl'] / d['eval_ppl']:.3f}"]
        if extra:
            cells += ["-" if d is None else f"{d['ood_ppl']:.1f}", f"{r['ood_ppl']:.1f}",
                      "-" if d is None else f"{100 * d['cloze']:.0f}%", f"{100 * r['cloze']:.0f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    ded_seconds = sum(r["seconds"] for r in res["dedicated"] if not r.get("reused"))
    lines += ["", f"Elastic run: {res['elastic_seconds'] / 60:.1f} min for every size."]
    if ded_seconds:
        lines.append(f"Dedicated runs measured here: {ded_seconds / 60:.1f} min in all; elastic / sum of dedicated = "
                     f"{res['elastic_seconds'] / ded_seconds:.2f} (the goal: under 2 dedicated runs, "
                     f"{2 / len(res['dedicated']):.2f} of the sum here).")
    if any(r.get("reused") for r in res["dedicated"]):
        lines.append(f"Dedicated rows taken from {mine.reuse} (same settings; their minutes: "
                     + ", ".join(f"{r['size']:g}: {r['seconds'] / 60:.1f}" for r in res["dedicated"]) + ").")
    worst = max((r["eval_ppl"] / dedicated[r["size"]]["eval_ppl"] for r in res["elastic"] if r["size"] in dedicated),
                default=None)
    if worst is not None:
        lines.append(f"Worst size against its dedicated run: {worst:.3f}x (the goal: within 1.03x).")
    return write_results(out, lines, res)


def write_results(out: Path, lines: list[str], res: dict[str, Any]) -> Path:
    """``results.md`` (the lines) and ``results.json`` (everything measured) in ``out``."""
    path = out / "results.md"
    path.write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    return path


def setup(a: argparse.Namespace, out: Path):
    """The reference (SmolLM2 with --reference smollm2, else the benchmark's GQA toy one), its data and
    ``out`` created: (tokenizer, train blocks, eval blocks, reference folder, reference info)."""
    if a.reference == "smollm2":
        from real_model import smollm2_folder

        a.model = str(smollm2_folder())
    out.mkdir(parents=True, exist_ok=True)
    tokenizer, train_blocks, eval_blocks = bench.load_data(a)
    ref, info = bench.reference(a, tokenizer, train_blocks, "model" if a.model else "gqa")
    return tokenizer, train_blocks, eval_blocks, ref, info


def main(argv: list[str] | None = None) -> Path:
    mine, a = parse(argv)
    command = "python scripts/bench_elastic.py " + " ".join(sys.argv[1:] if argv is None else argv)
    out = Path(mine.elastic_out or Path(a.out) / "elastic")
    _, train_blocks, eval_blocks, ref, info = setup(a, out)
    res: dict[str, Any] = {"machine": bench.machine(), "versions": bench.versions(), "date": time.strftime("%Y-%m-%d"),
                           "reference": json.dumps(info), "settings": bench.settings(a)}
    with tempfile.TemporaryDirectory() as tmp:
        res["dedicated"] = dedicated_rows(mine, a, ref, train_blocks, eval_blocks, Path(tmp))
        res["elastic"], res["elastic_seconds"] = elastic_rows(mine, a, ref, train_blocks, eval_blocks,
                                                              Path(tmp) / "elastic")
    path = report(mine, a, res, out, command)
    print(path.read_text())
    return path


if __name__ == "__main__":
    main()
