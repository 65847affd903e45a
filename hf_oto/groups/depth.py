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
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal, get_args

import torch
from torch import nn

from hf_oto.errors import ConfigError
from hf_oto.groups.probe import meta_twin
from hf_oto.groups.space import (
    BlockInfo,
    GroupSet,
    PruningSpace,
    SliceSpec,
    layer_fields,
    layer_signature,
    representatives,
)
from hf_oto.subnet.remote_code import remove_blocks

Granularity = Literal["width", "depth", "both"]
GRANULARITIES: tuple[str, ...] = get_args(Granularity)


def with_granularity(model: nn.Module, space: PruningSpace, granularity: str, layout: str = "uniform") -> PruningSpace:
    """``space`` for ``granularity``: ``"width"`` (heads and channels, as discovered), ``"depth"``
    (whole layers, and with a per-layer ``layout`` whole attention and MLP blocks too: the width sets
    stay, unprunable, for the record) or ``"both"``. A ``"uniform"`` layout promises a stock config,
    which can drop whole layers but cannot say that one layer has no attention or no MLP."""
    if granularity not in GRANULARITIES:
        raise ConfigError(f"pruning_granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity == "width":
        return space
    layers = layer_sets(model, space)
    blocks = block_sets(model, space) if layout != "uniform" else []
    if not any(gs.prunable for gs in layers + blocks):
        raise ConfigError(f"pruning_granularity {granularity!r}: no decoder layer of this model can be removed "
                          f"({layers[0].reason if layers else 'no decoder layers found'})")
    sets = list(space.sets)
    if granularity == "depth":
        sets = [s if not s.prunable else dataclasses.replace(s, prunable=False, reason="pruning_granularity 'depth'")
                for s in sets]
    sets += layers + blocks
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
    identity = {sig: _not_identity(model, layers[i]) for sig, i in representatives(signatures).items()}
    out = []
    for i, layer in enumerate(layers):
        prefix = f"{space.layers_path}.{i}"
        params = [(f"{prefix}.{n}", p) for n, p in layer.named_parameters()]
        why = unsaid[i] or identity[signatures[i]]
        if any(p.dim() == 0 for _, p in params):
            why = why or "the layer holds a scalar parameter"
        slices = [SliceSpec(name, 0, torch.arange(p.shape[0]).view(1, -1)) for name, p in params if p.dim() > 0]
        out.append(GroupSet(prefix, "layer", i, "layer", slices, sum(p.numel() for _, p in params),
                            prunable=not why and bool(slices), reason=why))
    return out


def _not_expressible(model: nn.Module, space: PruningSpace) -> list[str]:
    """Per layer, why the config cannot describe the model without it ("" when it can).

    One meta-device twin built without a layer (the count one less, every per-layer list of the config
    cut to match) must build each layer that moves up with the shapes it has: removing layer ``i`` moves
    layers ``i+1..`` down one index, and the twin's layer ``j-1`` is what the config builds there, for any
    ``i < j`` (per-layer lists are cut at the removed layer, so their entries move with the layers; fields
    that place kinds by index, such as DeepSeek's ``first_k_dense_replace`` or Qwen2-MoE's
    ``mlp_only_layers``, do not). So DeepSeek's MoE layers can leave, its dense first layers cannot."""
    n = space.num_layers
    if n < 2:
        return ["the model has a single decoder layer"] * n
    try:
        twin = meta_twin(model, model.config, **layer_fields(model.config, n, range(1, n)))
    except Exception as e:  # noqa: BLE001 - a config that refuses fewer layers cannot express a removal
        return [f"the config refuses fewer layers ({type(e).__name__})"] * n
    head = space.layers_path + "."

    def by_layer(m: nn.Module) -> dict[int, dict[str, tuple]]:
        out: dict[int, dict[str, tuple]] = {}
        for name, p in m.named_parameters():
            if name.startswith(head):
                index, _, rest = name[len(head):].partition(".")
                out.setdefault(int(index), {})[rest] = tuple(p.shape)
        return out

    have, built = by_layer(model), by_layer(twin)
    # moves[j]: why layer j cannot move to index j - 1 ("" when the config builds it there as it is)
    moves = [""] * n
    for j in range(1, n):
        want, got = have.get(j, {}), built.get(j - 1, {})
        wrong = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
        if wrong:
            moves[j] = (f"the config would build {head}{j - 1}.{wrong[0]} as {got.get(wrong[0])}, not as layer {j}'s "
                        f"({want.get(wrong[0])}) when layer {j} moves there: its layers' kinds follow their index")
    return [next((moves[j] for j in range(i + 1, n) if moves[j]), "") for i in range(n)]


@torch.no_grad()
def _not_identity(model: nn.Module, layer: nn.Module) -> str:
    """Why this layer, its weights zeroed, does not pass its hidden states through ("" when it does)."""
    params = list(layer.parameters())
    if any(p.is_meta for p in params):
        return ""  # a meta-device model (a pre-flight) has no values to probe: the real model is probed when it loads
    seen: dict[str, torch.Tensor] = {}

    def hook(_module, args, kwargs, output):
        x = args[0] if args else kwargs.get("hidden_states")
        y = output[0] if isinstance(output, (tuple, list)) else output
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            seen["in"], seen["out"] = x.detach().clone(), y.detach().clone()

    handle = layer.register_forward_hook(hook, with_kwargs=True)
    try:
        with _zeroed(params):
            _run(model)
    except Exception as e:  # noqa: BLE001 - a model that cannot run this probe is not offered depth groups
        return f"the identity probe could not run the model ({type(e).__name__})"
    finally:
        handle.remove()
    if "in" not in seen:
        return "the layer's hidden states could not be observed"
    if seen["in"].shape != seen["out"].shape or not torch.equal(seen["in"], seen["out"]):
        return "with its weights zeroed the layer does not pass its input through (post-norm residual)"
    return ""


# Serving stacks need attention in the first layer: vLLM's DeciLM starts the residual stream in the first
# layer's attention (an attention-free first layer fails there), and llama.cpp sizes heads from layer 0.
FIRST_ATTENTION = ("the first layer keeps its attention (vLLM's DeciLM starts the residual stream there, "
                   "llama.cpp sizes attention heads from it)")


def block_sets(model: nn.Module, space: PruningSpace) -> list[GroupSet]:
    """One ``"attention_block"`` and one ``"mlp_block"`` set (a single group each) per decoder layer: the
    child module of the layer that holds the block's heads or channels, with the norms only it reads.

    Offered where it is measured to be exact: per distinct layer structure, the layer with the block's
    weights zeroed must compute bit for bit what it computes with the block replaced by the no-op the
    export ships (:class:`~hf_oto.subnet.remote_code.NoOpBlock`) and its norms by identities. The first
    layer's attention is not offered (:data:`FIRST_ATTENTION`)."""
    layers = model.get_submodule(space.layers_path)
    signatures = [layer_signature(layer) for layer in layers]
    probed = {sig: _block_facts(model, space, i) for sig, i in representatives(signatures).items()}
    out = []
    for i, layer in enumerate(layers):
        for block, (info, why) in probed[signatures[i]].items():
            if i == 0 and block == "attention":
                why = why or FIRST_ATTENTION
            prefix = f"{space.layers_path}.{i}"
            names = (info.module, *info.norms)
            params = [(f"{prefix}.{m}.{n}", p) for m in names for n, p in layer.get_submodule(m).named_parameters()]
            if any(p.dim() == 0 for _, p in params):
                why = why or "the block holds a scalar parameter"
            slices = [SliceSpec(name, 0, torch.arange(p.shape[0]).view(1, -1)) for name, p in params if p.dim() > 0]
            out.append(GroupSet(f"{prefix}.{info.module}", f"{block}_block", i, block, slices,
                                sum(p.numel() for _, p in params), prunable=not why and bool(slices), reason=why,
                                info=info))
    return out


def _block_modules(space: PruningSpace, layer: int) -> dict[str, str]:
    """"attention"/"mlp" -> the child of decoder layer ``layer`` that holds that block's groups."""
    head = f"{space.layers_path}.{layer}."
    out: dict[str, str] = {}
    for gs in space.sets:
        if gs.layer == layer and gs.block in ("attention", "mlp") and gs.prefix.startswith(head):
            out.setdefault(gs.block, gs.prefix[len(head):].split(".")[0])
    if len(set(out.values())) < len(out):
        return {}  # one module holds both blocks: neither can leave alone
    return out


def _norm_owners(model: nn.Module, layer: nn.Module, modules: dict[str, str]) -> dict[str, tuple[str, ...]]:
    """block -> the layer's other children that only it reads: their output is the block's input, or their
    input is the block's output (a norm applied to what the block adds, as Gemma-2 does)."""
    seen: dict[str, dict[str, torch.Tensor]] = {}
    handles = []

    def hook(name):
        def fn(_m, args, kwargs, output):
            x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
            y = output[0] if isinstance(output, (tuple, list)) else output
            seen[name] = {"in": x, "out": y}
        return fn

    children = dict(layer.named_children())
    for name, child in children.items():
        handles.append(child.register_forward_hook(hook(name), with_kwargs=True))
    try:
        _run(model)
    finally:
        for h in handles:
            h.remove()
    block_of = {m: b for b, m in modules.items()}
    readers: dict[str, set[str]] = {}
    for name in children:
        if name in block_of or name not in seen:
            continue
        for m, b in block_of.items():
            if m not in seen:
                continue
            if _same(seen[name]["out"], seen[m]["in"]) or _same(seen[name]["in"], seen[m]["out"]):
                readers.setdefault(name, set()).add(b)
    return {b: tuple(n for n, bs in readers.items() if bs == {b}) for b in modules}


def _same(a, b) -> bool:
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)


@torch.no_grad()
def _block_facts(model: nn.Module, space: PruningSpace, i: int) -> dict[str, tuple[BlockInfo, str]]:
    """For layer ``i``'s attention and MLP blocks: how each leaves (:class:`BlockInfo`), and why it cannot
    ("" when it can)."""
    layer = model.get_submodule(space.layers_path)[i]
    modules = _block_modules(space, i)
    if any(p.is_meta for p in layer.parameters()):
        return {b: (BlockInfo(m), "") for b, m in modules.items()}  # pre-flight: the real model is probed later
    owners = _norm_owners(model, layer, modules)
    out = {}
    for block, name in modules.items():
        info = BlockInfo(name, owners.get(block, ()), 0)
        parts = [layer.get_submodule(n) for n in (name, *info.norms)]
        params = [p for part in parts for p in part.parameters()]
        shape: dict[str, int] = {}

        def arity(_m, _args, output, shape=shape):
            shape["n"] = len(output) if isinstance(output, (tuple, list)) else 0

        handle = layer.get_submodule(name).register_forward_hook(arity)
        try:
            with _zeroed(params):
                zeroed = _layer_output(model, layer)
        finally:
            handle.remove()
        info = BlockInfo(name, info.norms, shape.get("n", 0))
        originals = {n: layer.get_submodule(n) for n in (name, *info.norms)}
        try:
            remove_blocks(layer, {name: {"outputs": info.outputs, "norms": list(info.norms),
                                         "attention": block == "attention"}})
            replaced = _layer_output(model, layer)
        except Exception as e:  # noqa: BLE001 - a layer that cannot run without the block keeps it
            replaced, why = None, f"the layer cannot run without its {block} block ({type(e).__name__})"
        finally:
            for n, m in originals.items():
                setattr(layer, n, m)
        if replaced is not None:
            why = "" if _same(zeroed, replaced) else (
                f"with its {block} block's weights zeroed the layer does not compute what it computes without it")
        out[block] = (info, why)
    return out


def _layer_output(model: nn.Module, layer: nn.Module) -> torch.Tensor | None:
    seen: dict[str, torch.Tensor] = {}

    def hook(_m, _args, output):
        y = output[0] if isinstance(output, (tuple, list)) else output
        seen["out"] = y.detach().clone()

    handle = layer.register_forward_hook(hook)
    try:
        _run(model)
    finally:
        handle.remove()
    return seen.get("out")


@contextmanager
def _zeroed(params: list[torch.Tensor]) -> Iterator[None]:
    """``params`` zeroed in place for the block, restored to their values after it."""
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p in params:
                p.zero_()
        yield
    finally:
        with torch.no_grad():
            for p, v in zip(params, saved, strict=True):
                p.copy_(v)


def _run(model: nn.Module) -> None:
    """One short forward pass in evaluation mode (the probes' input)."""
    vocab = int(getattr(model.config, "vocab_size", 2) or 2)
    device = next(model.parameters()).device
    ids = (torch.arange(5, device=device).view(1, -1) * 7 + 3) % vocab
    was_training = model.training
    model.eval()
    try:
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        model.train(was_training)
