"""Turn a model's targeted linears into QFA layers: quantize once per bit-width, add adapters."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from hf_oto.errors import ConfigError
from hf_oto.quant.config import QFAConfig
from hf_oto.quant.layer import QFALinear
from hf_oto.quant.quantize import QuantizedWeight, gptq, rtn


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(path, module list) of the decoder layers: the ModuleList with ``num_hidden_layers`` entries."""
    n = getattr(model.config, "num_hidden_layers", None)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n and n:
            return name, mod
    raise ConfigError("QFA could not find the decoder layers (no module list with num_hidden_layers entries)")


def target_linears(model: nn.Module, config: QFAConfig) -> list[tuple[str, int, nn.Linear]]:
    """(full name, layer index, module) of every linear QFA quantizes, in model order."""
    path, layers = decoder_layers(model)
    wanted = config.target_modules
    found = []
    for i, layer in enumerate(layers):
        for rel, mod in layer.named_modules():
            if not isinstance(mod, nn.Linear) or not rel:
                continue
            if wanted is None or any(rel == t or rel.endswith("." + t) for t in wanted):
                found.append((f"{path}.{i}.{rel}", i, mod))
    if not found:
        raise ConfigError(f"QFA target_modules {list(wanted or [])} match no linear inside the decoder layers")
    return found


def qfa_layers(model: nn.Module) -> list[tuple[str, int, QFALinear]]:
    """(full name, layer index, module) of every QFA layer of a prepared model."""
    path, layers = decoder_layers(model)
    return [(f"{path}.{i}.{rel}", i, mod) for i, layer in enumerate(layers)
            for rel, mod in layer.named_modules() if isinstance(mod, QFALinear)]


def check_targets(model: nn.Module, config: QFAConfig) -> list[tuple[str, int, nn.Linear]]:
    """The targets, after checking that every one can be quantized in ``config.group_size`` groups."""
    targets = target_linears(model, config)
    bad = [(n, m.in_features) for n, _, m in targets if m.in_features % config.group_size]
    if bad:
        raise ConfigError(f"QFA group_size {config.group_size} does not divide the input width of {bad[0][0]} "
                          f"({bad[0][1]}); pick a group size that divides every targeted layer's input")
    return targets


@dataclass
class QFAMemory:
    """Bytes the frozen base takes as codes and scales, against one fp copy per bit-width."""

    codes: int
    scales: int
    adapters: int
    fp_per_width: int

    def table(self) -> str:
        mb = 1 / 2**20
        return (f"QFA base: codes {self.codes * mb:.1f} MiB + scales {self.scales * mb:.1f} MiB "
                f"(one fp copy per width would take {self.fp_per_width * mb:.1f} MiB); "
                f"adapters {self.adapters * mb:.2f} MiB")


def memory(model: nn.Module) -> QFAMemory:
    codes = scales = adapters = fp = 0
    for _, _, m in qfa_layers(model):
        for b in m.bits:
            codes += m.codes(b).numel() * m.codes(b).element_size()
            scales += m.scales(b).numel() * m.scales(b).element_size()
            fp += m.codes(b).numel() * 4
        adapters += sum(p.numel() * p.element_size() for p in m.parameters() if p.requires_grad)
    return QFAMemory(codes, scales, adapters, fp)


@torch.no_grad()
def input_hessians(model: nn.Module, targets: Sequence[tuple[str, int, nn.Linear]],
                   batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``X^T X / tokens`` of every target's input over ``batches`` (padding tokens left out)."""
    sums = {n: torch.zeros(m.in_features, m.in_features) for n, _, m in targets}
    tokens = {n: 0 for n, _, _ in targets}
    mask: list[torch.Tensor | None] = [None]

    def hook(name):
        def fn(_mod, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            if mask[0] is not None and mask[0].numel() == x.shape[0]:
                x = x[mask[0]]
            sums[name] += (x.T @ x).cpu()
            tokens[name] += x.shape[0]
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, _, m in targets]
    try:
        device = next(model.parameters()).device
        for batch in batches:
            am = batch.get("attention_mask")
            mask[0] = None if am is None else am.reshape(-1).bool().to(device)
            model(input_ids=batch["input_ids"].to(device),
                  **({} if am is None else {"attention_mask": am.to(device)}))
    finally:
        for h in handles:
            h.remove()
    return {n: sums[n] / max(tokens[n], 1) for n in sums}


def prepare_qfa(model: nn.Module, config: QFAConfig,
                calibration: Iterable[dict[str, torch.Tensor]] | None = None) -> QFAMemory:
    """Replace every targeted linear of ``model`` (in place) by a :class:`QFALinear`.

    The base weights are quantized once per width in ``config.bits`` (GPTQ needs ``calibration``
    batches with ``input_ids``; RTN needs none) and the originals are dropped: only integer codes
    and scales stay. Returns the memory this takes.
    """
    targets = check_targets(model, config)
    if config.quantizer == "gptq" and calibration is None:
        raise ConfigError("QFA quantizer 'gptq' needs calibration batches; pass some, or use quantizer='rtn'")
    was_training = model.training
    model.eval()
    hessians = input_hessians(model, targets, calibration) if config.quantizer == "gptq" else {}
    model.train(was_training)
    by_name = dict(model.named_modules())
    for name, _, lin in tqdm(targets, desc="QFA: quantizing", disable=len(targets) < 8):
        quantized = {}
        for b in config.bits:
            if config.quantizer == "gptq":
                quantized[b] = gptq(lin.weight, hessians[name], b, config.group_size)
            else:
                quantized[b] = rtn(lin.weight, b, config.group_size)
        layer = QFALinear(quantized, lin.bias, rank=config.rank, alpha=config.alpha)
        layer.to(lin.weight.device)
        parent, _, attr = name.rpartition(".")
        setattr(by_name[parent], attr, layer)
    adapters = {id(p) for _, _, m in qfa_layers(model) for p in [*m.lora_A.values(), *m.lora_B.values()]}
    for p in model.parameters():  # only the adapters train (the frozen base is codes and scales now)
        if id(p) not in adapters:
            p.requires_grad_(False)
    return memory(model)


def per_layer_bits(model: nn.Module, bits: Sequence[int] | int) -> list[int]:
    """``bits`` as one width per decoder layer, checked against the widths each layer was quantized at."""
    n = len(decoder_layers(model)[1])
    per_layer = [int(bits)] * n if isinstance(bits, int) else [int(b) for b in bits]
    if len(per_layer) != n:
        raise ConfigError(f"a bit configuration needs one width per decoder layer ({n}), got {len(per_layer)}")
    for _, i, m in qfa_layers(model):
        if per_layer[i] not in m.bits:
            raise ConfigError(f"layer {i} has no {per_layer[i]}-bit codes (widths: {list(m.bits)})")
    return per_layer


def set_bits(model: nn.Module, bits: Sequence[int] | int) -> None:
    """Make every QFA layer of decoder layer ``i`` use ``bits[i]`` (or one width everywhere)."""
    per_layer = per_layer_bits(model, bits)
    for _, i, m in qfa_layers(model):
        m.active_bits = per_layer[i]


__all__ = ["QFALinear", "QFAMemory", "QuantizedWeight", "check_targets", "decoder_layers", "memory",
           "per_layer_bits", "prepare_qfa", "qfa_layers", "set_bits", "target_linears"]
