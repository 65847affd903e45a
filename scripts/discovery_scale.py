"""Discovery at frontier scale, on the meta device (no weights): time and peak memory.

    python scripts/discovery_scale.py [--out scripts/benchmark_results/discovery_scale.md]

Each config runs in its own interpreter, so the peak resident memory is that model's alone (it
includes the interpreter, torch and transformers: the "baseline" row measures those by themselves).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

# DeepSeek-V3 (671B): transformers' DeepseekV3Config defaults are that model. Kimi-K2 (1T): its published
# config.json, which is DeepSeek-V3's architecture with 64 heads, 384 routed experts and one dense layer.
CONFIGS: dict[str, dict] = {
    "baseline": {},
    "DeepSeek-V3-671B": {"model_type": "deepseek_v3"},
    "Kimi-K2-1T": {"model_type": "deepseek_v3", "num_attention_heads": 64, "num_key_value_heads": 64,
                   "n_routed_experts": 384, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
                   "vocab_size": 163840},
}

CHILD = r"""
import json, resource, sys, time
import torch
from transformers import AutoConfig, AutoModelForCausalLM
fields = json.loads(sys.argv[1])
out = {}
if fields:
    from hf_oto import discover_groups
    cfg = AutoConfig.for_model(fields.pop("model_type"), **fields)
    t = time.perf_counter()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    out["build_s"] = time.perf_counter() - t
    t = time.perf_counter()
    space = discover_groups(model)
    out["discover_s"] = time.perf_counter() - t
    out["params"] = space.total_params
    out["sets"] = len(space.sets)
    out["groups"] = len(space)
    out["prunable_params"] = space.prunable_params
    kinds = {}
    for s in space.sets:
        kinds.setdefault(s.kind, [0, 0])[0 if s.prunable else 1] += 1
    out["kinds"] = kinds
    from hf_oto.groups.experts import with_experts  # whole routed experts (prune_experts)
    t = time.perf_counter()
    experts = [s for s in with_experts(model, space).sets if s.kind == "expert"]
    out["experts_s"] = time.perf_counter() - t
    blocks = experts[0].info.blocks
    out["experts"] = (("prunable" + (f", one from each of {blocks} routing groups at a time" if blocks > 1 else ""))
                      if all(s.prunable for s in experts) else experts[0].reason)
out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="scripts/benchmark_results/discovery_scale.md")
    a = p.parse_args()
    rows = {}
    for name, fields in CONFIGS.items():
        t = time.perf_counter()
        res = subprocess.run([sys.executable, "-c", CHILD, json.dumps(fields)], capture_output=True, text=True)
        if res.returncode:
            print(res.stderr[-2000:], file=sys.stderr)
            return 1
        rows[name] = dict(json.loads(res.stdout.strip().splitlines()[-1]), wall_s=time.perf_counter() - t)
        print(name, rows[name], flush=True)
    base = rows.pop("baseline")["peak_rss_mb"]
    lines = [
        "# Discovery at frontier scale (meta device)", "",
        f"`python scripts/discovery_scale.py` on {platform.processor() or platform.machine()}, "
        f"{time.strftime('%Y-%m-%d')}. The model is built on the meta device (no weights); discovery traces a "
        "twin that holds one layer of each distinct structure and copies the groups to the other layers. "
        "Whole experts (`prune_experts`) are added after discovery, with the routing probe.", "",
        "| model | parameters | build (s) | discovery (s) | peak RSS (MB) | over interpreter + torch (MB) | "
        "sets | groups | prunable sets by kind | whole experts (s) | whole experts |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        kinds = ", ".join(f"{k} {v[0]}" + (f" (+{v[1]} not)" if v[1] else "") for k, v in sorted(r["kinds"].items()))
        lines.append(f"| {name} | {r['params'] / 1e9:.1f}B | {r['build_s']:.1f} | {r['discover_s']:.1f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] - base:.0f} | {r['sets']:,} | {r['groups']:,} | "
                     f"{kinds} | {r['experts_s']:.2f} | {r['experts']} |")
    lines += ["", f"Interpreter with torch and transformers imported: {base:.0f} MB.", ""]
    Path(a.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
