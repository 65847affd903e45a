"""Turn a model's targeted linears into QFA layers: quantize once per bit-width, add adapters."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from hf_oto.errors import ConfigError
from hf_oto.groups.space import find_decoder_layers
from hf_oto.quant.config import QFAConfig
from hf_oto.quant.layer import QFALinear
from hf_oto.quant.quantize import QuantizedWeight, gptq, rtn


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(path, module list) of the decoder layers: the ModuleList with ``num_hidden_layers`` entries."""
    found = find_decoder_layers(model, getattr(model.config, "num_hidden_layers", None))
    if found is not None:
        return found
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


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor | None) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


@torch.no_grad()
def _layer_inputs(model: nn.Module, layers: nn.ModuleList, batches: Iterable[dict[str, torch.Tensor]]):
    """Per batch: (args, kwargs) of every decoder layer's call (hidden states from layer 0 only) and the
    token mask. Each layer keeps its own keyword arguments (attention masks and rotary tables can differ
    per layer type, e.g. sliding-window layers); hidden states of later layers are recomputed layer by layer."""
    device = next(model.parameters()).device
    calls: list[list[tuple[tuple, dict]]] = []
    masks: list[torch.Tensor | None] = []
    current: list[tuple[tuple, dict]] = []

    def capture(index: int):
        def fn(_mod, args, kwargs):
            if index == 0:
                current.append((args, kwargs))
            else:  # drop the hidden states (a slice would keep their storage): recomputed from the previous layer
                current.append(_with_hidden(args, kwargs, None))
        return fn

    handles = [layer.register_forward_pre_hook(capture(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for batch in batches:
            current = []
            am = batch.get("attention_mask")
            masks.append(None if am is None else am.reshape(-1).bool().to(device))
            model(input_ids=batch["input_ids"].to(device), use_cache=False,
                  **({} if am is None else {"attention_mask": am.to(device)}))
            calls.append(current)
    finally:
        for h in handles:
            h.remove()
    return calls, masks


@torch.no_grad()
def layer_hessians(model: nn.Module, targets: Sequence[tuple[str, int, nn.Linear]],
                   batches: Iterable[dict[str, torch.Tensor]]) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """``(layer, {target: X^T X / tokens})`` for one decoder layer at a time, in order (padding left out).

    One forward pass records every layer's call; then each layer runs alone on the previous layer's
    outputs with hooks on its own targets. Only that layer's Hessians exist while the caller quantizes
    it (GPTQ's sequential calibration), so memory does not grow with depth: one Llama-3-8B layer's
    Hessians take about 1.2 GB in fp32, all 32 layers' about 39 GB. The Hessians stay on the device
    of the layer's inputs. Inputs of later layers come from the unquantized layers.
    """
    _, layers = decoder_layers(model)
    calls, masks = _layer_inputs(model, layers, batches)
    by_layer: dict[int, list[tuple[str, nn.Linear]]] = {}
    for name, i, mod in targets:
        by_layer.setdefault(i, []).append((name, mod))
    hidden = [_hidden(*call[0]) for call in calls]  # layer 0's inputs, one per batch
    for i, layer in enumerate(layers):
        acc = _HessianSums(by_layer.get(i, []))
        try:
            for b, call in enumerate(calls):
                acc.mask = masks[b]
                args, kwargs = _with_hidden(*call[i], hidden[b])
                out = layer(*args, **kwargs)
                hidden[b] = out[0] if isinstance(out, tuple) else out
        finally:
            acc.remove()
        if i in by_layer:
            yield i, acc.hessians()
        del acc


class _HessianSums:
    """Forward pre-hooks that sum ``X^T X`` of each module's input (tokens under ``mask`` only)."""

    def __init__(self, modules: Sequence[tuple[str, nn.Module]]):
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self.mask: torch.Tensor | None = None
        self.handles = [mod.register_forward_pre_hook(self._hook(n)) for n, mod in modules]

    def _hook(self, name: str):
        def fn(_mod, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            if self.mask is not None and self.mask.numel() == x.shape[0]:
                x = x[self.mask]
            self.sums[name] = self.sums[name] + x.T @ x if name in self.sums else x.T @ x
            self.tokens[name] = self.tokens.get(name, 0) + x.shape[0]
        return fn

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def hessians(self) -> dict[str, torch.Tensor]:
        """The averaged sums, handed over (divided in place, not kept here)."""
        return {n: self.sums.pop(n).div_(max(self.tokens[n], 1)) for n in list(self.sums)}


def prepare_qfa(model: nn.Module, config: QFAConfig,
                calibration: Iterable[dict[str, torch.Tensor]] | None = None) -> QFAMemory:
    """Replace every targeted linear of ``model`` (in place) by a :class:`QFALinear`.

    The base weights are quantized once per width in ``config.bits`` (GPTQ needs ``calibration``
    batches with ``input_ids`` and calibrates one decoder layer at a time, see :func:`layer_hessians`;
    RTN needs none) and the originals are dropped: only integer codes and scales stay. Codes, scales
    and adapters live on each linear's device. Returns the memory this takes.
    """
    targets = check_targets(model, config)
    if config.quantizer == "gptq" and calibration is None:
        raise ConfigError("QFA quantizer 'gptq' needs calibration batches; pass some, or use quantizer='rtn'")
    by_name = dict(model.named_modules())
    bar = tqdm(total=len(targets), desc="QFA: quantizing", disable=len(targets) < 8)

    def replace(name: str, lin: nn.Linear, hessian: torch.Tensor | None) -> None:
        quantized = {b: gptq(lin.weight, hessian, b, config.group_size) if hessian is not None
                     else rtn(lin.weight, b, config.group_size) for b in config.bits}
        layer = QFALinear(quantized, lin.bias, rank=config.rank, alpha=config.alpha, shared_rank=config.shared_rank)
        layer.to(lin.weight.device)
        parent, _, attr = name.rpartition(".")
        setattr(by_name[parent], attr, layer)
        bar.update()

    if config.quantizer == "gptq":
        was_training = model.training
        model.eval()
        try:
            by_layer: dict[int, list[tuple[str, nn.Linear]]] = {}
            for name, i, lin in targets:
                by_layer.setdefault(i, []).append((name, lin))
            for i, hessians in layer_hessians(model, targets, calibration):
                for name, lin in by_layer[i]:
                    replace(name, lin, hessians.pop(name))
                del hessians
        finally:
            model.train(was_training)
    else:
        for name, _, lin in targets:
            replace(name, lin, None)
    bar.close()
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


__all__ = ["QFALinear", "QFAMemory", "QuantizedWeight", "check_targets", "decoder_layers", "layer_hessians", "memory",
           "per_layer_bits", "prepare_qfa", "qfa_layers", "set_bits", "target_linears"]
