"""Discovery, step 4: names in the user's model: the transformers model inside a peft wrapper, and
the group slices moved onto peft's parameter names (LoRA factors included)."""

from __future__ import annotations

from torch import nn

from hf_oto.groups.space import (
    GroupSet,
    SliceSpec,
)


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def is_adapter_param(name: str) -> bool:
    """LoRA factors live in peft's lora_* sub-modules; they are not part of the base model's size."""
    return ".lora_" in name


def map_to_model(model: nn.Module, base: nn.Module, sets: list[GroupSet]) -> list[GroupSet]:
    """Rename twin parameter names to the user's model, and add LoRA factor slices."""
    if model is base and not any(hasattr(m, "base_layer") for m in base.modules()):
        return sets
    full_name = {id(p): n for n, p in model.named_parameters()}
    for s in sets:
        new_slices = []
        for sl in s.slices:
            mod_path, _, attr = sl.param.rpartition(".")
            mod = base.get_submodule(mod_path)
            wrapped = getattr(mod, "base_layer", None)
            target = _owner(mod, attr)
            if target is not mod and adapted_as_parameter(mod, attr) and s.prunable:
                s.prunable = False
                s.reason = (f"peft adapts {sl.param} as a parameter (target_parameters), an adapter layout hf-oto "
                            "does not slice yet; leave these experts out of the LoRA targets to prune their channels")
            name = full_name[id(getattr(target, attr))]
            new_slices.append(SliceSpec(name, sl.dim, sl.index, sl.expert))
            if wrapped is None or attr != "weight":
                continue
            out_dim = 1 if _is_conv1d(wrapped) else 0
            side = "out" if sl.dim == out_dim else "in"
            for adapter, lora_a in getattr(mod, "lora_A", {}).items():
                lora_b = mod.lora_B[adapter]
                if side == "in":
                    new_slices.append(SliceSpec(full_name[id(lora_a.weight)], 1, sl.index))
                else:
                    new_slices.append(SliceSpec(full_name[id(lora_b.weight)], 0, sl.index))
                    mag = getattr(mod, "lora_magnitude_vector", None)
                    if mag is not None and adapter in mag:
                        new_slices.append(SliceSpec(full_name[id(mag[adapter].weight)], 0, sl.index))
        s.slices = new_slices
    return sets


def _owner(mod: nn.Module, attr: str) -> nn.Module:
    """The module that holds parameter ``attr``: ``mod``, or the module peft wrapped (``base_layer``,
    nested once per adapted parameter with target_parameters)."""
    while attr not in dict(mod.named_parameters(recurse=False)):
        inner = getattr(mod, "base_layer", None)
        if not isinstance(inner, nn.Module):
            break
        mod = inner
    return mod


def adapted_as_parameter(mod: nn.Module, attr: str) -> bool:
    """Whether peft wraps parameter ``attr`` itself (a ParamWrapper of target_parameters) on the way to it."""
    while isinstance(mod, nn.Module):
        if getattr(mod, "parameter_name", None) == attr:
            return True
        mod = getattr(mod, "base_layer", None)
    return False


def _is_conv1d(mod: nn.Module) -> bool:
    # transformers' Conv1D stores its weight as (in, out); nn.Linear as (out, in).
    return not isinstance(mod, nn.Linear) and hasattr(mod, "nf")
