"""HESSO's optimizer step time and memory over plain AdamW, measured in one run on CPU.

Run: .venv/bin/python scripts/bench_optimizer.py [--steps 30]
Model: a ~50M-parameter Llama config (GQA). Both optimizers run the same forward/backward,
alternating step by step so machine drift hits both alike; only ``optimizer.step()`` is timed.
Prints ratios (HESSO / AdamW) for warm-up steps and pruning steps.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_oto import discover_groups
from hf_oto.optim import HESSO


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
    """Memory HESSO holds beyond its base optimizer: per-group vectors and cached indices."""
    total = opt.pruned.numel() + opt.redundant.numel()
    if opt.ema is not None:
        total += opt.ema.numel() * 4
    for cache in (opt._zero_index, opt._redundant_index):
        for idx in (cache or {}).values():
            total += idx.numel() * idx.element_size()
    return total


def one_step(model, opt, ids) -> float:
    opt.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    t0 = time.perf_counter()
    opt.step()
    return time.perf_counter() - t0


def interleaved(pairs, ids, steps: int) -> tuple[list[float], list[float]]:
    """Alternate AdamW and HESSO steps so that machine drift affects both alike."""
    (m_a, o_a), (m_h, o_h) = pairs
    ta, th = [], []
    for _ in range(steps):
        ta.append(one_step(m_a, o_a, ids))
        th.append(one_step(m_h, o_h, ids))
    return ta, th


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30, help="steps per phase")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    ids = torch.randint(0, 16000, (2, 64), generator=torch.Generator().manual_seed(0))

    base_model = build()
    adamw = torch.optim.AdamW(base_model.parameters(), lr=1e-4)
    model = build()
    space = discover_groups(model)
    opt = HESSO(model, space, base_kwargs={"lr": 1e-4}, target_sparsity=0.5, start_pruning_step=args.steps,
                pruning_steps=args.steps, pruning_periods=3)
    pairs = ((base_model, adamw), (model, opt))
    adam_warm, warm = interleaved(pairs, ids, args.steps)
    adam_prune, prune = interleaved(pairs, ids, args.steps)

    n = sum(p.numel() for p in model.parameters())
    med = statistics.median
    a = med(adam_warm[args.steps // 3:] + adam_prune)
    print(f"model: {n / 1e6:.1f}M parameters, {len(space):,} groups; {args.steps} steps per phase, "
          f"{torch.get_num_threads()} threads")
    print(f"AdamW step (median):            {a * 1e3:8.1f} ms")
    w = med(warm[args.steps // 3:])
    print(f"HESSO warm-up step (median):    {w * 1e3:8.1f} ms   ratio {w / med(adam_warm[args.steps // 3:]):.2f}")
    print(f"HESSO pruning step (median):    {med(prune) * 1e3:8.1f} ms   ratio {med(prune) / med(adam_prune):.2f}")
    print(f"HESSO pruning step (mean, incl. period starts): {statistics.mean(prune) * 1e3:8.1f} ms   "
          f"ratio {statistics.mean(prune) / statistics.mean(adam_prune):.2f}")
    base_state = state_bytes(adamw)
    extra = hesso_extra_bytes(opt)
    print(f"optimizer state: AdamW {base_state / 2**20:.1f} MiB; HESSO extra {extra / 2**20:.2f} MiB "
          f"(ratio {(base_state + extra) / base_state:.3f}); transient at period starts: one copy of "
          f"the prunable parameters")
    print(f"pruned fraction after the run: {opt.metrics()['pruned_param_fraction']:.3f}")


if __name__ == "__main__":
    main()
