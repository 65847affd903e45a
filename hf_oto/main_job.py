"""The main job: fine-tune and prune a causal LM from a YAML config, export it, verify the export.

Used by ``hf-oto prune CONFIG.yaml [--key value ...]`` and ``scripts/prune_finetune.py``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import sysconfig
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from hf_oto.export.verify import NO_HF_OTO_PRELUDE
from hf_oto.trainer import HFOTOTrainer, HFOTOTrainingArguments


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "Hub id or local folder"})
    init_config: dict[str, Any] | None = field(
        default=None, metadata={"help": "build a new model from these config fields (model_type required)"}
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "tokenizer (default: the model's)"})


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset with a 'text' column"})
    dataset_config: str | None = None
    train_files: list[str] | None = field(default=None, metadata={"help": "local .txt/.json/.jsonl files"})
    text_source: str | None = field(
        default=None, metadata={"help": "'python-stdlib': the interpreter's own library sources (offline)"}
    )
    max_text_mb: float = field(default=4.0, metadata={"help": "cap on raw text read from text_source"})
    train_tokenizer_vocab: int = field(default=0, metadata={"help": "train a BPE tokenizer of this size"})
    block_size: int = 128
    eval_fraction: float = 0.05
    max_eval_blocks: int = 200


def parse(config_path: str, overrides: list[str]) -> tuple[ModelArguments, DataArguments, HFOTOTrainingArguments]:
    """YAML file plus ``--key value`` overrides -> the three argument dataclasses (errors up front)."""
    from transformers import HfArgumentParser

    path = Path(config_path)
    if not path.is_file():
        raise SystemExit(f"hf-oto: error: config file {config_path} not found")
    values = yaml.safe_load(path.read_text()) or {}
    it = iter(overrides)
    for token in it:
        if not token.startswith("--"):
            raise SystemExit(f"hf-oto: error: expected --key value, got {token!r}")
        key = token[2:].replace("-", "_")
        raw = next(it, None)
        if raw is None:
            raise SystemExit(f"hf-oto: error: {token} needs a value")
        values[key] = yaml.safe_load(raw)
    parser = HfArgumentParser((ModelArguments, DataArguments, HFOTOTrainingArguments))
    try:
        return parser.parse_dict(values, allow_extra_keys=False)
    except ValueError as exc:
        raise SystemExit(f"hf-oto: error: {exc}") from exc


# Data ------------------------------------------------------------------------------------------
def stdlib_text(max_mb: float) -> list[str]:
    """Python source files of the running interpreter's standard library, sorted, up to ``max_mb``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, size = [], 0
    for f in sorted(root.glob("*.py")):
        try:
            t = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(t)
        size += len(t)
        if size >= max_mb * 2**20:
            break
    return texts


def load_texts(d: DataArguments) -> list[str]:
    if d.text_source == "python-stdlib":
        return stdlib_text(d.max_text_mb)
    from datasets import load_dataset

    if d.train_files:
        ext = Path(d.train_files[0]).suffix.lstrip(".")
        ds = load_dataset("json" if ext in ("json", "jsonl") else "text", data_files=d.train_files, split="train")
    elif d.dataset_name:
        ds = load_dataset(d.dataset_name, d.dataset_config, split="train")
    else:
        raise SystemExit("hf-oto: error: give dataset_name, train_files or text_source")
    return [t for t in ds["text"] if t]


def train_tokenizer(texts: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def pack(texts: list[str], tokenizer, block: int) -> torch.Tensor:
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    n = len(ids) // block
    return torch.tensor(ids[: n * block]).view(n, block)


class Blocks(torch.utils.data.Dataset):
    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch: int = 8) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch):
        b = blocks[i:i + batch].to(next(model.parameters()).device)
        loss = model(input_ids=b, labels=b).loss
        total += float(loss) * len(b)
        count += len(b)
    return math.exp(total / max(count, 1))


VERIFY = NO_HF_OTO_PRELUDE + textwrap.dedent(
    """
    import math, torch
    from transformers import AutoModelForCausalLM
    from safetensors.torch import load_file
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=sys.argv[3] == "1").eval()
    blocks = load_file(sys.argv[2])["blocks"]
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(blocks), 8):
            b = blocks[i:i + 8]
            total += float(model(input_ids=b, labels=b).loss) * len(b)
    print(math.exp(total / len(blocks)), sum(p.numel() for p in model.parameters()))
    """
)


def verify_export(out: Path, blocks: torch.Tensor) -> tuple[float, int]:
    """Perplexity and size of the export, loaded by a Python process that cannot import hf_oto."""
    from safetensors.torch import save_file

    out = out.resolve()
    probe = out.parent / f".{out.name}.eval.safetensors"
    save_file({"blocks": blocks.contiguous()}, probe)
    try:
        remote = "auto_map" in json.loads((out / "config.json").read_text())
        res = subprocess.run([sys.executable, "-c", VERIFY, str(out), str(probe), "1" if remote else "0"],
                             capture_output=True, text=True, cwd=out.parent)
    finally:
        probe.unlink(missing_ok=True)
    if res.returncode != 0:
        raise RuntimeError(f"the export at {out} did not reload without hf_oto:\n{res.stderr[-3000:]}")
    ppl, n = res.stdout.strip().splitlines()[-1].split()
    return float(ppl), int(n)


# The job ---------------------------------------------------------------------------------------
def run(config_path: str, overrides: list[str]) -> dict[str, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    margs, dargs, targs = parse(config_path, overrides)
    if not (margs.model_name_or_path or margs.init_config):
        raise SystemExit("hf-oto: error: set model_name_or_path or init_config")
    torch.manual_seed(targs.seed)
    texts = load_texts(dargs)
    if dargs.train_tokenizer_vocab:
        tokenizer = train_tokenizer(texts, dargs.train_tokenizer_vocab)
    else:
        tokenizer = AutoTokenizer.from_pretrained(margs.tokenizer_name or margs.model_name_or_path)
        if tokenizer.eos_token_id is None:
            raise SystemExit("hf-oto: error: the tokenizer has no eos token to separate documents")
    blocks = pack(texts, tokenizer, dargs.block_size)
    gen = torch.Generator().manual_seed(targs.seed)
    blocks = blocks[torch.randperm(len(blocks), generator=gen)]
    n_eval = min(max(1, int(len(blocks) * dargs.eval_fraction)), dargs.max_eval_blocks)
    eval_blocks, train_blocks = blocks[:n_eval], blocks[n_eval:]

    if margs.model_name_or_path:
        model = AutoModelForCausalLM.from_pretrained(margs.model_name_or_path)
    else:
        cfg = dict(margs.init_config)
        cfg.update(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg))
    ppl_before = perplexity(model, eval_blocks)
    trainer = HFOTOTrainer(model=model, args=targs, train_dataset=Blocks(train_blocks), processing_class=tokenizer)
    trainer.train()
    ppl_after = perplexity(model, eval_blocks)
    space, hesso = trainer.pruning_space, trainer.hesso
    out = trainer.save_pruned_model(overwrite=True, eval_results={"eval_perplexity": ppl_after})
    if not trainer.is_world_process_zero():  # rank 0 writes, verifies and reports
        return {"output": str(out)}
    ppl_export, params_after = verify_export(out, eval_blocks)
    manifest = json.loads((out / "pruning_manifest.json").read_text())
    kept: dict[str, tuple[int, int]] = {}
    for s in manifest["sets"]:
        k, t = kept.get(s["kind"], (0, 0))
        kept[s["kind"]] = (k + len(s["kept"]), t + s["groups"])
    summary = {
        "output": str(out), "params_before": space.total_params, "params_after": params_after,
        "prunable_removed": hesso.metrics()["pruned_param_fraction"], "ppl_initial": ppl_before,
        "ppl_trained_pruned": ppl_after, "ppl_export_reloaded": ppl_export, "kept": kept,
        "train_tokens": int(trainer.state.global_step * targs.per_device_train_batch_size * dargs.block_size
                            * trainer.accelerator.num_processes * targs.gradient_accumulation_steps),
    }
    print_summary(summary)
    return summary


def print_summary(s: dict[str, Any]) -> None:
    rows = [
        ("parameters before", f"{s['params_before']:,}"),
        ("parameters after (export)", f"{s['params_after']:,} ({100 * s['params_after'] / s['params_before']:.1f}%)"),
        ("prunable parameters removed", f"{100 * s['prunable_removed']:.1f}%"),
        ("eval perplexity, initial model", f"{s['ppl_initial']:.2f}"),
        ("eval perplexity, trained + pruned", f"{s['ppl_trained_pruned']:.2f}"),
        ("eval perplexity, export reloaded without hf_oto", f"{s['ppl_export_reloaded']:.2f}"),
        ("training tokens", f"{s['train_tokens']:,}"),
    ]
    rows += [(f"kept {kind}", f"{k} / {t}") for kind, (k, t) in sorted(s["kept"].items())]
    rows.append(("pruned model", s["output"]))
    width = max(len(r[0]) for r in rows)
    print("\n" + "=" * (width + 40))
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print("=" * (width + 40))
