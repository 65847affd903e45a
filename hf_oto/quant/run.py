"""A QFA run folder: everything ``hf-oto qfa-search`` needs to pick and export a configuration.

``qfa_run.json`` (the QFA settings, the base model's config, whether HESSO pruned, the layout),
``qfa_state.safetensors`` (codes, scales, adapters, gates and the untouched parameters),
``eval_blocks.safetensors`` (held-out token blocks for the search) and the tokenizer. No pickles.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from hf_oto.errors import ConfigError, ExportError
from hf_oto.io import JSONObject, check_no_pickles, check_target, discard, publish, staging_dir, unique_state
from hf_oto.quant.config import QFAConfig
from hf_oto.quant.layer import QFALinear
from hf_oto.quant.prepare import qfa_layers, target_linears
from hf_oto.quant.quantize import QuantizedWeight

RUN_FILE = "qfa_run.json"


def save_qfa_run(model: nn.Module, config: QFAConfig, out_dir: str | os.PathLike, *, pruned: bool,
                 eval_blocks: torch.Tensor | None = None, tokenizer: Any = None, overwrite: bool = False,
                 extra: JSONObject | None = None) -> Path:
    """Write the trained QFA model to ``out_dir`` (atomically; replaces only an earlier QFA run)."""
    out = Path(out_dir)
    check_target(out, overwrite=overwrite, marker=RUN_FILE)
    state = unique_state(model)
    tmp = staging_dir(out)
    try:
        save_file(state, str(tmp / "qfa_state.safetensors"), metadata={"format": "pt"})
        if eval_blocks is not None:
            save_file({"input_ids": eval_blocks.cpu().contiguous()}, str(tmp / "eval_blocks.safetensors"))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        info = dict(extra or {}, qfa=config.to_dict(), base_config=model.config.to_dict(), pruned=pruned,
                    gates=any(m.gate_out is not None for _, _, m in qfa_layers(model)),
                    torch_dtype=str(next(model.parameters()).dtype).removeprefix("torch."))
        (tmp / RUN_FILE).write_text(json.dumps(info, indent=1, default=str))
        check_no_pickles(tmp)
        return publish(tmp, out)
    finally:
        discard(tmp)


@dataclass
class QFARun:
    """A saved QFA run, loaded: the model with its QFA layers, their config, the run's ``info``
    (``qfa_run.json``), the held-out blocks it was saved with and its tokenizer (None when absent)."""

    model: nn.Module
    config: QFAConfig
    info: JSONObject
    eval_blocks: torch.Tensor | None
    tokenizer: Any = None


def load_qfa_run(run_dir: str | os.PathLike) -> QFARun:
    """The QFA run saved in ``run_dir`` (:meth:`HFOTOTrainer.save_qfa_run`), ready to search."""
    run = Path(run_dir)
    if not (run / RUN_FILE).is_file():
        raise ConfigError(f"{run} is not a QFA run folder (no {RUN_FILE}); pass the run's output folder")
    info = json.loads((run / RUN_FILE).read_text())
    config = QFAConfig.from_dict(info["qfa"])
    model = base_model_for_space(info)
    model_config, dtype = model.config, _dtype(info)
    state = load_file(str(run / "qfa_state.safetensors"))
    with torch.device("meta"):  # shells: every tensor comes from the saved state below
        for name, _, lin in target_linears(model, config):
            out, inp = lin.weight.shape
            shells = {b: QuantizedWeight(torch.zeros(out, inp, dtype=torch.int8),
                                         torch.zeros(out, inp // config.group_size), b, config.group_size)
                      for b in config.bits}
            bias = None if lin.bias is None else torch.zeros(out)
            layer = QFALinear(shells, bias, rank=config.rank, alpha=config.alpha,
                              shared_rank=config.shared_rank)
            if info.get("gates"):
                layer.enable_gates()
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, layer)
    model.to_empty(device="cpu")
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()  # tied weights were saved once
    present = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    missing = [k for k in missing if k in present]
    if missing or unexpected:
        raise ExportError(f"{run}: the saved state does not match the model (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]})")
    _reset_nonpersistent(model, model_config, dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    blocks = None
    if (run / "eval_blocks.safetensors").is_file():
        blocks = load_file(str(run / "eval_blocks.safetensors"))["input_ids"]
    tokenizer = None
    if (run / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(run)
    return QFARun(model, config, info, blocks, tokenizer)


def _reset_nonpersistent(model: nn.Module, config, dtype) -> None:
    """Buffers not saved in a state dict (rotary frequencies) are rebuilt from a fresh model."""
    from transformers import AutoModelForCausalLM

    fresh = None
    names = set(model.state_dict())
    for name, _ in list(model.named_buffers()):
        if name in names:
            continue
        if fresh is None:
            fresh = dict(AutoModelForCausalLM.from_config(config, dtype=dtype).named_buffers())
        parent, _, attr = name.rpartition(".")
        model.get_submodule(parent).register_buffer(attr, fresh[name].clone(), persistent=False)


def _dtype(info: JSONObject) -> torch.dtype:
    return getattr(torch, info.get("torch_dtype", "float32"))


def base_model_for_space(info: JSONObject) -> nn.Module:
    """The run's base architecture, in its dtype, on the meta device (pruning groups are discovered on it)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    base = dict(info["base_config"])
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(base.pop("model_type"), **base),
                                                dtype=_dtype(info))
