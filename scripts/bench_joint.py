"""Joint (size, bits) search from one elastic QFA run, against one pruned QFA run per size, at equal memory.

Run (CPU; results land in scripts/benchmark_results/joint/, or smollm2/joint/ with --reference smollm2):

    .venv/bin/python scripts/bench_joint.py                      # the benchmark's GQA toy reference
    .venv/bin/python scripts/bench_joint.py --quick              # a smoke test (minutes)

Takes the benchmark's reference model, data and QFA settings (scripts/benchmark.py's ``--qfa_*`` options;
any of its options may follow). Rows, every one trained for ``--qfa_steps`` steps on the same data:
1. **joint**: one run with ``qfa`` and ``elastic_sizes`` (nested sizes as masked views, one adapter per
   bit-width, both sampled every step), saved and searched as ``hf-oto qfa-search`` does;
2. **separate**: one QFA run per size, the dense model (size 1) with QFA alone and each smaller size with
   QFA + HESSO pruning to that size (the same steps each), each searched for per-layer bits.
For each memory budget (bytes of the exported weights) the joint search picks a (size, bits); each
separate model gets its own per-layer search, and the best of them is the one to beat. Configurations are
chosen on one half of the held-out blocks and reported on the other. The wall time of the joint run is
compared with the sum of the separate runs (measured in this run).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchmark as bench  # noqa: E402
from bench_elastic import setup, write_results  # noqa: E402
from bench_qfa import WIDTHS, _train_qfa  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BUDGET_POINTS = ((1.0, 3.0), (1.0, 2.0), (0.7, 3.0), (0.5, 3.0), (0.5, 2.0))  # (size, average bits) -> bytes


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", type=float, default=[0.5, 0.7])
    p.add_argument("--elastic_start", type=float, default=0.1, help="when sub-networks join (fraction of steps)")
    p.add_argument("--joint_out", help="results folder (default: <benchmark --out>/joint)")
    p.add_argument("--distill", action="store_true", help="every run distils from the fp32 reference (weight: the "
                                                          "benchmark's --distill_weight); the joint run's sizes too")
    mine, rest = p.parse_known_args(argv)
    return mine, bench.parse_args(rest)


def _distill(mine, a) -> dict[str, Any]:
    return {"distill": True, "distill_weight": a.distill_weight} if mine.distill else {}


def _loss(model, bits, blocks) -> float:
    from hf_oto.quant.search import eval_loss

    return eval_loss(model, bits, blocks)


def joint_rows(mine, a, ref: Path, train_blocks, search_blocks, report_blocks, budgets: list[int],
               work: Path) -> tuple[list[dict[str, Any]], float, dict[str, Any]]:
    from hf_oto.quant.joint import joint_search, run_spaces, zero_size
    from hf_oto.quant.run import load_qfa_run
    from hf_oto.quant.search import Costs

    model, trainer, seconds = _train_qfa(ref, train_blocks, a.qfa_steps, a, work / "joint", WIDTHS,
                                         elastic_sizes=mine.sizes, elastic_start=mine.elastic_start,
                                         pruning_layout="uniform", ffn_multiple=a.qfa_group_size, **_distill(mine, a))
    run_dir = trainer.save_qfa_run(str(work / "joint_run"))
    del model, trainer
    run = load_qfa_run(run_dir)
    _, gates = run_spaces(run)
    saved = {k: v.clone() for k, v in run.model.state_dict().items()}
    info: dict[str, Any] = {"uniform": []}
    for size in [1.0, *sorted(mine.sizes, reverse=True)]:  # every (size, uniform width) on the report half
        zero_size(run.model, run.info, gates, size)
        costs = Costs(run.model)
        layers = len(costs.per_layer)
        for b in run.config.bits:
            cfg = (b,) * layers
            info["uniform"].append({"size": size, "bits": b, "mib": costs.bytes(cfg) / 2**20,
                                    "ppl": math.exp(_loss(run.model, cfg, report_blocks))})
    run.model.load_state_dict(saved)
    rows = []
    for limit in budgets:
        try:
            r = joint_search(run, search_blocks, max_bytes=limit, samples=a.qfa_samples, refine=a.qfa_refine,
                             seed=a.seed, holdout=a.qfa_holdout, progress=False)
        except Exception as exc:  # noqa: BLE001 - a budget no size fits is a row, not a crash
            rows.append({"budget": limit, "error": str(exc)})
            continue
        zero_size(run.model, run.info, gates, r.size)
        ppl = math.exp(_loss(run.model, r.best.bits, report_blocks))
        run.model.load_state_dict(saved)
        rows.append({"budget": limit, "size": r.size, "bits": list(r.best.bits), "avg_bits": r.best.average_bits,
                     "mib": r.best.bytes / 2**20, "ppl": ppl, "evaluated": r.evaluated,
                     "per_size": {f"{s.size:g}": None if s.search is None else s.search.best.loss
                                  for s in r.per_size}})
        print(f"joint, budget {limit / 2**20:.2f} MiB: size {r.size:g}, {r.best.average_bits:.2f} bits, ppl {ppl:.2f}",
              flush=True)
    return rows, seconds, info


def separate_models(mine, a, ref: Path, train_blocks, work: Path) -> tuple[dict[float, Any], dict[float, float]]:
    """One QFA run per size: QFA alone for the full model, QFA + HESSO to each smaller size."""
    models, seconds = {}, {}
    for size in [1.0, *sorted(mine.sizes, reverse=True)]:
        pruning = {} if size == 1.0 else dict(target_sparsity=round(1 - size, 6), pruning_layout="uniform",
                                              start_pruning_step=0.05, pruning_steps=0.5, pruning_periods=5,
                                              ffn_multiple=a.qfa_group_size)
        model, trainer, secs = _train_qfa(ref, train_blocks, a.qfa_steps, a, work / f"sep{size:g}", WIDTHS, **pruning,
                                          **_distill(mine, a))
        models[size], seconds[size] = model, secs
        print(f"separate size {size:g}: trained in {secs / 60:.1f} min", flush=True)
        del trainer
    return models, seconds


def budgets_from(models: dict[float, Any]) -> list[int]:
    """The memory points: the exported bytes of each (size, average bits) in BUDGET_POINTS, on the separate
    model of that size (the bytes depend only on the kept shapes and the widths)."""
    from hf_oto.quant.search import Costs, bytes_at_average

    points = []
    for size, bits in BUDGET_POINTS:
        if size not in models:
            continue
        costs = Costs(models[size])
        points.append(costs.other + sum(bytes_at_average(costs, i, bits, WIDTHS) for i in range(len(costs.per_layer))))
    return sorted(set(points), reverse=True)


def separate_rows(a, models: dict[float, Any], search_blocks, report_blocks,
                  budgets: list[int]) -> tuple[list[dict[str, Any]], dict[str, float]]:
    from hf_oto.errors import ConfigError
    from hf_oto.quant import qfa_search
    from hf_oto.quant.search import Costs

    rows, uniform = [], {}
    for size, model in models.items():
        layers = len(Costs(model).per_layer)
        for b in WIDTHS:
            uniform[f"{size:g}:{b}"] = math.exp(_loss(model, (b,) * layers, report_blocks))
        for limit in budgets:
            try:
                r = qfa_search(model, search_blocks, max_bytes=limit, samples=a.qfa_samples, refine=a.qfa_refine,
                               seed=a.seed, holdout=a.qfa_holdout, progress=False)
            except ConfigError:
                rows.append({"size": size, "budget": limit, "fits": False})
                continue
            ppl = math.exp(_loss(model, r.best.bits, report_blocks))
            rows.append({"size": size, "budget": limit, "fits": True, "bits": list(r.best.bits),
                         "avg_bits": r.best.average_bits, "mib": r.best.bytes / 2**20, "ppl": ppl})
        print(f"separate size {size:g}: " + ", ".join(f"{r['budget'] / 2**20:.2f} MiB: {r['ppl']:.2f}" for r in rows
                                                      if r["size"] == size and r["fits"]), flush=True)
    return rows, uniform


def report(mine, a, res: dict[str, Any], out: Path, command: str) -> Path:
    lines = ["# Joint (size, bits) search from one elastic QFA run, against one QFA run per size", "",
             f"- command: `{command}`", f"- machine: {res['machine']}; date {res['date']}",
             f"- every run: {a.qfa_steps} steps x {a.batch} x {a.block} tokens from the reference, adapters lr "
             f"{a.qfa_lr}, GPTQ base at {list(WIDTHS)} bits, group size {a.qfa_group_size}; joint: elastic sizes "
             f"{mine.sizes} from {mine.elastic_start} of the steps; separate: QFA alone (size 1) and QFA + HESSO "
             "to each size (uniform layout)" + ("; every run distils from the fp32 reference (weight "
                                                f"{a.distill_weight}), the joint run's sizes too" if mine.distill
                                                else "; no distillation"),
             f"- configurations chosen on {res['search_blocks']} held-out blocks, perplexity on the other "
             f"{res['report_blocks']}; memory: the exported weights (packed codes, scales, unquantized embeddings)",
             f"- fp32 reference: perplexity {res['fp_ppl']:.2f}", "",
             "| budget MiB | joint: size, avg bits | joint ppl | best separate: size, avg bits | separate ppl | "
             "joint / separate |", "|---|---|---|---|---|---|"]
    for j in res["joint"]:
        seps = [r for r in res["separate"] if r["budget"] == j["budget"] and r["fits"]]
        best = min(seps, key=lambda r: r["ppl"]) if seps else None
        left = "no size fits" if "error" in j else f"{j['size']:g}, {j['avg_bits']:.2f}"
        jp = "-" if "error" in j else f"{j['ppl']:.2f}"
        right = "none fits" if best is None else f"{best['size']:g}, {best['avg_bits']:.2f}"
        sp = "-" if best is None else f"{best['ppl']:.2f}"
        ratio = "-" if best is None or "error" in j else f"{j['ppl'] / best['ppl']:.3f}"
        lines.append(f"| {j['budget'] / 2**20:.2f} | {left} | {jp} | {right} | {sp} | {ratio} |")
    lines += ["", "Every size of the joint run at uniform widths (report half):", "",
              "| size | bits | MiB | ppl | separate run of that size, same width |", "|---|---|---|---|---|"]
    sep_uniform = res.get("separate_uniform", {})
    for u in res["joint_uniform"]:
        s = sep_uniform.get(f"{u['size']:g}:{u['bits']}")
        lines.append(f"| {u['size']:g} | {u['bits']} | {u['mib']:.2f} | {u['ppl']:.2f} | "
                     f"{'-' if s is None else f'{s:.2f}'} |")
    total = sum(res["separate_seconds"].values())
    lines += ["", f"Joint run: {res['joint_seconds'] / 60:.1f} min; separate runs: "
              + ", ".join(f"size {k}: {v / 60:.1f}" for k, v in res["separate_seconds"].items())
              + f" min, {total / 60:.1f} min in all; joint / sum = {res['joint_seconds'] / total:.2f}."]
    return write_results(out, lines, res)


def main(argv: list[str] | None = None) -> Path:
    from hf_oto.metrics import perplexity

    mine, a = parse(argv)
    command = "python scripts/bench_joint.py " + " ".join(sys.argv[1:] if argv is None else argv)
    out = Path(mine.joint_out or Path(a.out) / "joint")
    _, train_blocks, eval_blocks, ref, info = setup(a, out)
    half = min(len(eval_blocks) // 2, a.qfa_search_blocks or len(eval_blocks))
    search_blocks, report_blocks = eval_blocks[:half], eval_blocks[half:]
    from transformers import AutoModelForCausalLM

    res: dict[str, Any] = {"machine": bench.machine(), "versions": bench.versions(), "date": time.strftime("%Y-%m-%d"),
                           "reference": json.dumps(info), "settings": bench.settings(a),
                           "search_blocks": len(search_blocks), "report_blocks": len(report_blocks),
                           "fp_ppl": perplexity(AutoModelForCausalLM.from_pretrained(ref), report_blocks)}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        models, res["separate_seconds"] = separate_models(mine, a, ref, train_blocks, work)
        budgets = res["budgets"] = budgets_from(models)
        res["separate"], res["separate_uniform"] = separate_rows(a, models, search_blocks, report_blocks, budgets)
        del models
        res["joint"], res["joint_seconds"], extra = joint_rows(mine, a, ref, train_blocks, search_blocks,
                                                               report_blocks, budgets, work)
        res["joint_uniform"] = extra["uniform"]
    path = report(mine, a, res, out, command)
    print(path.read_text())
    return path


if __name__ == "__main__":
    main()
