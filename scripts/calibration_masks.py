"""Does the calibration text decide what a pruning mask costs out of domain? (a diagnostic, no training)

SmolLM2-135M-Instruct, one-shot Wanda-sp at 30% (the benchmark's uniform layout, FFN multiple 32,
measured pricing), calibrated on 32 blocks of 256 tokens of: the stdlib training text; text the
model samples itself from its start token (top-p 0.95); half of each; and, as a bound only, the
out-of-domain evaluation text itself. Each mask is applied to the original model and scored on the
benchmark's three measures. Needs the SmolLM2 inputs of ``scripts/benchmark.py --reference smollm2``.

    python scripts/calibration_masks.py [OUT.json]   (default ./calibration_masks.json: never replaced)
"""
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
from benchmark import evaluate_model, load_data, oneshot_plan, parse_args
from real_model import smollm2_folder
from transformers import AutoModelForCausalLM

from hf_oto import discover_groups
from hf_oto.data import calibration_batches
from hf_oto.groups.depth import with_granularity
from hf_oto.io import write_text_atomic

out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("calibration_masks.json")
if len(sys.argv) < 2 and out.exists():  # a named output is replaced (atomically); the default one never is
    sys.exit(f"calibration_masks.py: {out} exists; name the output file to replace it, or give another path")
a = parse_args(["--reference", "smollm2"])
a.model = str(smollm2_folder())
tok, train_blocks, eval_blocks = load_data(a)
print("model", a.model, "batch", a.batch, "calib", a.calib_batches, flush=True)
n = a.batch * a.calib_batches
code = train_blocks[:n]

def generate(model, n, length, seed):
    torch.manual_seed(seed)
    out = []
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    for _i in range(0, n, 8):
        start = torch.full((8, 1), bos)
        with torch.no_grad():
            g = model.generate(start, attention_mask=torch.ones_like(start), do_sample=True, top_p=0.95,
                               temperature=1.0, max_new_tokens=length - 1, min_new_tokens=length - 1,
                               pad_token_id=tok.eos_token_id)
        out.append(g[:, :length])
    return torch.cat(out)[:n]

base = AutoModelForCausalLM.from_pretrained(a.model).eval()
t = time.time()
gen = generate(base, n, a.block, 0)
print(f"generated {tuple(gen.shape)} in {time.time()-t:.0f}s", flush=True)
for i in range(3):
    print("SAMPLE", repr(tok.decode(gen[i][:80])), flush=True)
ood = a.extra["ood_blocks"]
sets = {"code": code, "generated": gen, "half_half": torch.cat([code[: n // 2], gen[: n // 2]]),
        "oracle_ood(diagnostic)": ood[:n]}
res = {}
for name, blocks in sets.items():
    model = AutoModelForCausalLM.from_pretrained(a.model)
    space = with_granularity(model, discover_groups(model), "width", "uniform")
    oneshot_plan(model, space, "wanda_sp", calibration_batches(blocks, len(blocks) // a.batch, a.batch), 0.3, a)
    r = evaluate_model(model, eval_blocks, a)
    res[name] = r
    print("RESULT", name, json.dumps(r), flush=True)
write_text_atomic(out, json.dumps(res, indent=1))
print(f"written: {out}")
