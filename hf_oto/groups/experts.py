"""Whole routed experts as groups of the pruning space, and the routing that leaves removed ones out.

An expert group owns one expert of an MoE block: its slice of every expert weight (the leading
expert dimension of the fused 3-D weights) and its row of the router. Zeroing an expert's weights is
not yet removing it: the router would still send tokens to it. So a model whose experts may be
removed routes around them (:func:`route_around_removed_experts`): an expert whose router row and
weights are all exactly zero gets no router logit (the smallest float, so softmax and sigmoid give it
exactly 0) and is never among the top k. Routing over the others is then what the router of a model
with fewer experts computes, which a probe measures per architecture instead of assuming (DeepSeek's
group-limited routing, say, routes differently once a group loses an expert, and is refused).

The rule is the same in the live model and in the sub-network step: a zeroed expert is removed, except
that the lowest-numbered zeroed experts stay (routed, contributing zero) where fewer than top k would
remain.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from hf_oto.errors import ConfigError
from hf_oto.groups.names import adapted_as_parameter, unwrap_peft
from hf_oto.groups.probe import meta_twin, truncated
from hf_oto.groups.space import ExpertInfo, GroupSet, PruningSpace, SliceSpec, layer_signature

PROBE_TOKENS = 64
MAX_BLOCKS = 64  # the most routing groups the probe tries


def with_experts(model: nn.Module, space: PruningSpace) -> PruningSpace:
    """``space`` with one ``"expert"`` set per MoE block of ``model`` (the space's model) added: whole
    routed experts become prunable where the config can express fewer of them, with the reason where not.
    Raises :class:`ConfigError` when the model has no routed experts."""
    sets = expert_sets(model, space)
    if not sets:
        raise ConfigError("prune_experts: this model has no routed experts (no MoE layer was discovered)")
    out = [s for s in space.sets if s.kind != "expert"] + sets
    out.sort(key=lambda s: (s.layer, {"layer": 0, "attention": 1, "mlp": 2}[s.block], s.prefix, s.kind))
    return dataclasses.replace(space, sets=out)


def expert_sets(model: nn.Module, space: PruningSpace) -> list[GroupSet]:
    """One ``"expert"`` set per MoE block whose expert channels discovery found."""
    base = unwrap_peft(model)
    base_name = {id(m): n for n, m in base.named_modules()}
    by_block: dict[str, list[GroupSet]] = defaultdict(list)
    for gs in space.sets:
        if gs.kind == "expert_channel":
            by_block[next(s.param for s in gs.slices if s.expert is not None).rpartition(".")[0]].append(gs)
    probed: dict[tuple, tuple[str | None, str, int, int]] = {}
    claimed = {sl.param for gs in space.sets for sl in gs.slices}  # heads' and FFNs' weights are no routers
    out = []
    for owner_path, channel_sets in by_block.items():
        layer = channel_sets[0].layer
        count = max(gs.ffn.expert for gs in channel_sets) + 1
        experts_path = owner_path
        while experts_path.endswith(".base_layer"):  # peft wraps an adapted expert weight's module
            experts_path = experts_path[: -len(".base_layer")]
        block_path = experts_path.rpartition(".")[0]
        owner = model.get_submodule(owner_path)
        attrs = [n for n, p in owner.named_parameters(recurse=False) if p.shape[0] == count]
        weights = [f"{owner_path}.{n}" for n in attrs]
        router_path, why = _find_router(model, block_path, experts_path, count, claimed)
        router_params: list[str] = []
        buffers: list[str] = []
        field, top_k, blocks = None, 1, 1
        if router_path is not None:
            router = model.get_submodule(router_path)
            router_params = [f"{router_path}.{n}" for n, p in router.named_parameters(recurse=False)
                             if p.shape[0] == count]
            buffers = [f"{base_name[id(router)]}.{n}" for n, b in router.named_buffers(recurse=False)
                       if b.dim() >= 1 and b.shape[0] == count]
            key = layer_signature(model.get_submodule(block_path))  # equal blocks probe alike
            if key not in probed:
                probed[key] = _probe(base, base_name[id(router)], count, layer, space)
            field, why, top_k, blocks = probed[key]
        if not why and any(adapted_as_parameter(model.get_submodule(experts_path), a) for a in attrs):
            why = ("peft adapts the expert weights as parameters (target_parameters), an adapter layout hf-oto does "
                   "not slice yet; leave them out of the LoRA targets to prune whole experts")
        index = torch.arange(count).view(count, 1)
        slices = [SliceSpec(p, 0, index) for p in router_params + weights]
        numel = sum(s.per_index_numel(space.param_shapes[s.param]) for s in slices)
        info = ExpertInfo(count=count, block=block_path, router=router_path or "", weights=tuple(weights),
                          router_params=tuple(router_params), buffers=tuple(buffers), field=field or "", top_k=top_k,
                          blocks=blocks)
        prefix = base_name[id(model.get_submodule(block_path))]  # module paths in the space are the base model's
        out.append(GroupSet(prefix, "expert", layer, "mlp", slices, numel, prunable=not why, reason=why, info=info))
    return out


def _find_router(model: nn.Module, block_path: str, experts_path: str, count: int,
                 claimed: set[str]) -> tuple[str | None, str]:
    """(path of the module holding the router weight, "") or (None, why there is none): the one weight of
    the MoE block, outside the experts and the FFNs (``claimed``), with a row per expert."""
    block = model.get_submodule(block_path)
    found = []
    for name, mod in block.named_modules():
        path = f"{block_path}.{name}" if name else block_path
        if path == experts_path or path.startswith(experts_path + "."):
            continue
        for pname, p in mod.named_parameters(recurse=False):
            if pname.startswith("lora_") or p.dim() != 2 or p.shape[0] != count or f"{path}.{pname}" in claimed:
                continue
            found.append(path)
    if len(found) != 1:
        return None, (f"{block_path} holds {len(found)} weights with one row per expert, not one router, so the "
                      "router's rows cannot be mapped to the experts")
    return found[0], ""


def _probe(base: nn.Module, router_path: str, count: int, layer: int,
           space: PruningSpace) -> tuple[str | None, str, int, int]:
    """(config field that sets the expert count, why fewer experts cannot be expressed ("" if they can),
    top k, routing blocks) for one MoE block, measured: the config is rebuilt with one expert fewer, and the router it
    builds must route exactly as this router does with that expert masked out. Both routers are built
    from the config and hold random values: the probe asks what the code does, not what these weights do."""
    config = base.config
    layers = truncated(config, space.num_layers, layer + 1)
    router = meta_twin(base, config, **layers).get_submodule(router_path)
    field, twin = None, None
    for name, value in sorted(config.to_dict().items()):
        if not isinstance(value, int) or isinstance(value, bool) or value != count:
            continue
        try:
            trial = meta_twin(base, config, **layers, **{name: count - 1})
            twin_router = trial.get_submodule(router_path)
        except Exception:  # noqa: BLE001 - a field value the architecture rejects does not set the count
            continue
        rows = [p.shape[0] for p in twin_router.parameters(recurse=False) if p.dim() == 2]
        if rows == [count - 1]:
            field, twin = name, twin_router
            break
    top_k = _top_k(router, count)
    if field is None:
        return None, "no config field sets the number of routed experts, so fewer cannot be saved", top_k, 1
    if top_k >= count:
        return field, f"every token is routed to all {count} experts (top k = {top_k})", top_k, 1
    source = _random_router(router)
    why = _routing_differs(source, twin, count, 1)
    # Group-limited routing (DeepSeek-V3: experts in n_group consecutive blocks) routes the same only when
    # every block loses as many experts: try one expert from each of d blocks, for d dividing the count.
    for d in (d for d in range(2, min(count // max(top_k, 1), MAX_BLOCKS) + 1) if count % d == 0):
        if not why:
            break
        try:
            fewer = meta_twin(base, config, **layers, **{field: count - d}).get_submodule(router_path)
        except Exception:  # noqa: BLE001 - the config refuses this count
            continue
        if not _routing_differs(source, fewer, count, d):
            return field, "", top_k, d
    return field, why, top_k, 1


def _top_k(router: nn.Module, count: int) -> int:
    """Experts per token, from the shapes a meta-device router returns."""
    p = next(router.parameters())
    x = torch.zeros(2, p.shape[1], device=p.device, dtype=p.dtype)
    with torch.no_grad():
        found = routes(router(x))
    return int(found[1].shape[1]) if found is not None else count


def routes(out: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(weights, expert indices), both (tokens, k), from a router's outputs: its one 2-D integer tensor and
    the one float tensor of the same shape; None for any other output."""
    items = list(out) if isinstance(out, (tuple, list)) else [out]
    index = [t for t in items if isinstance(t, torch.Tensor) and not t.is_floating_point() and t.dim() == 2]
    if len(index) != 1:
        return None
    weights = [t for t in items if isinstance(t, torch.Tensor) and t.is_floating_point()
               and tuple(t.shape) == tuple(index[0].shape)]
    return (weights[0], index[0]) if len(weights) == 1 else None


@torch.no_grad()
def _random_router(router: nn.Module) -> nn.Module:
    """``router`` (a meta-device module) on the CPU in float32, every parameter and buffer random."""
    source = router.to_empty(device="cpu").float()
    gen = torch.Generator().manual_seed(1)
    for t in list(source.parameters()) + list(source.buffers()):
        t.data.copy_(torch.randn(t.shape, generator=gen) * 0.1)
    return source


@torch.no_grad()
def _routing_differs(source: nn.Module, twin: nn.Module, count: int, blocks: int) -> str:
    """Why routing with one expert of each of ``blocks`` equal blocks masked differs from the router built
    for that many experts fewer ("" if equal)."""
    size = count // blocks
    gone = [b * size + size // 2 for b in range(blocks)]
    keep = torch.tensor([e for e in range(count) if e not in gone])
    twin = twin.to_empty(device="cpu").float()
    for name, t in list(twin.named_parameters(recurse=False)) + list(twin.named_buffers(recurse=False)):
        src = getattr(source, name)
        t.data.copy_(src[keep] if src.dim() >= 1 and src.shape[0] == count else src)
    hidden = next(source.parameters()).shape[1]
    x = torch.randn(PROBE_TOKENS, hidden, generator=torch.Generator().manual_seed(0))
    dead = torch.zeros(count, dtype=torch.bool)
    dead[torch.tensor(gone)] = True
    try:
        with _Mask(dead):
            masked = routes(source(x))
        smaller = routes(twin(x))
    except Exception as e:  # noqa: BLE001 - a router that cannot run the probe is not offered expert groups
        return (f"the router the config builds for one expert fewer does not run as this one does ({type(e).__name__}: "
                f"{e}), so fewer experts cannot be routed the same way")
    if masked is None or smaller is None:
        return "the router does not return per-token expert weights and indices, so its routing cannot be checked"
    a = torch.zeros(PROBE_TOKENS, count).scatter_add_(1, masked[1], masked[0].float())
    b = torch.zeros(PROBE_TOKENS, count).scatter_add_(1, keep[smaller[1]], smaller[0].float())
    if not torch.allclose(a, b, rtol=1e-5, atol=1e-6) or bool(a[:, gone].any()):
        return ("the router built for one expert fewer does not route as this one does with that expert left out "
                "(group-limited routing, say), so removed experts would change the routing of the others")
    return ""


class _Mask(TorchFunctionMode):
    """Inside a router's forward: the logits of dead experts become the smallest float, and top-k never
    picks them (the logits and the top-k inputs are the tensors whose last dimension is the expert count)."""

    def __init__(self, dead: torch.Tensor):
        super().__init__()
        self.dead = dead

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        n = self.dead.shape[0]
        if func in (torch.topk, torch.Tensor.topk) and args and args[0].shape[-1] == n:
            x = args[0]
            args = (x.masked_fill(self.dead.to(x.device), float("-inf")), *args[1:])
        out = func(*args, **kwargs)
        if func is torch.nn.functional.linear and isinstance(out, torch.Tensor) and out.shape[-1] == n:
            out = out.masked_fill(self.dead.to(out.device), torch.finfo(out.dtype).min)
        return out


@torch.no_grad()
def dead_experts(rows: list[torch.Tensor], weights: list[torch.Tensor], top_k: int) -> torch.Tensor:
    """Which experts of one block are removed, given its router rows and expert weights: router rows and
    weights all zero, the lowest-numbered of them readmitted where fewer than top k would stay."""
    count = rows[0].shape[0]
    dead = torch.ones(count, dtype=torch.bool)
    for t in rows:
        dead &= (t.detach().reshape(count, -1) == 0).all(1).cpu()
    for e in torch.nonzero(dead).flatten().tolist():  # only the few candidates' weights are read
        if any(bool(w[e].any()) for w in weights):
            dead[e] = False
    extra = top_k - int((~dead).sum())
    if extra > 0:
        for e in torch.nonzero(dead).flatten().tolist()[:extra]:
            dead[e] = False
    return dead


class RoutingHandle:
    """What :func:`route_around_removed_experts` returns: ``remove()`` takes the routing change off."""

    def __init__(self, handles: list):
        self._handles = handles

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def route_around_removed_experts(model: nn.Module, space: PruningSpace) -> RoutingHandle:
    """Make ``model`` (the space's model) route no token to an expert whose group is zero, so that the
    zeroed model computes what its sub-network computes. Forward hooks on the MoE blocks and their routers;
    the weights are not touched. Returns a handle whose ``remove()`` takes them off.

    The hooks read the weights through the module they run on (names relative to the MoE block), so a copy
    of the model (a distillation teacher, an export's merged copy) routes around its own zeroed experts."""
    handles = []
    masks: dict[int, _Mask] = {}  # id(router module) -> the mask its running forward uses
    for gs in space.sets:
        if gs.kind != "expert" or not gs.prunable or not isinstance(gs.info, ExpertInfo):
            continue
        info = gs.info
        block_path = info.block
        rel = len(block_path) + 1
        router_rel = info.router[rel:]
        rows_rel = [n[rel:] for n in info.router_params]
        weights_rel = [n[rel:] for n in info.weights]
        block = model.get_submodule(block_path)
        pending: dict[int, torch.Tensor] = {}  # id(router module) -> dead experts, set by its block's hook

        def before_block(module, _args, router_rel=router_rel, rows_rel=rows_rel, weights_rel=weights_rel,
                         top_k=info.top_k, pending=pending):
            own = dict(module.named_parameters())
            dead = dead_experts([own[n] for n in rows_rel], [own[n] for n in weights_rel], top_k)
            pending[id(module.get_submodule(router_rel))] = dead

        def enter(module, _args, pending=pending):
            dead = pending.get(id(module))
            if dead is not None and bool(dead.any()):
                masks[id(module)] = _Mask(dead)
                masks[id(module)].__enter__()

        def leave(module, _args, _out):
            mask = masks.pop(id(module), None)
            if mask is not None:
                mask.__exit__(None, None, None)

        handles.append(block.register_forward_pre_hook(before_block))
        router = model.get_submodule(info.router)
        handles.append(router.register_forward_pre_hook(enter))
        handles.append(router.register_forward_hook(leave, always_call=True))
    return RoutingHandle(handles)
