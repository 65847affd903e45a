"""discover_groups: the model config proposes, the traced graph confirms, the result is a PruningSpace."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from hf_oto.errors import DiscoveryError
from hf_oto.groups import trace as tr
from hf_oto.groups.space import (
    AttentionInfo,
    FFNInfo,
    GroupSet,
    PruningSpace,
    SliceSpec,
    find_decoder_layers,
    layer_relative,
)

# Config fields that may hold an FFN width. Which one sets which FFN is confirmed by a probe.
FFN_WIDTH_FIELDS = (
    "intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size", "moe_intermediate_size",
    "shared_expert_intermediate_size", "decoder_ffn_dim",
)
RULE_HELP = (
    "If this architecture needs a hand-written rule, register one with "
    "hf_oto.register_rule(model_type, fn), where fn(model) returns the GroupSets of the modules the "
    "trace could not map (see hf_oto/groups/discover.py)."
)

_RULES: dict[str, Callable[[nn.Module], list[GroupSet]]] = {}


def register_rule(model_type: str, fn: Callable[[nn.Module], list[GroupSet]]) -> None:
    """Register ``fn(model) -> list[GroupSet]`` for ``model_type``; it replaces automatic discovery."""
    _RULES[model_type] = fn


@dataclass
class _AttentionSite:
    """One attention block as the trace shows it, before it becomes group sets."""

    layer: int
    prefix: str
    o: tr.WeightOp  # the output projection
    roles: dict[str, tuple[tr.WeightOp, list[list[int]]]]  # "q"/"k"/"v" -> (producer, channels per head)
    reason: str = ""  # why its heads cannot be removed ("" when they can)
    o_cols: list[list[int]] | None = None  # input columns of ``o`` per query head
    head_dim: int = 0


@dataclass
class _FFNSite:
    """One FFN (all experts of an MoE layer) as the trace shows it."""

    layer: int
    prefix: str
    down: tr.WeightOp
    width: int
    rows: dict[tr.WeightOp, list[set[int]]] = field(default_factory=dict)  # producer -> its rows per channel
    experts: bool = False
    reason: str = ""


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def discover_groups(model: nn.Module) -> PruningSpace:
    """Find the prunable structures of a Hugging Face model (optionally wrapped by peft).

    The config gives head counts, kv heads and widths; a ``torch.export`` trace of a meta-device twin
    shows which weights produce and consume each head and channel. Disagreements raise
    :class:`~hf_oto.errors.DiscoveryError` naming the module.
    """
    base = unwrap_peft(model)
    config = getattr(base, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise DiscoveryError(f"{type(model).__name__} has no Hugging Face config; hf_oto needs a transformers model")
    cfg = config.to_dict()
    if "hf_oto" in cfg:
        raise DiscoveryError(
            "this model was already pruned by hf_oto (its config has an 'hf_oto' entry); "
            "prune the original model instead, or load the pruned one as a new starting point after "
            "removing that entry on purpose"
        )
    model_type = cfg.get("model_type", "?")
    num_layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(num_layers, int):
        raise DiscoveryError(f"config of model_type {model_type!r} has no num_hidden_layers")
    layers_path = _find_layers(base, num_layers)
    # Identical decoder layers are traced once: the twin holds the shortest prefix of layers that
    # contains one layer of every distinct structure; the others copy their representative's groups.
    signatures = [_signature(layer) for layer in base.get_submodule(layers_path)]
    representative: dict[tuple, int] = {}
    for i, sig in enumerate(signatures):
        representative.setdefault(sig, i)
    traced_layers = max(representative.values()) + 1
    twin = _meta_twin(base, config, **_truncated(config, num_layers, traced_layers))
    _check_shapes(base, twin)
    trace = tr.trace_model(twin, causal=_is_causal(base))

    if model_type in _RULES:
        sets = _RULES[model_type](base)
    else:
        sites = _attention_sites(trace, layers_path, config) + _ffn_sites(trace, layers_path)
        if not sites:
            raise DiscoveryError(
                f"found no attention heads or FFN channels in {type(base).__name__} (model_type "
                f"{model_type!r}). {RULE_HELP}"
            )
        twin_shapes = {n: tuple(p.shape) for n, p in twin.named_parameters()}
        sets = []
        for site in sites:
            sets.extend(_site_sets(site, twin_shapes))
        sets += _unrecognised_mlps(trace, layers_path, sets, range(traced_layers), twin_shapes)
        _mark_expressible(sets, base, config, twin_shapes)
        sets += _replicate(sets, layers_path, range(traced_layers, num_layers),
                           [representative[signatures[i]] for i in range(num_layers)])
    sets.sort(key=lambda s: (s.layer, 0 if s.block == "attention" else 1, s.prefix, s.kind))

    renamed = _map_to_model(model, base, sets)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    total = sum(p.numel() for n, p in base.named_parameters() if not _is_adapter_param(n))
    return PruningSpace(
        model_type=model_type,
        sets=renamed,
        param_shapes=shapes,
        config=cfg,
        layers_path=layers_path,
        num_layers=num_layers,
        total_params=total,
    )


# Model plumbing ------------------------------------------------------------------------------
def _find_layers(base: nn.Module, num_layers: int) -> str:
    found = find_decoder_layers(base, num_layers)
    if found is not None:
        return found[0]
    raise DiscoveryError(
        f"no module list of {num_layers} layers (config.num_hidden_layers) in {type(base).__name__}. {RULE_HELP}"
    )


def _signature(layer: nn.Module) -> tuple:
    """Structure of a decoder layer: module classes and parameter shapes, by relative name."""
    mods = tuple((n, type(m).__name__) for n, m in layer.named_modules())
    params = tuple((n, tuple(p.shape)) for n, p in layer.named_parameters())
    return mods, params


def _truncated(config, num_layers: int, keep: int) -> dict:
    """Config overrides for a twin with only the first ``keep`` decoder layers."""
    if keep == num_layers:
        return {}
    out = {"num_hidden_layers": keep}
    for key, value in config.to_dict().items():
        if isinstance(value, list) and len(value) == num_layers:  # per-layer settings, e.g. layer_types
            out[key] = value[:keep]
    return out


def _replicate(sets: list[GroupSet], layers_path: str, layers, rep_of: list[int]) -> list[GroupSet]:
    """Copies of each representative layer's group sets for the layers that were not traced."""
    by_layer: dict[int, list[GroupSet]] = {}
    for s in sets:
        by_layer.setdefault(s.layer, []).append(s)
    out = []
    for i in layers:
        src = rep_of[i]
        old, new = f"{layers_path}.{src}.", f"{layers_path}.{i}."

        def move(name: str, old=old, new=new) -> str:
            return new + name[len(old):] if name.startswith(old) else name

        for s in by_layer.get(src, []):
            info = None if s.info is None else s.info.renamed(move)
            slices = [SliceSpec(move(sl.param), sl.dim, sl.index, sl.expert) for sl in s.slices]
            out.append(GroupSet(move(s.prefix + "."), s.kind, i, s.block, slices, s.params_per_group,
                                s.prunable, s.reason, info))
            out[-1].prefix = out[-1].prefix.rstrip(".")
    return out


def _is_causal(base: nn.Module) -> bool:
    import inspect

    return "use_cache" in inspect.signature(base.forward).parameters


def _meta_twin(base: nn.Module, config, **overrides) -> nn.Module:
    cfg = copy.deepcopy(config)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    cls = type(base)
    impl = "sdpa" if getattr(cls, "_supports_sdpa", False) else "eager"
    with torch.device("meta"):
        try:
            twin = cls._from_config(cfg, attn_implementation=impl)
        except (ValueError, ImportError):
            twin = cls._from_config(cfg, attn_implementation="eager")
    return twin.eval()


def _check_shapes(base: nn.Module, twin: nn.Module) -> None:
    expected = dict(twin.named_parameters())
    for name, p in base.named_parameters():
        if name not in expected:
            continue  # adapter factors, or a layer the twin does not hold (its structure equals a traced one)
        if name in expected and tuple(p.shape) != tuple(expected[name].shape):
            raise DiscoveryError(
                f"parameter {name} has shape {tuple(p.shape)} but the config implies "
                f"{tuple(expected[name].shape)}: the config's dimensions disagree with the weights"
            )


def _layer_of(param: str, layers_path: str) -> int | None:
    head = layers_path + "."
    if not param.startswith(head):
        return None
    return int(param[len(head):].split(".", 1)[0])


def _common_prefix(names: list[str]) -> str:
    parts = [n.split(".") for n in names]
    out = []
    for items in zip(*parts, strict=False):  # stops at the shortest name
        if len(set(items)) != 1:
            break
        out.append(items[0])
    return ".".join(out)


# Attention -----------------------------------------------------------------------------------
def _head_sets(frontier, seq: int) -> list[list[int]] | None:
    """Channel lists per head from labelled frontier tensors; None if heads are not split yet."""
    per_head: list[set[int]] | None = None
    for _, labels in frontier:
        if labels.numel() == 0:  # an empty pass-through slice (e.g. rotary over the whole head)
            continue
        if labels.dim() < 3:
            return None
        middle = [d for d in range(1, labels.dim() - 1) if labels.shape[d] != seq]
        if len(middle) != 1:
            return None
        moved = labels.movedim(middle[0], 0).reshape(labels.shape[middle[0]], -1)
        heads: list[tuple[int, ...]] = []
        for row in moved:
            key = tuple(sorted(set(row.tolist())))
            if not heads or heads[-1] != key:  # repeat_kv repeats a kv head consecutively
                heads.append(key)
        uniq = []
        for h in heads:
            if h not in uniq:
                uniq.append(h)
        if per_head is None:
            per_head = [set(h) for h in uniq]
        elif len(per_head) != len(uniq):
            return None
        else:
            for s, h in zip(per_head, uniq, strict=True):
                s.update(h)
    if per_head is None:
        return None
    return [sorted(s) for s in per_head]


def _attention_sites(trace: tr.Trace, layers_path: str, config) -> list[_AttentionSite]:
    sites = []
    for site in trace.attention:
        if len(site.consumers) != 1:
            continue
        o = site.consumers[0]
        layer = _layer_of(o.param, layers_path)
        if layer is None:
            continue
        prefix = _common_prefix([w.param for ps in site.producers.values() for w in ps] + [o.param])
        roles: dict[str, list] = {}
        reason = ""
        for role, producers in site.producers.items():
            if len(producers) != 1:
                raise DiscoveryError(
                    f"{prefix}: the attention {role} input comes from {len(producers)} weights "
                    f"({[p.param for p in producers]}), expected one. {RULE_HELP}"
                )
            prod = producers[0]
            entry_node, entry_pos = site.entries[role]
            ancestors = _ancestors(entry_node.args[entry_pos], trace)
            entry_arg = entry_node.args[entry_pos]
            frontier = [
                (u, lab) for u, n, lab in tr.propagate_labels(prod.node, tr.output_labels(prod))
                if (u in ancestors and u is not entry_node) or (u is entry_node and n is entry_arg)
            ]
            heads = _head_sets(frontier, trace.seq_len)
            if heads is None:
                ops = sorted({str(u.target) for u, _ in frontier})
                reason = (
                    f"{prod.module}: {', '.join(ops)} mixes channels of several heads before they are "
                    "split, so a head cannot be removed without changing the others"
                )
                heads = []
            roles[role] = (prod, heads)
        if reason:
            sites.append(_AttentionSite(layer, prefix, o, roles, reason))
            continue
        q_heads, k_heads, v_heads = (roles[r][1] for r in ("q", "k", "v"))
        n_q, n_kv = len(q_heads), len(k_heads)
        if n_kv != len(v_heads) or n_q % max(n_kv, 1) or len({len(h) for h in q_heads + k_heads}) != 1:
            reason = (
                f"{prefix}: the traced graph splits q/k/v into {n_q}/{n_kv}/{len(v_heads)} heads that do not "
                "form equal query groups per kv head (k and v are selected in a way the label propagation "
                "does not follow), so heads cannot be removed safely"
            )
            sites.append(_AttentionSite(layer, prefix, o, roles, reason))
            continue
        head_dim = len(q_heads[0])
        _check_head_config(prefix, config, n_q, n_kv)
        cols = _o_columns(site, o, n_q, head_dim)
        if cols is None:
            reason = f"{o.module}: the attention output is transformed before {o.module} reads it"
        sites.append(_AttentionSite(layer, prefix, o, roles, reason, cols, head_dim))
    return sites


def _check_head_config(prefix: str, config, n_q: int, n_kv: int) -> None:
    """The config's head counts must be what the model built from it computes."""
    wrong = []
    expect_q = getattr(config, "num_attention_heads", n_q)
    if expect_q != n_q:
        wrong.append(f"num_attention_heads={expect_q} (the model computes {n_q} query heads)")
    expect_kv = getattr(config, "num_key_value_heads", None) or n_kv
    if expect_kv != n_kv:
        wrong.append(f"num_key_value_heads={expect_kv} (the model computes {n_kv} kv heads)")
    if wrong:
        raise DiscoveryError(
            f"{prefix}: the config says {' and '.join(wrong)}: the config contradicts the model's own code, "
            "which does not read that field as a head count. Fix or remove the field in config.json."
        )


def _ancestors(start, trace: tr.Trace) -> set:
    seen, stack = set(), [start]
    while stack:
        n = stack.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        if n in trace.by_node:
            continue
        if n.op == "call_function":
            for a in n.args:
                if isinstance(a, fx.Node):
                    stack.append(a)
                elif isinstance(a, (list, tuple)):
                    stack.extend(x for x in a if isinstance(x, fx.Node))
    return seen


def _o_columns(site: tr.AttentionSite, o: tr.WeightOp, n_q: int, head_dim: int) -> list[list[int]] | None:
    shape = tuple(site.node.meta["val"].shape)  # (batch, heads, seq, head_dim)
    if len(shape) != 4 or shape[1] != n_q or shape[3] != head_dim:
        return None
    lab = torch.arange(n_q * head_dim).view(1, n_q, 1, head_dim).expand(shape).contiguous()
    frontier = tr.propagate_labels(site.node, lab, stop={o.node})
    at_o = [lab for u, _, lab in frontier if u is o.node]
    if len(at_o) != 1 or len(frontier) != 1:
        return None
    cols = at_o[0].reshape(-1, at_o[0].shape[-1])[0]
    return [torch.nonzero(cols // head_dim == h).flatten().tolist() for h in range(n_q)]


# FFN -----------------------------------------------------------------------------------------
def _ffn_sites(trace: tr.Trace, layers_path: str) -> list[_FFNSite]:
    attention_ops = set()
    for site in trace.attention:
        for ps in site.producers.values():
            attention_ops.update(p.node for p in ps)
    by_consumer: dict[fx.Node, list] = {}
    for w in trace.weight_ops:
        if w.node in attention_ops or _layer_of(w.param, layers_path) is None:
            continue
        frontier = tr.propagate_labels(w.node, tr.output_labels(w))
        if not frontier:
            continue
        width = frontier[0][2].shape[-1]
        found, blocker, visited = _walk_elementwise([u for u, _, _ in frontier], trace, width)
        if blocker is not None or len(found) != 1:
            continue
        by_consumer.setdefault(next(iter(found)).node, []).append((w, frontier, visited))
    sites = []
    for node, producers in by_consumer.items():
        down = trace.by_node[node]
        layer = _layer_of(down.param, layers_path)
        width = node.args[[i for i, a in enumerate(node.args) if a is down.data_input][0]].meta["val"].shape[-1]
        prefix = _common_prefix([w.param for w, _, _ in producers] + [down.param])
        foreign = _foreign_input(producers, width)
        if foreign is not None:
            reason = (f"FFN not recognised: {down.module} also reads {foreign}, which hf-oto does not treat as "
                      "element-wise, so its channels cannot be mapped")
            sites.append(_FFNSite(layer, prefix, down, width, reason=reason))
            continue
        rows: dict[tr.WeightOp, list[set[int]]] = {}
        for w, frontier, _ in producers:
            acc = rows.setdefault(w, [set() for _ in range(width)])
            for _, _, lab in frontier:
                if lab.shape[-1] != width:
                    break
                flat = lab.reshape(-1, width)
                if not bool((flat == flat[0]).all()):
                    break
                for p, r in enumerate(flat[0].tolist()):
                    acc[p].add(r)
        sites.append(_FFNSite(layer, prefix, down, width, rows, experts=down.expert_dim is not None))
    return sites


def _foreign_input(producers, width: int) -> str | None:
    """A channel-wide tensor entering the element-wise region from outside the recognised producers."""
    inside = {w.node for w, _, _ in producers} | {n for _, fr, _ in producers for _, n, _ in fr}
    region = set().union(*(visited for _, _, visited in producers))
    inside |= region
    for node in region:
        for arg in node.args:
            if not isinstance(arg, fx.Node) or arg in inside:
                continue
            val = arg.meta.get("val")
            if isinstance(val, torch.Tensor) and val.dim() > 0 and val.shape[-1] == width:
                return f"{arg.target}" if arg.op == "call_function" else f"{arg.name} ({arg.op})"
    return None


def _walk_elementwise(starts, trace: tr.Trace, width: int) -> tuple[set, str | None, set]:
    """From ``starts`` through element-wise ops: the weight ops reached, the first op that is not
    element-wise (None if every path ends at a weight op), and the element-wise nodes visited."""
    found, seen, stack = set(), set(), list(starts)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in trace.by_node:
            found.add(trace.by_node[n])
            continue
        if n.op == "call_function" and n.target in tr.IGNORED:
            continue
        if n.op != "call_function" or (n.target not in tr.ELEMENTWISE_OPS and n.target not in tr.SHAPE_OPS):
            return found, str(n.target) if n.op == "call_function" else f"the model output ({n.name})", seen
        val = n.meta.get("val")
        if val is None or not hasattr(val, "shape") or val.shape[-1] != width:
            return found, f"{n.target} (which changes the channel dimension)", seen
        stack.extend(n.users)
    return found, None, seen - {w.node for w in found}


def _unrecognised_mlps(trace: tr.Trace, layers_path: str, sets: list[GroupSet], layers: range,
                       shapes) -> list[GroupSet]:
    """An unprunable FFN record, with its reason, for each traced layer whose MLP was not recognised."""
    claimed = {sl.param for gs in sets for sl in gs.slices}
    for site in trace.attention:
        claimed.update(p.param for ps in site.producers.values() for p in ps)
        claimed.update(c.param for c in site.consumers)
    with_mlp = {gs.layer for gs in sets if gs.block == "mlp"}
    by_layer: dict[int, list[tr.WeightOp]] = {}
    for w in trace.weight_ops:
        layer = _layer_of(w.param, layers_path)
        if layer in layers and layer not in with_mlp and w.param not in claimed:
            by_layer.setdefault(layer, []).append(w)
    out = []
    for layer, ops in sorted(by_layer.items()):
        reasons = []
        for w in ops:
            frontier = tr.propagate_labels(w.node, tr.output_labels(w))
            if not frontier:
                continue
            found, blocker, _ = _walk_elementwise([u for u, _, _ in frontier], trace, frontier[0][2].shape[-1])
            if blocker is not None:
                reasons.append(f"{w.module} reaches the next weight through {blocker}, which hf-oto does not treat "
                               "as element-wise")
            elif len(found) > 1:
                reasons.append(f"{w.module} feeds {len(found)} weights, not one down projection")
        if not reasons:
            continue
        first = ops[0]
        width = shapes[first.param][first.out_dim]
        fake = [SliceSpec(first.param, first.out_dim, torch.arange(width).view(1, -1))]
        prefix = _common_prefix([w.module for w in ops]) if len(ops) > 1 else first.module
        reason = f"FFN not recognised: {reasons[0]}, so its channels cannot be mapped"
        out.append(GroupSet(prefix, "ffn_channel", layer, "mlp", fake, _numel(fake, shapes), prunable=False,
                            reason=reason))
    return out


# Group sets ----------------------------------------------------------------------------------
def _slices_for(op: tr.WeightOp, side: str, per_group: list[list[int]], expert: int | None) -> list[SliceSpec]:
    idx = torch.tensor(per_group, dtype=torch.long)
    if side == "out":
        out = [SliceSpec(op.param, op.out_dim, idx, expert)]
        if op.bias is not None:
            out.append(SliceSpec(op.bias, 0 if expert is None else 1, idx, expert))
        return out
    return [SliceSpec(op.param, op.in_dim, idx, expert)]


def _numel(slices: list[SliceSpec], shapes) -> int:
    return sum(s.index.shape[1] * s.per_index_numel(shapes[s.param]) for s in slices)


def _site_sets(site: _AttentionSite | _FFNSite, shapes) -> list[GroupSet]:
    return _attention_sets(site, shapes) if isinstance(site, _AttentionSite) else _ffn_sets(site, shapes)


def _merge(slices: list[SliceSpec]) -> list[SliceSpec]:
    """Merge slices on the same (param, dim, expert) into one wider slice."""
    merged: dict[tuple, SliceSpec] = {}
    for s in slices:
        key = (s.param, s.dim, s.expert)
        if key in merged:
            both = torch.cat([merged[key].index, s.index], dim=1)
            merged[key] = SliceSpec(s.param, s.dim, torch.sort(both, dim=1).values, s.expert)
        else:
            merged[key] = s
    return list(merged.values())


def _attention_sets(site: _AttentionSite, shapes) -> list[GroupSet]:
    o, roles, reason = site.o, site.roles, site.reason
    if reason:
        fake = [SliceSpec(o.param, o.in_dim, torch.arange(shapes[o.param][o.in_dim]).view(1, -1))]
        return [GroupSet(site.prefix, "attention_head", site.layer, "attention", fake,
                         _numel(fake, shapes), prunable=False, reason=reason)]
    (qp, q_heads), (kp, k_heads), (vp, v_heads) = (roles[r] for r in ("q", "k", "v"))
    cols = site.o_cols
    n_q, n_kv = len(q_heads), len(k_heads)
    rep = n_q // n_kv
    info = AttentionInfo(num_heads=n_q, num_kv_heads=n_kv, head_dim=site.head_dim,
                         producers=tuple(sorted({qp.param, kp.param, vp.param})), consumer=o.param)

    def q_of(heads):
        return [[c for h in hs for c in q_heads[h]] for hs in heads]

    def o_of(heads):
        return [[c for h in hs for c in cols[h]] for hs in heads]

    if rep == 1:
        heads = [[h] for h in range(n_q)]
        sl = (_slices_for(qp, "out", q_of(heads), None)
              + _slices_for(kp, "out", [k_heads[h] for h in range(n_q)], None)
              + _slices_for(vp, "out", [v_heads[h] for h in range(n_q)], None)
              + _slices_for(o, "in", o_of(heads), None))
        sl = _merge(sl)
        return [GroupSet(site.prefix, "attention_head", site.layer, "attention", sl, _numel(sl, shapes), info=info)]
    kv_heads = [list(range(g * rep, (g + 1) * rep)) for g in range(n_kv)]
    sl = (_slices_for(qp, "out", q_of(kv_heads), None) + _slices_for(kp, "out", k_heads, None)
          + _slices_for(vp, "out", v_heads, None) + _slices_for(o, "in", o_of(kv_heads), None))
    sl = _merge(sl)
    sets = [GroupSet(site.prefix, "kv_group", site.layer, "attention", sl, _numel(sl, shapes), info=info)]
    slots = [[g * rep + j for g in range(n_kv)] for j in range(rep)]
    sq = _merge(_slices_for(qp, "out", q_of(slots), None) + _slices_for(o, "in", o_of(slots), None))
    sets.append(GroupSet(site.prefix, "query_head", site.layer, "attention", sq, _numel(sq, shapes), info=info))
    return sets


def _ffn_sets(site: _FFNSite, shapes) -> list[GroupSet]:
    down, rows, width = site.down, site.rows, site.width
    if site.reason:
        fake = [SliceSpec(down.param, down.in_dim, torch.arange(width).view(1, -1))]
        return [GroupSet(site.prefix, "ffn_channel", site.layer, "mlp", fake, _numel(fake, shapes), prunable=False,
                         reason=site.reason)]
    experts = range(shapes[down.param][0]) if site.experts else [None]
    producers = tuple(sorted(w.param for w in rows))
    sets = []
    for e in experts:
        sl = []
        for w, acc in rows.items():
            per = [sorted(a) for a in acc]
            if len({len(p) for p in per}) != 1 or not per[0]:
                raise DiscoveryError(f"{site.prefix}: could not map every channel of {w.param} to {down.param}")
            sl += _slices_for(w, "out", per, e)
        sl += _slices_for(down, "in", [[p] for p in range(width)], e)
        sl = _merge(sl)
        kind = "ffn_channel" if e is None else "expert_channel"
        prefix = site.prefix if e is None else f"{site.prefix}.{e}"
        info = FFNInfo(width=width, producers=producers, consumer=down.param, expert=e)
        sets.append(GroupSet(prefix, kind, site.layer, "mlp", sl, _numel(sl, shapes), info=info))
    return sets


# Can the stock config express a smaller structure? ---------------------------------------------
def _mark_expressible(sets: list[GroupSet], base: nn.Module, config, shapes) -> None:
    """Probe 1-layer meta models with changed config fields; record which field sets which width."""
    layer0 = [s for s in sets if s.layer == min(x.layer for x in sets)]
    probed: set[tuple[str, str]] = set()
    for s in layer0:
        if s.block != "mlp" or not s.prunable or (s.kind, layer_relative(s.ffn.consumer)) in probed:
            continue
        key = (s.kind, layer_relative(s.ffn.consumer))
        probed.add(key)
        field_name = _probe_ffn_field(base, config, s)
        for t in sets:
            if t.block == "mlp" and t.prunable and (t.kind, layer_relative(t.ffn.consumer)) == key:
                t.info = dataclasses.replace(t.ffn, field=field_name)
    heads_reason = _probe_heads(base, config, [s for s in layer0 if s.block == "attention" and s.prunable])
    valid = _valid_head_counts(config, [s for s in layer0 if s.block == "attention" and s.prunable])
    for s in sets:
        if s.block == "attention" and valid is not None and s.prunable:
            s.info = dataclasses.replace(s.attention, valid_counts=valid)
        if s.block == "attention" and s.prunable and heads_reason:
            s.prunable = False
            s.reason = heads_reason
        if s.block == "mlp" and s.prunable and s.ffn.field is None:
            s.prunable = False
            s.reason = "no config field sets this FFN width, so a smaller one cannot be saved"


def _probe_model(base, config, **fields):
    try:
        twin = _meta_twin(base, config, num_hidden_layers=1, **fields)
        return {n: tuple(p.shape) for n, p in twin.named_parameters()}
    except Exception:  # noqa: BLE001 - a field value the architecture rejects simply does not express it
        return None


def _layer0_name(param: str) -> str:
    parts = param.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            parts[i] = "0"
            break
    return ".".join(parts)


def _probe_ffn_field(base, config, s: GroupSet) -> str | None:
    consumer = _layer0_name(s.ffn.consumer)
    width = s.ffn.width
    for name in FFN_WIDTH_FIELDS:
        if not hasattr(config, name):
            continue
        current = getattr(config, name)
        if current is not None and current != width:
            continue
        shapes = _probe_model(base, config, **{name: width - 1})
        if shapes is None or consumer not in shapes:
            continue
        dim = s.slices[-1].dim if s.slices[-1].param == s.ffn.consumer else None
        new = shapes[consumer]
        if dim is not None and new[dim] == width - 1:
            return name
    return None


def _valid_head_counts(config, attn_sets: list[GroupSet]) -> tuple[tuple[int, int], ...] | None:
    """(kv heads, query heads per kv head) pairs the config accepts (its own validation decides).

    Some configs check more than the shapes (Llama: ``hidden_size % num_attention_heads == 0``), so
    a head count the model runs with may still be refused when the export is saved or loaded.
    """
    validate = getattr(config, "validate", None)
    attn_sets = [s for s in attn_sets if s.info is not None]  # placeholders of unprunable heads carry none
    if not attn_sets or validate is None or not hasattr(config, "num_attention_heads"):
        return None
    info = attn_sets[0].attention
    n_q, n_kv = info.num_heads, info.num_kv_heads
    gqa = any(s.kind == "kv_group" for s in attn_sets)
    pairs = [(kv, q) for kv in range(1, n_kv + 1) for q in range(1, n_q // n_kv + 1)] if gqa else \
        [(h, 1) for h in range(1, n_q + 1)]
    has_kv = getattr(config, "num_key_value_heads", None) is not None
    ok = []
    for kv, q in pairs:
        cfg = copy.deepcopy(config)
        try:
            cfg.num_attention_heads = kv * q
            if has_kv:
                cfg.num_key_value_heads = kv if gqa else kv * q
            cfg.validate()
        except Exception:  # noqa: BLE001 - the config refuses this count
            continue
        ok.append((kv, q))
    return tuple(ok)


def _probe_heads(base, config, attn_sets: list[GroupSet]) -> str:
    """Why the stock config cannot express fewer heads ("" when it can), from a 1-layer meta probe."""
    if not attn_sets:
        return ""
    info = attn_sets[0].attention
    n_q, n_kv, hd = info.num_heads, info.num_kv_heads, info.head_dim
    rep = n_q // n_kv
    # Fewer heads, same head size: one kv group less (GQA) or one head less (MHA), then smaller counts
    # in case the model itself refuses a count (e.g. hidden_size % heads).
    candidates = [(kv * rep, kv) for kv in range(n_kv - 1, 0, -1)] if n_kv > 1 else \
        [(q, 1) for q in range(n_q - 1, 0, -1)]
    if not candidates:
        return "a single head cannot be removed"
    has_kv = getattr(config, "num_key_value_heads", None) is not None
    shapes = None
    for new_q, new_kv in candidates:
        fields = {"num_attention_heads": new_q}
        if has_kv:
            fields["num_key_value_heads"] = new_kv
        # A config without a settable head_dim (it derives one) is probed without it.
        shapes = _probe_model(base, config, **fields, head_dim=hd) or _probe_model(base, config, **fields)
        if shapes is not None:
            break
    if shapes is None:
        return f"the stock config refuses every smaller head count with head_dim={hd}, so fewer heads cannot be saved"
    o = _layer0_name(info.consumer)
    in_dim = [s.dim for s in attn_sets[0].slices if s.param == info.consumer][0]
    if o in shapes and shapes[o][in_dim] == new_q * hd:
        return ""
    full = _probe_model(base, config) or {}
    producers_shrank = any(shapes.get(n) != full.get(n) for n in map(_layer0_name, info.producers))
    module = o.rsplit(".", 1)[0]
    if not producers_shrank:
        return ("the stock config derives head_dim from hidden_size / num_attention_heads, so fewer heads of the "
                "same size cannot be saved")
    width = shapes.get(o, (None, None))[in_dim]
    return (f"{module}'s input width stays {width} in the stock code when num_attention_heads changes (it is set by "
            f"another field, not num_attention_heads x head_dim), so fewer heads cannot be saved")


# Names in the user's model (peft wrappers, LoRA factors) --------------------------------------
def _is_adapter_param(name: str) -> bool:
    """LoRA factors live in peft's lora_* sub-modules; they are not part of the base model's size."""
    return ".lora_" in name


def _map_to_model(model: nn.Module, base: nn.Module, sets: list[GroupSet]) -> list[GroupSet]:
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
            target = wrapped if isinstance(wrapped, nn.Module) else mod
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


def _is_conv1d(mod: nn.Module) -> bool:
    # transformers' Conv1D stores its weight as (in, out); nn.Linear as (out, in).
    return not isinstance(mod, nn.Linear) and hasattr(mod, "nf")
