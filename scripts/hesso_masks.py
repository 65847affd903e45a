"""Do HESSO's masks cost more than one-shot Wanda-sp's before any training? (a diagnostic, no training)

Applies to the original SmolLM2-135M-Instruct (zeroed, not trained) the final masks that HESSO rows of
the real-model benchmark recorded (``pruned_groups`` in their ``results.json``: defaults with two
seeds, and with 25% replay), and masks of one-shot Wanda-sp at 30% computed as the benchmark does
(measured pricing, uniform layout, FFN multiple 32) from: the first 32 training blocks in document
order (what the benchmark's one-shot rows used until calibration was drawn at random); 32 and 100
blocks drawn at random (100: about what HESSO's ranking sees by its last period); the first 32 and 100
drawn at random from the training blocks with 25% of the model's own samples mixed in. Prints how much each pair of
masks overlaps and scores each masked model on the benchmark's three measures. So it separates what a
ranking chose from what training did afterwards, and the evidence from the model it is read on.
Needs the inputs of ``scripts/benchmark.py --reference smollm2`` (and its cached replay samples).

    python scripts/hesso_masks.py [OUT.json]   (default ./hesso_masks.json: never replaced)
"""
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
from benchmark import evaluate_model, load_data, oneshot_plan, parse_args, replay_blocks
from real_model import smollm2_folder
from transformers import AutoModelForCausalLM

from hf_oto import discover_groups
from hf_oto.data import calibration_batches
from hf_oto.groups.depth import with_granularity
from hf_oto.groups.space import zero_groups
from hf_oto.io import write_text_atomic
from hf_oto.replay import mix_replay

RESULTS = Path(__file__).resolve().parent / "benchmark_results" / "smollm2"
out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("hesso_masks.json")
if len(sys.argv) < 2 and out.exists():  # a named output is replaced (atomically); the default one never is
    sys.exit(f"hesso_masks.py: {out} exists; name the output file to replace it, or give another path")
a = parse_args(["--reference", "smollm2"])
a.model = str(smollm2_folder())
tok, train_blocks, eval_blocks = load_data(a)
base = AutoModelForCausalLM.from_pretrained(a.model).eval()
space = with_granularity(base, discover_groups(base), "width", "uniform")  # the HESSO rows' space


def oneshot_mask(calib: list[dict[str, torch.Tensor]]) -> set[int]:
    plan = oneshot_plan(copy.deepcopy(base), space, "wanda_sp", calib, 0.3, a)  # uniform, multiple 32, measured
    return set(torch.nonzero(plan.mask()).flatten().tolist())


def drawn(blocks: torch.Tensor, batches: int) -> list[dict[str, torch.Tensor]]:
    return calibration_batches(blocks, batches, a.batch, seed=0)  # at random, as the benchmark's seed-0 rows


def hesso_mask(folder: str, seed: int = 0) -> set[int]:
    rows = json.loads((RESULTS / folder / "results.json").read_text())["rows"]
    r = next(r for r in rows if r["method"] == "hesso_kd" and r["seed"] == seed and r["sparsity"] == 0.3)
    return set(r["pruned_groups"])


masks = {"hesso_seed0": hesso_mask("criterion_wanda_sp", 0), "hesso_seed1": hesso_mask("criterion_wanda_sp", 1),
         "hesso_replay": hesso_mask("replay")}
t = time.time()
first = calibration_batches(train_blocks, 8, a.batch)
masks["oneshot_first32"] = oneshot_mask(first)
masks["oneshot_random32"] = oneshot_mask(drawn(train_blocks, 8))
masks["oneshot_random100"] = oneshot_mask(drawn(train_blocks, 25))
a.replay = 0.25
mixed = mix_replay(train_blocks, replay_blocks(a, Path(a.model), tok), 0.25)
masks["oneshot_replay_first32"] = oneshot_mask(calibration_batches(mixed, 8, a.batch))
masks["oneshot_replay_random100"] = oneshot_mask(drawn(mixed, 25))
print(f"one-shot masks in {time.time() - t:.0f} s", flush=True)
names = list(masks)
overlap = {x: {y: round(len(masks[x] & masks[y]) / len(masks[x]), 3) for y in names} for x in names}
print("overlap (share of the row's removed groups the column removes too)")
for x in names:
    print(f"{x:>15} " + " ".join(f"{overlap[x][y]:.2f}" for y in names), flush=True)
results = {}
for n in names:
    m = copy.deepcopy(base)
    zero_groups(m, space, [space[i].name for i in sorted(masks[n])])
    results[n] = evaluate_model(m, eval_blocks, a)
    print("RESULT", n, json.dumps(results[n]), flush=True)
summary = {"results": results, "overlap": overlap, "removed_groups": len(masks[names[0]])}
write_text_atomic(out, json.dumps(summary, indent=1))
print(f"written: {out}")
