"""HESSO's optimizer step time and memory over plain AdamW, measured in one run on CPU.

Run: .venv/bin/python scripts/bench_optimizer.py [--steps 60] [--periods 3]
Model: a ~50M-parameter Llama config (GQA). Two copies get the same forward/backward; their
``optimizer.step()`` calls alternate (AdamW, HESSO, AdamW, ...) so machine drift hits both alike, and
only ``step()`` is timed. Ratios are medians of the per-step ratios of neighbouring steps, which
resists the bursts of a shared machine better than a ratio of medians.

The AdamW copy mirrors HESSO's zeros: whenever HESSO prunes groups, the same slices of the copy and
of its moments are zeroed. That matters on CPU: ``sqrt`` of exact zeros takes a slow path there
(~5x per element), so AdamW itself slows down on any model with many zero moments, pruned or not;
the mirror keeps that out of HESSO's ratio.

Pruning-phase steps are of two kinds:
- steady: inside a period, where HESSO only scales the redundant groups (the common case);
- boundary: a period start (saliency and planning, plus one copy of the prunable weights for the
  update direction), a period end (exact zeros for the newly pruned groups and their moments) and
  the few steps after it that verify pruned gradients are zero.
The amortized ratio over the whole phase depends on the period length; real runs have periods of
tens to hundreds of steps. "In situ" ratios time HESSO's own base AdamW step inside the same
``step()`` call: HESSO's extra work, free of the noise between two models.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_oto import discover_groups
from hf_oto.groups.space import PruningSpace
from hf_oto.optim import HESSO, HESSOConfig, slices


def build(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=16000, hidden_size=512, intermediate_size=1536, num_hidden_layers=10,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=64)
    return LlamaForCausalLM(cfg)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    for st in opt.state.values():
        total += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v))
    return total


def hesso_extra_bytes(opt: HESSO) -> int:
    """Memory HESSO holds beyond its base optimizer: per-group vectors and cached slice indices."""
    total = opt.pruned.numel() + opt.redundant.numel()
    evidence = opt.criterion.state()  # the criterion's per-group vector (EMA or accumulated terms)
    if evidence is not None:
        total += evidence.numel() * 4
    for cache in (opt._zero_index, opt._redundant_index):
        for tgt in cache or ():
            total += sum(t.numel() * t.element_size() for t in (tgt.index, tgt.mask) if t is not None)
    return total


class _BaseTimer:
    """Wraps ``opt.base.step`` to time the base AdamW step inside HESSO's own ``step()``."""

    def __init__(self, opt: HESSO):
        self.inner, self.last = opt.base.step, 0.0
        opt.base.step = self

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = self.inner(*args, **kwargs)
        self.last = time.perf_counter() - t0
        return out


@torch.no_grad()
def mirror_zeros(model: torch.nn.Module, opt: torch.optim.Optimizer, space: PruningSpace,
                 groups: torch.Tensor) -> None:
    """Zero the slices of ``groups`` (a bool vector over the space) in ``model`` and in ``opt``'s moments."""
    params = dict(model.named_parameters())
    for tgt in slices.build_targets(space, groups, params, {}):
        p = params[tgt.name]
        for t in [p.data, *slices.moments(opt.state, p)]:
            slices.zero_(slices.view(t, tgt), tgt)


def _timed_step(model, opt, ids) -> float:
    opt.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    t0 = time.perf_counter()
    opt.step()
    return time.perf_counter() - t0


def measure(steps: int = 60, periods: int = 3, sparsity: float = 0.5) -> dict[str, Any]:
    """A warm-up phase and a pruning phase of ``steps`` steps each; ratios HESSO / AdamW."""
    ids = torch.randint(0, 16000, (2, 64), generator=torch.Generator().manual_seed(0))
    m_a, m_h = build(), build()
    adamw = torch.optim.AdamW(m_a.parameters(), lr=1e-4)
    space = discover_groups(m_h)
    config = HESSOConfig(target_sparsity=sparsity, layout="global", start_pruning_step=steps, pruning_steps=steps,
                         pruning_periods=periods)
    opt = HESSO(m_h, space, torch.optim.AdamW, config, base_kwargs={"lr": 1e-4})
    base = _BaseTimer(opt)
    rows = []  # (phase, steady, adamw s, hesso s, hesso's base step s)
    for i in range(2 * steps):
        pos = opt._position(opt.step_count)
        steady = pos is not None and 0 < pos[1] < opt.period_length - 1 and (
            not bool(opt.pruned.any()) or opt._clean_steps >= opt._CHECK_STEPS)
        ta = _timed_step(m_a, adamw, ids)
        pruned_before = opt.pruned.clone()
        th = _timed_step(m_h, opt, ids)
        if not torch.equal(opt.pruned, pruned_before):
            mirror_zeros(m_a, adamw, space, opt.pruned & ~pruned_before)
        rows.append(("warm" if i < steps else "prune", steady, ta, th, base.last))

    def med(values) -> float:
        values = list(values)
        return statistics.median(values) if values else float("nan")

    warm = rows[steps // 3:steps]  # the first steps warm up allocator and caches
    prune = [r for r in rows if r[0] == "prune"]
    steady = [r for r in prune if r[1]]
    return {
        "params": sum(p.numel() for p in m_h.parameters()), "groups": len(space), "steps": steps,
        "periods": periods, "period_length": opt.period_length, "threads": torch.get_num_threads(),
        "adamw_ms": med(r[2] for r in warm + prune) * 1e3,
        "warmup_ratio": med(r[3] / r[2] for r in warm),
        "steady_ratio": med(r[3] / r[2] for r in steady), "steady_steps": len(steady),
        "phase_ratio": sum(r[3] for r in prune) / sum(r[2] for r in prune),
        "steady_in_situ": med(r[3] / r[4] for r in steady),
        "phase_in_situ": sum(r[3] for r in prune) / sum(r[4] for r in prune),
        "warmup_in_situ": med(r[3] / r[4] for r in warm),
        "state_mib": state_bytes(adamw) / 2**20, "extra_mib": hesso_extra_bytes(opt) / 2**20,
        "pruned_fraction": opt.metrics()["pruned_param_fraction"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="steps per phase (warm-up, pruning)")
    parser.add_argument("--periods", type=int, default=3, help="pruning periods in the pruning phase")
    args = parser.parse_args()
    r = measure(args.steps, args.periods)
    print(f"model: {r['params'] / 1e6:.1f}M parameters, {r['groups']:,} groups; {r['steps']} steps per phase, "
          f"{r['periods']} periods of {r['period_length']} steps, {r['threads']} threads")
    print(f"AdamW step (median): {r['adamw_ms']:.1f} ms")
    print("HESSO step time / AdamW step time       vs AdamW on a copy   in situ (own base step)")
    print(f"  warm-up                                  {r['warmup_ratio']:6.3f}            {r['warmup_in_situ']:6.3f}")
    print(f"  pruning, steady steps ({r['steady_steps']:>2})              {r['steady_ratio']:6.3f}            "
          f"{r['steady_in_situ']:6.3f}")
    print(f"  pruning phase, amortized (all steps)     {r['phase_ratio']:6.3f}            {r['phase_in_situ']:6.3f}")
    print(f"optimizer state: AdamW {r['state_mib']:.1f} MiB; HESSO extra {r['extra_mib']:.2f} MiB "
          f"(ratio {(r['state_mib'] + r['extra_mib']) / r['state_mib']:.4f}); transient at period starts: "
          "one copy of the prunable parameters")
    print(f"pruned fraction after the run: {r['pruned_fraction']:.3f}")


if __name__ == "__main__":
    main()
