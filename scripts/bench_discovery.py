"""Group discovery time and memory on the meta device for Llama-2-7B, Llama-3-8B and 70B configs.

Run: .venv/bin/python scripts/bench_discovery.py [--sizes 7b 8b 70b]
Each size runs in a fresh subprocess so its peak resident memory is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

CONFIGS = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),  # Llama-2-7B (MHA)
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=128256),
}


def peak_rss_mb() -> float:
    """Peak resident memory of this process image (VmHWM; ru_maxrss would carry a parent's peak over exec)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(size: str) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_oto import discover_groups

    rss_start = peak_rss_mb()
    cfg = LlamaConfig(**CONFIGS[size], rope_theta=500000.0)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    t0 = time.perf_counter()
    space = discover_groups(model)
    seconds = time.perf_counter() - t0
    return {
        "size": size,
        "params": space.total_params,
        "groups": len(space),
        "seconds": round(seconds, 2),
        "peak_rss_mb": round(peak_rss_mb()),
        "rss_before_mb": round(rss_start),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", nargs="+", default=["7b", "8b", "70b"], choices=sorted(CONFIGS))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one)))
        return
    print(f"{'config':<8} {'params':>16} {'groups':>10} {'discovery s':>12} {'peak RSS MB':>12}")
    for size in args.sizes:
        out = subprocess.run([sys.executable, __file__, "--one", size], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{r['size']:<8} {r['params']:>16,} {r['groups']:>10,} {r['seconds']:>12} {r['peak_rss_mb']:>12,}")


if __name__ == "__main__":
    main()
