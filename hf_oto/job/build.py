"""Building what the job trains: the model config, the tokenizer, the model, its LoRA adapters and the
replayed samples."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from hf_oto.errors import ConfigError, first_line
from hf_oto.job.args import ModelArguments
from hf_oto.job.log import log
from hf_oto.manifest import GGUFRecord

if TYPE_CHECKING:
    from hf_oto.data import DataArguments
from hf_oto.job.gguf_source import GGUFSource, plain_model, resolve_gguf


def model_config(margs: ModelArguments, tokenizer=None, vocab: int = 0):
    """The model's config: from its folder or Hub id, or built from ``init_config`` (sized to the tokenizer)."""
    from transformers import AutoConfig

    if margs.gguf_file:
        src = gguf_source(margs)
        try:
            return AutoConfig.from_pretrained(src.folder, gguf_file=src.name)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise ConfigError(f"could not read the config in {src.path}: {first_line(exc)}") from None
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
    kw = {}
    if margs.gguf_file and not margs.tokenizer_name:  # the GGUF file carries its tokenizer
        src = gguf_source(margs)
        name, kw = str(src.folder), {"gguf_file": src.name}
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **kw)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"could not load the tokenizer of {name}: {first_line(exc)}") from None
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"the tokenizer of {name} has no eos token to end documents with")
    return tokenizer


def load_model(margs: ModelArguments, tokenizer):
    """The starting model: pretrained weights, or a new model from ``init_config``."""
    from transformers import AutoModelForCausalLM

    kw = {"dtype": getattr(torch, margs.torch_dtype)} if margs.torch_dtype else {}
    if margs.gguf_file:
        src = gguf_source(margs)
        kw = kw or {"dtype": torch.float32}  # dequantized on load; float32 unless torch_dtype says otherwise
        try:
            model = AutoModelForCausalLM.from_pretrained(src.folder, gguf_file=src.name, **kw)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ConfigError(f"could not load {src.path}: {first_line(exc)}") from None
        model.config._name_or_path = str(src.path)
        return plain_model(model)
    if not margs.model_name_or_path:
        return AutoModelForCausalLM.from_config(model_config(margs, tokenizer))
    try:
        return AutoModelForCausalLM.from_pretrained(margs.model_name_or_path, **kw)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"could not load {margs.model_name_or_path}: {first_line(exc)}") from None


def gguf_source(margs: ModelArguments) -> GGUFSource:
    """The resolved ``gguf_file`` (one-line error when it is not found)."""
    return resolve_gguf(margs.gguf_file, margs.model_name_or_path)


@dataclass(frozen=True)
class Provenance:
    """Where the model and data came from, for the export's card and manifest: the source (Hub id or
    folder), its license, the Hub datasets trained on, the GGUF file it was read from, and the share of
    the data that the model sampled itself (``replay_fraction``; None: none)."""

    source: str | None
    license: str | None = None
    datasets: tuple[str, ...] | None = None
    gguf: GGUFRecord | None = None
    replay_fraction: float | None = None

    def manifest_fields(self) -> dict[str, object]:
        """The manifest fields it fills beside ``source`` and ``license``, where known."""
        fields = (("datasets", self.datasets), ("gguf", self.gguf), ("replay_fraction", self.replay_fraction))
        return {k: v for k, v in fields if v is not None}

    def to_dict(self) -> dict[str, object]:
        """The JSON form (unknown fields left out), as a QFA run records it."""
        out = {"source": self.source, "license": self.license,
               "datasets": None if self.datasets is None else list(self.datasets),
               "gguf": None if self.gguf is None else self.gguf.to_dict(), "replay_fraction": self.replay_fraction}
        return {k: v for k, v in out.items() if v is not None}


def provenance(margs: ModelArguments, dargs: DataArguments) -> Provenance:
    """Where the model and data came from: source, license, Hub datasets, GGUF file."""
    from hf_oto.export.save import is_hub_id, source_license

    name = margs.model_name_or_path
    license = source_license(name, allow_network=bool(name) and not Path(name).exists())
    datasets = (dargs.dataset_name,) if dargs.dataset_name and is_hub_id(dargs.dataset_name) else None
    gguf = None
    if margs.gguf_file:  # the card names the GGUF file, and its license comes from the file's header
        meta = gguf_source(margs).metadata()
        license = license or meta.get("license")
        gguf = GGUFRecord.from_dict(dict(meta, file=margs.gguf_file))
    return Provenance(source=name, license=license, datasets=datasets, gguf=gguf,
                      replay_fraction=dargs.replay_fraction or None)


def with_replay(train_blocks: torch.Tensor, model, tokenizer, dargs: DataArguments, seed: int, draws: int | None,
                progress: bool = True, device: torch.device | None = None) -> torch.Tensor:
    """``train_blocks`` with the model's own samples mixed in at ``dargs.replay_fraction`` of the draws
    (``draws``: how many training sequences the run reads, None if unknown; see :mod:`hf_oto.replay`).
    With ``device`` the model is moved there first (where the Trainer would put it): sampling an LLM on
    the CPU while a GPU waits would take hours."""
    from hf_oto.replay import generate_replay, mix_replay, replay_samples, start_token

    start = start_token(tokenizer)
    if device is not None:
        model.to(device)
    n = dargs.replay_samples or replay_samples(dargs.replay_fraction, draws)
    t0 = time.perf_counter()
    generated = generate_replay(model, n, dargs.block_size, start_token_id=start, seed=seed, progress=progress)
    log().info(f"hf-oto: replay: {n} sequences of {dargs.block_size} tokens sampled from the model in "
               f"{time.perf_counter() - t0:.0f} s, {dargs.replay_fraction:.0%} of the training draws")
    return mix_replay(train_blocks, generated.to(train_blocks.dtype), dargs.replay_fraction)
