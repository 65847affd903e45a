"""Depth: whole decoder layers as groups of the pruning space, beside the heads and channels.

A layer group owns every parameter of one decoder layer. It is offered only where zeroing those
parameters turns the layer into the identity on the residual stream (pre-norm and parallel residual
blocks: zero projections and biases add nothing; a post-norm encoder layer would not pass its input
through). That is measured, not assumed: one forward per distinct layer structure, with one layer's
weights zeroed and then written back bit for bit. A zeroed layer is then exactly a removed layer, so
the sub-network step drops it and the export has fewer ``num_hidden_layers``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, get_args

import torch
from torch import nn

from hf_oto.errors import ConfigError
from hf_oto.groups.probe import meta_twin
from hf_oto.groups.space import GroupSet, PruningSpace, SliceSpec, layer_fields, layer_signature, representatives

Granularity = Literal["width", "depth", "both"]
GRANULARITIES: tuple[str, ...] = get_args(Granularity)


def with_granularity(model: nn.Module, space: PruningSpace, granularity: str) -> PruningSpace:
    """``space`` for ``granularity``: ``"width"`` (heads and channels, as discovered), ``"depth"``
    (whole layers only: the width sets stay, unprunable, for the record) or ``"both"``."""
    if granularity not in GRANULARITIES:
        raise ConfigError(f"pruning_granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity == "width":
        return space
    layers = layer_sets(model, space)
    if not any(gs.prunable for gs in layers):
        raise ConfigError(f"pruning_granularity {granularity!r}: no decoder layer of this model can be removed "
                          f"({layers[0].reason if layers else 'no decoder layers found'})")
    sets = list(space.sets)
    if granularity == "depth":
        sets = [s if not s.prunable else dataclasses.replace(s, prunable=False, reason="pruning_granularity 'depth'")
                for s in sets]
    sets += layers
    sets.sort(key=lambda s: (s.layer, {"layer": 0, "attention": 1, "mlp": 2}[s.block], s.prefix, s.kind))
    return dataclasses.replace(space, sets=sets)


def layer_sets(model: nn.Module, space: PruningSpace) -> list[GroupSet]:
    """One ``"layer"`` set (a single group) per decoder layer of ``model``, the space's model."""
    if hasattr(model, "get_base_model"):
        raise ConfigError("depth pruning takes a plain transformers model (no peft adapters): a removed layer's "
                          "adapters would have to go with it; prune the width only, or merge the adapters first")
    layers = model.get_submodule(space.layers_path)
    unsaid = _not_expressible(model, space)
    signatures = [layer_signature(layer) for layer in layers]
    reason = {sig: unsaid or _not_identity(model, layers[i]) for sig, i in representatives(signatures).items()}
    out = []
    for i, layer in enumerate(layers):
        prefix = f"{space.layers_path}.{i}"
        params = [(f"{prefix}.{n}", p) for n, p in layer.named_parameters()]
        why = reason[signatures[i]]
        if any(p.dim() == 0 for _, p in params):
            why = why or "the layer holds a scalar parameter"
        slices = [SliceSpec(name, 0, torch.arange(p.shape[0]).view(1, -1)) for name, p in params if p.dim() > 0]
        out.append(GroupSet(prefix, "layer", i, "layer", slices, sum(p.numel() for _, p in params),
                            prunable=not why and bool(slices), reason=why))
    return out


def _not_expressible(model: nn.Module, space: PruningSpace) -> str:
    """Why the config cannot describe the model without a layer ("" when it can): a meta-device model
    built without layer 0 must have the shapes of layers 1.. of this one (a config that places layer
    kinds by index, such as dense layers first and MoE after, fails this)."""
    n = space.num_layers
    if n < 2:
        return "the model has a single decoder layer"
    try:
        twin = meta_twin(model, model.config, **layer_fields(model.config, n, range(1, n)))
    except Exception as e:  # noqa: BLE001 - a config that refuses fewer layers cannot express a removal
        return f"the config refuses fewer layers ({type(e).__name__})"
    head = space.layers_path + "."
    want = {n_: tuple(p.shape) for n_, p in model.named_parameters() if n_.startswith(head)}
    got = {n_: tuple(p.shape) for n_, p in twin.named_parameters() if n_.startswith(head)}
    moved = {}
    for name, shape in want.items():
        index, _, rest = name[len(head):].partition(".")
        if int(index) > 0:
            moved[f"{head}{int(index) - 1}.{rest}"] = shape
    for name in sorted(set(got) | set(moved)):
        if got.get(name) != moved.get(name):
            return (f"without layer 0 the config would build {name} as {got.get(name)}, not as the layer that moves "
                    f"there ({moved.get(name)}): its layers' kinds follow their index")
    return ""


@torch.no_grad()
def _not_identity(model: nn.Module, layer: nn.Module) -> str:
    """Why this layer, its weights zeroed, does not pass its hidden states through ("" when it does)."""
    params = [p for p in layer.parameters()]
    if any(p.is_meta for p in params):
        return ""  # a meta-device model (a pre-flight) has no values to probe: the real model is probed when it loads
    saved = [p.detach().clone() for p in params]
    seen: dict[str, torch.Tensor] = {}

    def hook(_module, args, kwargs, output):
        x = args[0] if args else kwargs.get("hidden_states")
        y = output[0] if isinstance(output, (tuple, list)) else output
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            seen["in"], seen["out"] = x.detach().clone(), y.detach().clone()

    handle = layer.register_forward_hook(hook, with_kwargs=True)
    was_training = model.training
    try:
        for p in params:
            p.zero_()
        vocab = int(getattr(model.config, "vocab_size", 2) or 2)
        device = next(model.parameters()).device
        ids = torch.arange(5, device=device).view(1, -1) % vocab
        model.eval()
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    except Exception as e:  # noqa: BLE001 - a model that cannot run this probe is not offered depth groups
        return f"the identity probe could not run the model ({type(e).__name__})"
    finally:
        handle.remove()
        for p, s in zip(params, saved, strict=True):
            p.copy_(s)
        model.train(was_training)
    if "in" not in seen:
        return "the layer's hidden states could not be observed"
    if seen["in"].shape != seen["out"].shape or not torch.equal(seen["in"], seen["out"]):
        return "with its weights zeroed the layer does not pass its input through (post-norm residual)"
    return ""
