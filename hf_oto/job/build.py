"""Building what the job trains: the model config, the tokenizer, the model and its LoRA adapters."""

from __future__ import annotations

import torch

from hf_oto.errors import ConfigError, first_line
from hf_oto.job.args import ModelArguments


def model_config(margs: ModelArguments, tokenizer=None, vocab: int = 0):
    """The model's config: from its folder or Hub id, or built from ``init_config`` (sized to the tokenizer)."""
    from transformers import AutoConfig

    if margs.model_name_or_path:
        try:
            return AutoConfig.from_pretrained(margs.model_name_or_path)
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"could not load the config of {margs.model_name_or_path}: {first_line(exc)}") from None
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
        raise ConfigError(f"init_config: {first_line(exc)}") from None


def with_lora(model, margs: ModelArguments):
    """``model`` with LoRA adapters when ``lora_r`` is set (default targets: peft's ``all-linear``)."""
    if not margs.lora_r:
        return model
    from peft import LoraConfig, get_peft_model

    targets = margs.lora_target_modules or "all-linear"  # peft: every linear layer but the output head
    cfg = LoraConfig(r=margs.lora_r, lora_alpha=margs.lora_alpha, lora_dropout=margs.lora_dropout,
                     target_modules=targets, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, cfg)
    except ValueError as exc:
        raise ConfigError(f"LoRA: {first_line(exc)}") from None


def load_tokenizer(margs: ModelArguments):
    """The tokenizer of ``tokenizer_name`` or of the model; it must have an EOS token to end documents."""
    from transformers import AutoTokenizer

    name = margs.tokenizer_name or margs.model_name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"could not load the tokenizer of {name}: {first_line(exc)}") from None
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"the tokenizer of {name} has no eos token to end documents with")
    return tokenizer


def load_model(margs: ModelArguments, tokenizer):
    """The starting model: pretrained weights, or a new model from ``init_config``."""
    from transformers import AutoModelForCausalLM

    if not margs.model_name_or_path:
        return AutoModelForCausalLM.from_config(model_config(margs, tokenizer))
    kw = {"dtype": getattr(torch, margs.torch_dtype)} if margs.torch_dtype else {}
    try:
        return AutoModelForCausalLM.from_pretrained(margs.model_name_or_path, **kw)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"could not load {margs.model_name_or_path}: {first_line(exc)}") from None
