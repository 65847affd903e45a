"""HESSO on a QFA model: the pruning space, re-expressed on the QFA layers' gates and adapters.

A group's slice of a quantized weight becomes: for output rows, the rows of the output gate and of
every width's ``lora_B``; for input columns, the entries of the (frozen) input gate. A removed
group's input columns must be whole quantization groups, or the export could not store the kept
columns with their scales: FFN channels therefore leave in aligned blocks (``GroupSet.align``),
and attention heads need a head size the group size divides. The adapters' ``lora_A`` columns of
a removed block are zeroed after every step (:func:`zero_removed_columns`).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from hf_oto.errors import ConfigError
from hf_oto.groups.space import FFN_KINDS, PruningSpace, SliceSpec
from hf_oto.quant.config import QFAConfig
from hf_oto.quant.prepare import qfa_layers
from hf_oto.quant.quantize import whole_groups


def qfa_space(space: PruningSpace, targets: dict[str, tuple[int, int]], config: QFAConfig,
              ffn_multiple: int) -> PruningSpace:
    """``space`` (discovered on the model before QFA) mapped onto the gates and adapters QFA adds.

    ``targets`` maps each quantized linear's name to its (out, in) shape. Refuses, before any
    quantization, a group whose input columns cannot be whole quantization groups.
    """
    size = config.group_size
    shapes = dict(space.param_shapes)
    ranks = config.adapter_ranks()  # every quantized linear's adapters: their rows follow its output channels
    sets = []
    for gs in space.sets:
        slices: list[SliceSpec] = []
        align = 1
        for sl in gs.slices:
            prefix = sl.param[: -len(".weight")] if sl.param.endswith(".weight") else None
            if prefix not in targets:
                slices.append(sl)
                continue
            if sl.expert is not None:
                raise ConfigError("QFA with pruning does not cover MoE expert weights yet")
            out, inp = targets[prefix]
            if sl.dim == 0:
                slices.append(SliceSpec(f"{prefix}.gate_out", 0, sl.index))
                slices += [SliceSpec(f"{prefix}.lora_B.{key}", 0, sl.index) for key in ranks]
                shapes[f"{prefix}.gate_out"] = (out,)
                shapes.update({f"{prefix}.lora_B.{key}": (out, r) for key, r in ranks.items()})
                continue
            slices.append(SliceSpec(f"{prefix}.gate_in", 0, sl.index))
            shapes[f"{prefix}.gate_in"] = (inp,)
            if gs.kind in FFN_KINDS:
                align = math.lcm(size, ffn_multiple)
                if gs.count % align:
                    raise ConfigError(f"{gs.prefix}: FFN width {gs.count} is not a multiple of {align} (the lcm "
                                      f"of qfa_group_size and ffn_multiple), so it cannot be pruned in whole "
                                      f"quantization groups")
            elif not whole_groups(sl.index, size):
                raise ConfigError(f"{gs.prefix}: a {gs.kind} owns {sl.index.shape[1]} input columns of {prefix}, "
                                  f"not whole quantization groups of {size}; with pruning, pick a "
                                  f"qfa_group_size that divides the head size")
        sets.append(dataclasses.replace(gs, slices=slices, align=align))
    return dataclasses.replace(space, sets=sets, param_shapes=shapes)


def enable_gates(model: nn.Module, space: PruningSpace) -> None:
    """Add the gates that ``space`` (from :func:`qfa_space`) names to the model's QFA layers."""
    gated = {sl.param.rpartition(".")[0] for gs in space.sets for sl in gs.slices
             if sl.param.endswith((".gate_out", ".gate_in"))}
    for name, _, m in qfa_layers(model):
        if name in gated:
            m.enable_gates()


@torch.no_grad()
def zero_removed_columns(model: nn.Module) -> None:
    """Zero the ``lora_A`` columns of quantization groups whose input gates are all zero."""
    for _, _, m in qfa_layers(model):
        if m.gate_in is None:
            continue
        dead = (m.gate_in.reshape(-1, m.group_size) == 0).all(dim=1)
        if dead.any():
            for a in m.lora_A.values():
                a[:, dead] = 0.0
