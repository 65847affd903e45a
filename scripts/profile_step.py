"""Where a training step's time goes on the real model (SmolLM2-135M-Instruct, see real_model.py).

Run: .venv/bin/python scripts/profile_step.py [--steps 14] [--out scripts/benchmark_results/smollm2/step_time.md]

Each configuration trains a fresh copy for ``--steps`` steps of the benchmark's budget (4 x 256 tokens,
a schedule laid out for 100 steps, so the steps measured cover HESSO's warm-up and pruning phase) and
times, per step: the data (fetching the batch), the student's forward and backward (the training step
minus the teacher), the teacher's forward, the optimizer step (AdamW, or HESSO with its accounting) and
the rest (gradient clipping, callbacks, logging). The first two steps are left out (warm-up of the
allocator and caches). Also a bf16 teacher and bf16 autocast, where this CPU multiplies bf16 matrices at
least about as fast as fp32 ones (``hf_oto.env.cpu_bf16_slowdown``); their quality side is the README's
SmolLM2 job (fp32 against ``bf16: auto``) and the benchmark's ``dense_bf16`` row. Freed memory is kept for
reuse as ``hf-oto prune`` keeps it on CPU runs (``hf_oto.job.memory``; ``HF_OTO_KEEP_FREED_MEMORY=0``
turns it off here too).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parents[1]
PARTS = ("data", "student", "teacher", "optimizer", "other")


class StepClock(TrainerCallback):
    """Per-step wall time of each part (the training step is timed by :func:`timed_training_step`)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self.last_end = time.perf_counter()
        self.train_s = 0.0
        self.teacher_s = 0.0

    def on_step_begin(self, args, state, control, **kw):
        self.begin = time.perf_counter()

    def on_pre_optimizer_step(self, args, state, control, **kw):
        self.pre_opt = time.perf_counter()

    def on_optimizer_step(self, args, state, control, **kw):
        self.post_opt = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        end = time.perf_counter()
        total = end - self.last_end
        row = {"total": total, "data": self.begin - self.last_end, "teacher": self.teacher_s,
               "student": self.train_s - self.teacher_s, "optimizer": self.post_opt - self.pre_opt}
        row["other"] = total - sum(row[k] for k in ("data", "student", "teacher", "optimizer"))
        self.rows.append(row)
        self.train_s = self.teacher_s = 0.0
        self.last_end = end


def timed_training_step(trainer, clock: StepClock) -> None:
    step = trainer.training_step

    def timed(*args, **kwargs):
        stats = getattr(trainer, "_distill_stats", None)
        before = stats["teacher_s"] if stats else 0.0
        t0 = time.perf_counter()
        loss = step(*args, **kwargs)
        clock.train_s += time.perf_counter() - t0
        clock.teacher_s += (stats["teacher_s"] - before) if stats else 0.0
        return loss

    trainer.training_step = timed


def profile(name: str, folder: Path, blocks: torch.Tensor, steps: int, bf16: bool, pruning: dict | None):
    from hf_oto.data import Blocks
    from hf_oto.trainer import HFOTOTrainer, HFOTOTrainingArguments

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    common = dict(output_dir=str(ROOT / "outputs" / "profile_step"), max_steps=100, per_device_train_batch_size=4,
                  learning_rate=1e-4, lr_scheduler_type="cosine", warmup_steps=5, save_strategy="no",
                  report_to=[], logging_steps=10**6, disable_tqdm=True, use_cpu=True, bf16=bf16,
                  dataloader_num_workers=0, seed=0)
    if pruning is None:
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=Blocks(blocks))
    else:
        args = HFOTOTrainingArguments(**common, **pruning)
        trainer = HFOTOTrainer(model=model, args=args, train_dataset=Blocks(blocks))
    clock = StepClock()

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            control.should_training_stop = state.global_step >= steps

    trainer.add_callback(clock)
    trainer.add_callback(Stop())
    timed_training_step(trainer, clock)
    clock.last_end = time.perf_counter()
    trainer.train()
    kept = clock.rows[2:]
    out = {k: statistics.fmean(r[k] for r in kept) for k in ("total", *PARTS)}
    out["optimizer_median"] = statistics.median(r["optimizer"] for r in kept)
    out["name"] = name
    print(f"{name}: {out['total']:.2f} s/step (" + ", ".join(f"{k} {out[k]:.2f}" for k in PARTS)
          + f"; optimizer median {out['optimizer_median']:.2f})", flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=14)
    p.add_argument("--out", default=str(ROOT / "scripts" / "benchmark_results" / "smollm2" / "step_time.md"))
    p.add_argument("--bf16_anyway", action="store_true", help="run the bf16 configurations even where bf16 is slow")
    a = p.parse_args(argv)
    if a.steps < 4:
        p.error("--steps must be at least 4 (the first two are left out)")
    from datasets import Dataset
    from real_model import smollm2_folder
    from transformers import AutoTokenizer

    from hf_oto.data import stdlib_text, tokenize_blocks

    folder = smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    texts = stdlib_text(0.5)
    n = len(texts)
    blocks = tokenize_blocks(Dataset.from_dict({"text": texts, "first": [True] * n, "last": [True] * n}),
                             tokenizer, 256)
    hesso = dict(target_sparsity=0.3, pruning_layout="uniform", ffn_multiple=32)
    half_teacher = dict(hesso, distill=True, distill_teacher_dtype="bfloat16")
    # (name, bf16 autocast, pruning settings)
    configs = [("AdamW, plain Trainer (fp32)", False, None), ("HESSO (fp32)", False, hesso),
               ("HESSO + distillation (fp32)", False, dict(hesso, distill=True)),
               ("HESSO + distillation, bf16 teacher", False, half_teacher),
               ("HESSO + distillation, bf16 autocast and teacher (`bf16: auto` here)", True, half_teacher),
               ("AdamW, plain Trainer (bf16 autocast)", True, None)]
    from hf_oto.env import cpu_bf16_slowdown
    from hf_oto.job.memory import keep_freed_memory

    slowdown = cpu_bf16_slowdown()
    if slowdown > 1.5 and not a.bf16_anyway:  # a training step would take many times longer: say so instead
        configs = [(name, bf16, pruning) for name, bf16, pruning in configs
                   if not bf16 and (pruning or {}).get("distill_teacher_dtype") != "bfloat16"]
    kept_memory = keep_freed_memory()
    started = time.time()
    rows = [profile(name, folder, blocks, a.steps, bf16, pruning) for name, bf16, pruning in configs]
    lines = ["# Where a training step's time goes (SmolLM2-135M-Instruct, 4 x 256 tokens)", "",
             f"- command: `python scripts/profile_step.py --steps {a.steps}` ({time.strftime('%Y-%m-%d')}, "
             f"{(time.time() - started) / 60:.1f} min)",
             f"- machine: {_machine()}; mean over steps 3-{a.steps} of a run whose schedule is laid out for 100 "
             "steps (warm-up 5 steps, pruning phase steps 5-25)",
             "- student = the training step without the teacher's forward; optimizer = `optimizer.step()` "
             "(HESSO's includes its group accounting); other = clipping, scheduler, callbacks",
             "- optimizer is a mean over the steps measured, among them HESSO's period starts (each one ranks the "
             "groups and, with measured pricing, probes the loss of removing each kind); its median is a step "
             "between them",
             "- freed memory " + ("kept for reuse, as `hf-oto prune` does on CPU runs" if kept_memory else
                                  "returned to the system (glibc's default)"),
             f"- bf16: a bf16 matrix product takes {slowdown:.1f}x the fp32 time on this machine "
             f"(`hf_oto.env.cpu_bf16_slowdown`, also in `hf-oto env`)"
             + ("; the bf16 configurations are left out (`--bf16_anyway` runs them)" if slowdown > 1.5
                and not a.bf16_anyway else ""), "",
             "| configuration | s/step | " + " | ".join(PARTS) + " | optimizer median | x AdamW fp32 |",
             "|---" * (len(PARTS) + 4) + "|"]
    base = rows[0]["total"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['total']:.2f} | " + " | ".join(f"{r[k]:.2f}" for k in PARTS)
                     + f" | {r['optimizer_median']:.2f} | {r['total'] / base:.2f} |")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _machine() -> str:
    from benchmark import machine

    return machine()


if __name__ == "__main__":
    main()
