"""The held-out architecture zoo: causal LMs the tests do not cover, run through discovery and the round trip.

Run: .venv/bin/python scripts/arch_zoo.py [--archs starcoder2 granite ...] [--out FILE.md]

For each model type: build a tiny random model from its config (no download), discover its groups,
zero half of the groups of every prunable set, construct the uniform sub-network and compare its
logits with the zeroed model's (fp32, the bar is 1e-5). Run it after moving the transformers lock:
a row that changes says which architecture the new version changed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
ZOO = {
    "starcoder2": dict(num_key_value_heads=2),
    "stablelm": dict(num_key_value_heads=2),
    "granite": dict(num_key_value_heads=2),
    "cohere": dict(num_key_value_heads=2),
    "glm": dict(num_key_value_heads=2, head_dim=8),
    "glm4": dict(num_key_value_heads=2, head_dim=8),
    "phi": dict(),
    "gptj": dict(n_embd=32, n_layer=2, n_head=4, rotary_dim=4),
    "bloom": dict(n_layer=2, n_head=4),
    "codegen": dict(n_embd=32, n_layer=2, n_head=4, rotary_dim=4),
    "gpt_bigcode": dict(n_embd=32, n_layer=2, n_head=4, n_inner=48),
    "persimmon": dict(),
    "olmo": dict(num_key_value_heads=2),
    "olmo3": dict(num_key_value_heads=2),
    "smollm3": dict(num_key_value_heads=2),
    "exaone4": dict(num_key_value_heads=2, head_dim=8),
    "seed_oss": dict(num_key_value_heads=2, head_dim=8),
    "ernie4_5": dict(num_key_value_heads=2, head_dim=8),
    "hunyuan_v1_dense": dict(num_key_value_heads=2, head_dim=8),
    "gemma3_text": dict(num_key_value_heads=2, head_dim=8),
    "qwen3_moe": dict(num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=16),
    "granitemoe": dict(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
    "deepseek_v3": dict(num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=4,
                        qk_nope_head_dim=4, v_head_dim=8, n_group=1, topk_group=1),
}


def run_one(arch: str) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from hf_oto import construct_subnet, discover_groups, zero_groups

    kw = dict(COMMON)
    kw.update(ZOO[arch])
    row: dict = {"arch": arch}
    try:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **kw)).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        t0 = time.perf_counter()
        space = discover_groups(model)
        row["discovery_s"] = round(time.perf_counter() - t0, 2)
    except Exception as exc:  # the zoo reports every failure as a row
        row["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
        return row
    prunable = sorted({s.kind for s in space.sets if s.prunable})
    refused = sorted({f"{s.kind}: {s.reason}" for s in space.sets if not s.prunable})
    row["prunable"] = ", ".join(prunable) or "-"
    row["not prunable"] = "; ".join(r[:140] for r in refused) or "-"
    names = []
    for k, gs in enumerate(space.sets):
        if gs.prunable:
            off = space.set_offset(k)
            names += [space[off + j].name for j in range(0, gs.count, 2)]
    if not names:
        return row
    try:
        zero_groups(model, space, names)
        small = construct_subnet(model, space, layout="uniform").model
        ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            diff = (model(input_ids=ids).logits - small(input_ids=ids).logits).abs().max().item()
        row["max_diff"] = f"{diff:.1e}"
        before, after = (sum(p.numel() for p in m.parameters()) for m in (model, small))
        row["params"] = f"{before:,} -> {after:,}"
        row["ok"] = diff <= 1e-5
    except Exception as exc:
        row["error"] = f"round trip: {type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="*", default=list(ZOO), choices=list(ZOO))
    parser.add_argument("--out", help="also write the table to this Markdown file")
    args = parser.parse_args()
    import torch
    import transformers

    rows = [run_one(a) for a in args.archs]
    lines = [f"transformers {transformers.__version__}, torch {torch.__version__}: "
             "`.venv/bin/python scripts/arch_zoo.py`", "",
             "| arch | prunable | not prunable (reason) | zeroed vs removed, max abs diff | parameters |",
             "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r and "prunable" not in r:
            lines.append(f"| {r['arch']} | error | {r['error']} | - | - |")
            continue
        diff = r.get("max_diff", "-") + ("" if r.get("ok", True) else " **FAIL**")
        if "error" in r:
            diff = f"**{r['error']}**"
        lines.append(f"| {r['arch']} | {r['prunable']} | {r['not prunable']} | {diff} | {r.get('params', '-')} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    bad = [r["arch"] for r in rows if r.get("ok") is False or ("error" in r and "prunable" in r)]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
