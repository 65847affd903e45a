"""The main job: fine-tune and prune a causal LM from a YAML config, export it, verify the export.

Used by ``hf-oto prune CONFIG.yaml [--key value ...]`` and ``scripts/prune_finetune.py``. Every
check that needs no data and no weights runs first (:func:`preflight`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from hf_oto.data import (
    Blocks,
    DataArguments,
    check_data_args,
    load_documents,
    split_blocks,
    tokenize_blocks,
    train_tokenizer,
)
from hf_oto.errors import ConfigError, ExportError
from hf_oto.export.verify import verify_export
from hf_oto.job_args import ModelArguments, parse
from hf_oto.preflight import check_model_folder, check_output_folders, local_or_hub, resolve_resume
from hf_oto.trainer import HFOTOTrainer, HFOTOTrainingArguments

__all__ = ["DataArguments", "ModelArguments", "evaluate_lm", "parse", "perplexity", "preflight", "run"]


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


# Settings and checks ---------------------------------------------------------------------------
def _config(margs: ModelArguments, tokenizer=None, vocab: int = 0):
    from transformers import AutoConfig

    if margs.model_name_or_path:
        try:
            return AutoConfig.from_pretrained(margs.model_name_or_path)
        except (OSError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"could not load the config of {margs.model_name_or_path}: {first}") from None
    cfg = dict(margs.init_config)
    if "model_type" not in cfg:
        raise ConfigError("init_config needs a model_type")
    if tokenizer is not None:
        cfg.update(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id)
    elif vocab:
        cfg["vocab_size"] = vocab
    try:
        return AutoConfig.for_model(**cfg)
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"init_config: {str(exc).strip().splitlines()[0]}") from None


def _with_lora(model, margs: ModelArguments):
    if not margs.lora_r:
        return model
    from peft import LoraConfig, get_peft_model

    targets = margs.lora_target_modules or ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"]
    cfg = LoraConfig(r=margs.lora_r, lora_alpha=margs.lora_alpha, lora_dropout=margs.lora_dropout,
                     target_modules=targets, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, cfg)
    except ValueError as exc:
        raise ConfigError(f"LoRA: {str(exc).strip().splitlines()[0]}") from None


def preflight(margs: ModelArguments, dargs: DataArguments, targs: HFOTOTrainingArguments) -> dict[str, Any]:
    """Every check that needs no data and no weights: sources, outputs, resume, and the pruning settings.

    The model is built on the meta device, so this costs seconds even for large models. Returns the
    source folder (None for Hub ids and init_config), the export folder and the checkpoint to resume.
    """
    from transformers import AutoModelForCausalLM

    from hf_oto.trainer.trainer import check_pruning_setup

    if not (margs.model_name_or_path or margs.init_config):
        raise ConfigError("set model_name_or_path or init_config")
    if margs.model_name_or_path and margs.init_config:
        raise ConfigError("set model_name_or_path or init_config, not both")
    if margs.torch_dtype and not isinstance(getattr(torch, margs.torch_dtype, None), torch.dtype):
        raise ConfigError(f"torch_dtype {margs.torch_dtype!r} is not a torch dtype (e.g. bfloat16, float32)")
    source = local_or_hub(margs.model_name_or_path, "model folder") if margs.model_name_or_path else None
    if source is not None:
        check_model_folder(source)
    if margs.tokenizer_name:
        local_or_hub(margs.tokenizer_name, "tokenizer folder")
    elif not dargs.train_tokenizer_vocab and not margs.model_name_or_path:
        raise ConfigError("a model built from init_config needs tokenizer_name or train_tokenizer_vocab")
    check_data_args(dargs)
    adapter_dir = f"{targs.pruned_dir()}-adapter" if margs.lora_r and not margs.merge_adapters else None
    pruned = check_output_folders(targs, source=source, adapter_dir=adapter_dir)
    resume = resolve_resume(targs)
    config = _config(margs, vocab=dargs.train_tokenizer_vocab or 64)
    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(config)
        except ValueError as exc:
            raise ConfigError(f"{config.model_type} has no causal-LM head in transformers: "
                              f"{str(exc).strip().splitlines()[0]}") from None
        model = _with_lora(model, margs)
    check_pruning_setup(model, targs)
    return {"source": source, "pruned": pruned, "resume": resume}


def _source_license(name: str | None) -> str | None:
    """The license on a Hub model's card (network only where the model itself came from the Hub)."""
    if not name or Path(name).exists():
        return None  # local folders: save_pruned reads their README itself
    try:
        from huggingface_hub import ModelCard

        return ModelCard.load(name).data.to_dict().get("license")
    except Exception:
        return None


def _load_tokenizer(margs: ModelArguments):
    from transformers import AutoTokenizer

    name = margs.tokenizer_name or margs.model_name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"could not load the tokenizer of {name}: {str(exc).strip().splitlines()[0]}") from None
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"the tokenizer of {name} has no eos token to end documents with")
    return tokenizer


def _load_model(margs: ModelArguments, tokenizer):
    from transformers import AutoModelForCausalLM

    if not margs.model_name_or_path:
        return AutoModelForCausalLM.from_config(_config(margs, tokenizer))
    kw = {"dtype": getattr(torch, margs.torch_dtype)} if margs.torch_dtype else {}
    try:
        return AutoModelForCausalLM.from_pretrained(margs.model_name_or_path, **kw)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"could not load {margs.model_name_or_path}: {str(exc).strip().splitlines()[0]}") from None


# The job ---------------------------------------------------------------------------------------
def run(config_path: str, overrides: list[str]) -> dict[str, Any]:
    """Parse, check, load data, train and prune, export, verify the export, print a summary."""
    from transformers import default_data_collator

    margs, dargs, targs = parse(config_path, overrides)
    checked = preflight(margs, dargs, targs)
    torch.manual_seed(targs.seed)
    tokenizer = None if dargs.train_tokenizer_vocab else _load_tokenizer(margs)
    docs = load_documents(dargs)
    if tokenizer is None:
        tokenizer = train_tokenizer(docs["text"], dargs.train_tokenizer_vocab)
    blocks = tokenize_blocks(docs, tokenizer, dargs.block_size, dargs.preprocessing_num_workers)
    train_blocks, eval_blocks = split_blocks(blocks, dargs, targs.seed)

    model = _with_lora(_load_model(margs, tokenizer), margs)
    ppl_before = perplexity(model, eval_blocks)
    trainer = HFOTOTrainer(model=model, args=targs, train_dataset=Blocks(train_blocks), processing_class=tokenizer,
                           data_collator=default_data_collator)  # equal-length blocks: no padding needed
    trainer.train(resume_from_checkpoint=checked["resume"])
    after = evaluate_lm(model, eval_blocks)
    ppl_after = after["perplexity"]
    space, hesso = trainer.pruning_space, trainer.hesso
    out = _save(trainer, checked["pruned"], margs, {"eval_perplexity": ppl_after,
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


def _save(trainer: HFOTOTrainer, target: Path, margs: ModelArguments, eval_results: dict[str, float]) -> Path:
    """Export; if the target filled up during training, write beside it rather than lose the trained model."""
    kw = dict(merge_adapters=margs.merge_adapters, license=_source_license(margs.model_name_or_path),
              eval_results=eval_results)
    try:
        return trainer.save_pruned_model(str(target), **kw)
    except ExportError as exc:
        if not (target.is_dir() and any(target.iterdir())):
            raise
        import time

        fallback = target.with_name(f"{target.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        print(f"hf-oto: warning: {exc}; writing the pruned model to {fallback} instead")
        return trainer.save_pruned_model(str(fallback), **kw)


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
