"""The QFA section of scripts/benchmark.py (``--section qfa``): one QFA run against per-width runs.

On the benchmark reference, held-out perplexity at each of `--qfa_bits` (2, 3 and 4 by default; uniform) and at
mixed budgets:
1. the quantized base with no training (round-to-nearest and GPTQ);
2. QA-LoRA-style training, one run per bit-width, each with an equal share of the total steps;
3. one QFA run with all the steps (the same total tokens);
4. QFA + HESSO at 50% pruning (the same steps).
Mixed budgets are chosen by ``qfa_search`` on one half of the held-out blocks and reported on the
other half, next to the uniform configurations of similar memory and to random allocations of the
same memory (the mean of four; x markers in the plot). Memory is the exported weights'
size (packed codes, scales and the unquantized embeddings and norms).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

WIDTHS = (2, 3, 4)
QFA_ROWS = ("rtn", "gptq", "per_width", "qfa")  # the rows --qfa_rows may pick (QFA + HESSO: --qfa_hesso)
FIRST_RANK = 8  # the adapters' rank when these tables were first measured (rows at other ranks say theirs)
# The scales' sign: "signed" since 2026-12-07 (hf_oto.quant.quantize mirrors the grid where that fits better);
# stored results without the key were measured with positive scales only.
GRID = "signed"


def _qfa_model(ref: Path, quantizer: str, bits, calib, group_size: int):
    from transformers import AutoModelForCausalLM

    from hf_oto.quant import QFAConfig, prepare_qfa

    model = AutoModelForCausalLM.from_pretrained(ref)
    prepare_qfa(model, QFAConfig(bits=tuple(bits), quantizer=quantizer, group_size=group_size), calib)
    return model


def _ppl(model, bits, blocks) -> float:
    from hf_oto.quant.search import eval_loss

    return math.exp(eval_loss(model, bits, blocks))


def _train_qfa(ref: Path, train_blocks, steps: int, a: argparse.Namespace, workdir: Path, bits, adapters=None,
               **pruning):
    """One QFA run on ``bits``; its adapters are ``--qfa_rank`` / ``--qfa_shared_rank`` unless ``adapters`` says."""
    from transformers import AutoModelForCausalLM

    from hf_oto.data import Blocks
    from hf_oto.trainer import HFOTOTrainer, HFOTOTrainingArguments

    torch.manual_seed(a.seed)
    model = AutoModelForCausalLM.from_pretrained(ref)
    pruning = pruning or {"target_sparsity": 0}
    args = HFOTOTrainingArguments(
        output_dir=str(workdir), max_steps=steps, per_device_train_batch_size=a.batch, learning_rate=a.qfa_lr,
        lr_scheduler_type="cosine", warmup_steps=max(1, steps // 20), save_strategy="no", report_to=[],
        seed=a.seed, data_seed=a.seed, logging_steps=10**6, disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0, qfa=True, qfa_bits=list(bits), qfa_group_size=a.qfa_group_size,
        qfa_quantizer="gptq", qfa_calibration_batches=a.calib_batches, qfa_schedule=a.qfa_schedule,
        **(_adapter_names(a)[0] if adapters is None else adapters), **pruning)
    trainer = HFOTOTrainer(model=model, args=args, train_dataset=Blocks(train_blocks))
    t0 = time.perf_counter()
    trainer.train()
    return model, trainer, time.perf_counter() - t0


def _configs(model, search_blocks, report_blocks, a) -> list[dict[str, Any]]:
    """Uniform widths and the searched mixed budgets of one QFA model, on the report half."""
    from hf_oto.quant.search import BitSearch, Costs

    costs = Costs(model)
    widths = sorted(_widths(model))
    n = len(_layers(model))
    rows = []
    for b in widths:
        cfg = (b,) * n
        rows.append({"config": f"uniform {b}-bit", "bits": list(cfg), "avg_bits": b,
                     "mib": costs.bytes(cfg) / 2**20, "ppl": _ppl(model, cfg, report_blocks)})
    if len(widths) > 1 and a.qfa_budgets:  # each budget from the narrowest width to below the widest is searched
        # each configuration measured once for all budgets
        search = BitSearch(model, search_blocks, holdout=a.qfa_holdout, progress=False)  # None: qfa-search's default
        for budget in (b for b in a.qfa_budgets if widths[0] <= b < widths[-1]):
            r = search.search(average_bits=budget, samples=a.qfa_samples, refine=a.qfa_refine, seed=a.seed,
                              min_gain_se=a.qfa_min_gain_se)
            cfg = r.best.bits
            rows.append({"config": f"searched, <= {budget} bits", "bits": list(cfg),
                         "avg_bits": costs.average_bits(cfg), "mib": costs.bytes(cfg) / 2**20,
                         "ppl": _ppl(model, cfg, report_blocks), "evaluated": r.evaluated, "search": "measured",
                         "gain_se": r.gain_se})
            if r.mix is not None:  # the mix the paired test turned down, reported to show what it would have been
                rows.append({"config": f"best mix, not chosen, <= {budget} bits", "bits": list(r.mix.bits),
                             "avg_bits": r.mix.average_bits, "mib": r.mix.bytes / 2**20,
                             "ppl": _ppl(model, r.mix.bits, report_blocks), "gain_se": r.gain_se})
            if budget not in widths:  # at a width's own budget every allocation is that uniform width
                rows.append(_random_row(search, budget, report_blocks, a.seed))
    return rows


RANDOM_MIXES = 4  # the random allocations each searched budget is compared with


def _random_row(search, budget: float, blocks, seed: int) -> dict[str, Any]:
    """The mean perplexity of :data:`RANDOM_MIXES` random allocations at the searched budget
    (:meth:`~hf_oto.quant.search.BitSearch.random_allocation`: as many layers as fit take the wider of the two
    widths around the budget, chosen at random, the rest the narrower; the same memory as a searched mix,
    without the search)."""
    g = torch.Generator().manual_seed(seed)
    limit = search.limit(budget)
    cfgs = [search.random_allocation(limit, g) for _ in range(RANDOM_MIXES)]
    ppls = [_ppl(search.model, cfg, blocks) for cfg in cfgs]
    return {"config": f"random mix, <= {budget} bits (mean of {RANDOM_MIXES})", "bits": None,
            "avg_bits": search.costs.average_bits(cfgs[-1]), "mib": search.costs.bytes(cfgs[-1]) / 2**20,
            "ppl": sum(ppls) / len(ppls), "ppl_range": [min(ppls), max(ppls)], "random": True}


def _widths(model) -> tuple[int, ...]:
    from hf_oto.quant import qfa_layers

    return qfa_layers(model)[0][2].bits


def _layers(model):
    from hf_oto.quant.prepare import decoder_layers

    return decoder_layers(model)[1]


def _adapter_names(a: argparse.Namespace) -> tuple[dict[str, int], str, str]:
    """The adapters' settings, and what the per-width rows' and the QFA row's names add for them (nothing
    for the settings these tables were first measured with: rank 8, no shared adapter)."""
    rank = a.qfa_rank
    shared = rank if a.qfa_shared_rank is None else a.qfa_shared_rank
    per_width = f", rank {rank}" if rank != FIRST_RANK else ""
    qfa = f", rank {rank} per width + {shared} shared" if shared else per_width
    return {"qfa_rank": rank, "qfa_shared_rank": shared}, per_width, qfa


def run_qfa_section(a: argparse.Namespace, ref: Path, train_blocks, eval_blocks, workdir: Path,
                    previous: dict[str, Any] | None = None, checkpoint=None) -> dict[str, Any]:
    """The QFA rows (see the module docstring). With ``previous`` (an earlier run's results with the same
    settings), the methods it holds are kept and not rerun; ``checkpoint(res)`` runs after each method."""
    from transformers import AutoModelForCausalLM

    from hf_oto.data import calibration_batches
    from hf_oto.export.quantized import save_quantized
    from hf_oto.metrics import perplexity
    from hf_oto.quant.search import resolve_holdout

    if a.qfa_hesso and 3.0 not in a.qfa_budgets:
        raise SystemExit("QFA section: the QFA + HESSO row exports its searched 3.0-bit configuration; add 3.0 to "
                         "--qfa_budgets or pass --no-qfa_hesso")
    started = time.time()
    half = min(len(eval_blocks) // 2, a.qfa_search_blocks or len(eval_blocks))
    search_blocks, report_blocks = eval_blocks[:half], eval_blocks[half:]
    calib = calibration_batches(train_blocks, a.calib_batches, a.batch)  # the first blocks (as measured)
    steps = a.qfa_steps
    widths = tuple(sorted(set(a.qfa_bits)))
    res: dict[str, Any] = {"steps": steps, "batch": a.batch, "block": a.block, "group_size": a.qfa_group_size,
                           "lr": a.qfa_lr, "schedule": a.qfa_schedule, "search_blocks": half,
                           "report_blocks": len(report_blocks), "bits": list(widths), "grid": GRID,
                           "min_gain_se": a.qfa_min_gain_se,
                           "holdout": resolve_holdout(a.qfa_holdout, half), "rows": []}
    settings = {k: v for k, v in res.items() if k != "rows"}
    # results from before --qfa_bits, signed scales and the search's paired test (any lower mean loss won)
    before = {"bits": list(WIDTHS), "grid": "positive", "min_gain_se": 0.0, "holdout": 0.0}
    if previous and any(previous.get(k, before.get(k)) != v for k, v in settings.items()):
        changed = sorted(k for k, v in settings.items() if previous.get(k, before.get(k)) != v)
        raise SystemExit(f"QFA section: the stored results were measured with other settings ({', '.join(changed)})")
    done = {r["method"] for r in (previous or {}).get("rows", [])}
    if previous:
        res["rows"] = list(previous["rows"])
        res.update({k: previous[k] for k in ("fp_ppl", "fp_mib", "qfa_memory", "qfa_hesso_export_mib",
                                             "qfa_hesso_export_bits") if k in previous})
    earlier = (previous or {}).get("wall_minutes", 0.0)

    def save() -> None:
        res["wall_minutes"] = earlier + (time.time() - started) / 60
        if checkpoint is not None:
            checkpoint(res)

    if "fp_ppl" not in res:
        fp = AutoModelForCausalLM.from_pretrained(ref)
        res["fp_ppl"] = perplexity(fp, report_blocks)
        res["fp_mib"] = sum(p.numel() * p.element_size() for p in fp.parameters()) / 2**20
        del fp

    def add(method: str, rows: list[dict[str, Any]], seconds: float | None = None, **extra):
        for r in rows:
            res["rows"].append(dict(r, method=method, seconds=seconds, **extra))
        print(f"qfa benchmark: {method}: " + ", ".join(f"{r['config']} {r['ppl']:.2f}" for r in rows), flush=True)
        save()

    rows = set(a.qfa_rows)
    for quantizer in ("rtn", "gptq"):
        name = f"{quantizer.upper()} base, no training"
        if name not in done and quantizer in rows:
            model = _qfa_model(ref, quantizer, widths, calib, a.qfa_group_size)
            add(name, _configs(model, search_blocks, report_blocks, a))
            del model
    share = max(1, steps // len(widths))
    adapters, per_width_name, qfa_name = _adapter_names(a)
    name = f"QA-LoRA, one run per width ({share} steps each){per_width_name}"
    trained = {r["config"] for r in res["rows"] if r["method"] == name}
    for b in widths:
        if f"uniform {b}-bit" in trained or "per_width" not in rows:
            continue
        model, _, secs = _train_qfa(ref, train_blocks, share, a, workdir / f"qalora{b}", (b,),
                                    dict(adapters, qfa_shared_rank=0))
        add(name, _configs(model, search_blocks, report_blocks, a), secs)
        del model
    name = f"QFA, one run ({steps} steps){qfa_name}"
    if name not in done and "qfa" in rows:
        model, trainer, secs = _train_qfa(ref, train_blocks, steps, a, workdir / "qfa", widths)
        res["qfa_memory"] = vars(trainer.qfa_memory)
        add(name, _configs(model, search_blocks, report_blocks, a), secs)
        del model, trainer
    name = f"QFA + HESSO 50% ({steps} steps){qfa_name}"
    if a.qfa_hesso and name not in done:
        model, trainer, secs = _train_qfa(ref, train_blocks, steps, a, workdir / "qfa_hesso", widths,
                                          target_sparsity=0.5, pruning_layout="uniform", start_pruning_step=0.05,
                                          pruning_steps=0.5, pruning_periods=5, ffn_multiple=a.qfa_group_size)
        rows = _configs(model, search_blocks, report_blocks, a)
        pruned = trainer.hesso.metrics()["pruned_param_fraction"]
        cfg = next(r for r in rows if r["config"].startswith("searched, <= 3.0"))["bits"]
        out = save_quantized(model, cfg, workdir / "qfa_hesso_export", space=trainer.pruning_space)
        res["qfa_hesso_export_mib"] = (out / "model.safetensors").stat().st_size / 2**20
        res["qfa_hesso_export_bits"] = cfg
        add(name, rows, secs, pruned_fraction=pruned)
    save()
    return res


def write_qfa_report(out: Path, res: dict[str, Any], command: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "qfa.json").write_text(json.dumps(res, indent=1))
    lines = ["# QFA benchmark (quantization-aware once-for-all)", "",
             *(f"- command: `{c}`" for c in res.get("commands") or [command]),
             *(f"- note: {n}" for n in res.get("notes", [])),
             f"- every trained row: {res['steps']} steps in total x {res['batch']} x {res['block']} tokens "
             f"(the per-width runs split them equally), adapters lr {res['lr']}, GPTQ base, group size "
             f"{res['group_size']}, symmetric ({res.get('grid', 'positive')} scales); sampling: {res['schedule']}",
             f"- searched rows: chosen by `qfa_search` on {res['search_blocks']} held-out blocks, reported on "
             f"the other {res['report_blocks']}; every perplexity here is on those {res['report_blocks']} blocks",
             f"- {_acceptance(res.get('min_gain_se', 0.0), res.get('holdout', 0.0))}",
             f"- fp32 reference: perplexity {res['fp_ppl']:.2f}, {res['fp_mib']:.2f} MiB",
             f"- wall time of this section: {res.get('wall_minutes', float('nan')):.1f} min", "",
             "| method | configuration | avg bits | MiB | held-out perplexity | train minutes |",
             "|---|---|---|---|---|---|"]
    fitted = [r for r in res["rows"] if r["config"].startswith("searched") and "search" not in r]
    if fitted:
        lines.insert(len(lines) - 3, "- searched rows marked (fitted): chosen by the search's first version, "
                     "which fitted an additive model to random configurations instead of measuring each layer")
    for r in res["rows"]:
        minutes = "-" if r.get("seconds") is None else f"{r['seconds'] / 60:.1f}"
        if r in fitted:
            r = dict(r, config=r["config"].replace("searched,", "searched (fitted),"))
        spread = f" [{r['ppl_range'][0]:.2f}-{r['ppl_range'][1]:.2f}]" if "ppl_range" in r else ""
        if r.get("gain_se") is not None:
            r = dict(r, config=f"{r['config']} (mix's gain {r['gain_se']:.1f} SE)")
        lines.append(f"| {r['method']} | {r['config']} | {r['avg_bits']:.2f} | {r['mib']:.2f} | "
                     f"{r['ppl']:.2f}{spread} | {minutes} |")
    if "qfa_hesso_export_mib" in res:
        lines += ["", f"QFA + HESSO export at the searched <= 3.0-bit configuration "
                      f"{res['qfa_hesso_export_bits']}: {res['qfa_hesso_export_mib']:.2f} MiB on disk."]
    m = res.get("qfa_memory")
    if m:
        lines += [f"QFA's frozen base in training: codes {m['codes'] / 2**20:.2f} MiB + scales "
                  f"{m['scales'] / 2**20:.2f} MiB (one fp32 copy per width: {m['fp_per_width'] / 2**20:.2f} MiB); "
                  f"adapters {m['adapters'] / 2**20:.2f} MiB."]
    path = out / "qfa.md"
    path.write_text("\n".join(lines) + "\n")
    _plot(res, out / "qfa.png")
    return path


def _acceptance(min_gain_se: float, holdout: float = 0.0) -> str:
    if not min_gain_se:
        return "the search kept the configuration with the lowest mean loss on its blocks (no paired test)"
    where = (f"on the last {holdout:g} of the search blocks (which the search itself did not use)" if holdout
             else "on the search blocks")
    return (f"a mix was chosen over the best uniform configuration within the budget only when its per-block "
            f"loss gain {where} exceeded {min_gain_se:g} paired standard errors (SE); rows say the "
            "best mix's gain, and a mix turned down is reported as 'best mix, not chosen'")


def _plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    methods = list(dict.fromkeys(r["method"] for r in res["rows"]))
    for m in methods:
        rows = sorted((r for r in res["rows"] if r["method"] == m and not r.get("random")
                       and not r["config"].startswith("best mix")),
                      key=lambda r: r["avg_bits"])
        line, = ax.plot([r["avg_bits"] for r in rows], [r["ppl"] for r in rows], marker="o", label=m)
        mixes = [r for r in res["rows"] if r["method"] == m and r.get("random")]
        ax.scatter([r["avg_bits"] for r in mixes], [r["ppl"] for r in mixes], marker="x", color=line.get_color())
    ax.axhline(res["fp_ppl"], color="grey", linestyle="--", label="fp32 reference")
    ax.set_xlabel("average bits per quantized weight")
    ax.set_ylabel("held-out perplexity")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
