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
    torch_dtype: str | None = field(default=None, metadata={"help": "load dtype, e.g. bfloat16 (GPU configs)"})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 trains the full model"})
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "LoRA targets (default: every attention and FFN projection)"}
    )
    merge_adapters: bool = field(
        default=True, metadata={"help": "LoRA export: one merged model, or pruned base + pruned adapter folder"}
    )


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
    else:
        ds = load_dataset(d.dataset_name, d.dataset_config, split="train")
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
def evaluate_lm(model, blocks: torch.Tensor, batch: int = 8) -> dict[str, float]:
    """Held-out perplexity and next-token top-1 accuracy."""
    model.eval()
    total, count, correct, tokens = 0.0, 0, 0, 0
    for i in range(0, len(blocks), batch):
        b = blocks[i:i + batch].to(next(model.parameters()).device)
        out = model(input_ids=b, labels=b)
        total += float(out.loss) * len(b)
        count += len(b)
        correct += int((out.logits[:, :-1].argmax(-1) == b[:, 1:]).sum())
        tokens += b[:, 1:].numel()
    return {"perplexity": math.exp(total / max(count, 1)), "token_accuracy": correct / max(tokens, 1)}


def perplexity(model, blocks: torch.Tensor, batch: int = 8) -> float:
    """Held-out perplexity of ``model`` on packed ``blocks``."""
    return evaluate_lm(model, blocks, batch)["perplexity"]


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
def _config(margs: ModelArguments, tokenizer=None, vocab: int = 0):
    from transformers import AutoConfig

    if margs.model_name_or_path:
        return AutoConfig.from_pretrained(margs.model_name_or_path)
    cfg = dict(margs.init_config)
    if "model_type" not in cfg:
        raise SystemExit("hf-oto: error: init_config needs a model_type")
    if tokenizer is not None:
        cfg.update(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id)
    elif vocab:
        cfg["vocab_size"] = vocab
    return AutoConfig.for_model(**cfg)


def _with_lora(model, margs: ModelArguments):
    if not margs.lora_r:
        return model
    from peft import LoraConfig, get_peft_model

    targets = margs.lora_target_modules or ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"]
    cfg = LoraConfig(r=margs.lora_r, lora_alpha=margs.lora_alpha, lora_dropout=margs.lora_dropout,
                     target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def preflight(margs: ModelArguments, dargs: DataArguments, targs: HFOTOTrainingArguments) -> None:
    """Check model, LoRA and pruning settings on a meta-device copy, before any data work or download."""
    from transformers import AutoModelForCausalLM

    from hf_oto.trainer.trainer import check_pruning_setup

    if not (margs.model_name_or_path or margs.init_config):
        raise SystemExit("hf-oto: error: set model_name_or_path or init_config")
    if not (dargs.text_source or dargs.train_files or dargs.dataset_name):
        raise SystemExit("hf-oto: error: give dataset_name, train_files or text_source")
    if dargs.text_source not in (None, "python-stdlib"):
        raise SystemExit(f"hf-oto: error: unknown text_source {dargs.text_source!r} (known: python-stdlib)")
    for f in dargs.train_files or []:
        if not Path(f).is_file():
            raise SystemExit(f"hf-oto: error: train file {f} not found")
    config = _config(margs, vocab=dargs.train_tokenizer_vocab or 64)
    with torch.device("meta"):
        model = _with_lora(AutoModelForCausalLM.from_config(config), margs)
    try:
        check_pruning_setup(model, targs)
    except ValueError as exc:
        raise SystemExit(f"hf-oto: error: {exc}") from exc


def _source_license(name: str | None) -> str | None:
    """The license on a Hub model's card (network only where the model itself came from the Hub)."""
    if not name or Path(name).exists():
        return None  # local folders: save_pruned reads their README itself
    try:
        from huggingface_hub import ModelCard

        return ModelCard.load(name).data.to_dict().get("license")
    except Exception:
        return None


def run(config_path: str, overrides: list[str]) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    margs, dargs, targs = parse(config_path, overrides)
    preflight(margs, dargs, targs)
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
        kw = {"dtype": getattr(torch, margs.torch_dtype)} if margs.torch_dtype else {}
        model = AutoModelForCausalLM.from_pretrained(margs.model_name_or_path, **kw)
    else:
        model = AutoModelForCausalLM.from_config(_config(margs, tokenizer))
    model = _with_lora(model, margs)
    ppl_before = perplexity(model, eval_blocks)
    trainer = HFOTOTrainer(model=model, args=targs, train_dataset=Blocks(train_blocks), processing_class=tokenizer)
    trainer.train()
    after = evaluate_lm(model, eval_blocks)
    ppl_after = after["perplexity"]
    space, hesso = trainer.pruning_space, trainer.hesso
    out = trainer.save_pruned_model(overwrite=True, merge_adapters=margs.merge_adapters,
                                    license=_source_license(margs.model_name_or_path),
                                    eval_results={"eval_perplexity": ppl_after,
                                                  "eval_token_accuracy": after["token_accuracy"]})
    if not trainer.is_world_process_zero():  # rank 0 writes, verifies and reports
        return {"output": str(out)}
    if not margs.merge_adapters and margs.lora_r:
        print(f"pruned base: {out}; pruned adapter: {out}-adapter (load with PeftModel.from_pretrained)")
    manifest = json.loads((out / "pruning_manifest.json").read_text())
    if margs.merge_adapters or not margs.lora_r:
        ppl_export, params_after = verify_export(out, eval_blocks)
    else:  # the base alone is not the trained model: nothing to compare its perplexity with
        ppl_export, params_after = float("nan"), manifest["params_after"]
    kept: dict[str, tuple[int, int]] = {}
    for s in manifest["sets"]:
        k, t = kept.get(s["kind"], (0, 0))
        kept[s["kind"]] = (k + len(s["kept"]), t + s["groups"])
    summary = {
        "output": str(out), "params_before": space.total_params, "params_after": params_after,
        "prunable_removed": hesso.metrics()["pruned_param_fraction"], "ppl_initial": ppl_before,
        "ppl_trained_pruned": ppl_after, "ppl_export_reloaded": ppl_export, "kept": kept,
        "token_accuracy": after["token_accuracy"],
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
        ("eval next-token accuracy, trained + pruned", f"{100 * s['token_accuracy']:.1f}%"),
        ("training tokens", f"{s['train_tokens']:,}"),
    ]
    rows += [(f"kept {kind}", f"{k} / {t}") for kind, (k, t) in sorted(s["kept"].items())]
    rows.append(("pruned model", s["output"]))
    width = max(len(r[0]) for r in rows)
    print("\n" + "=" * (width + 40))
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print("=" * (width + 40))
