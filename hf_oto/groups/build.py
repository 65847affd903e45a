"""Discovery, step 2: turn sites into group sets (the slices each head or channel owns), and copy a
traced layer's sets to the identical layers that were not traced."""

from __future__ import annotations

import torch

from hf_oto.errors import DiscoveryError
from hf_oto.groups import trace as tr
from hf_oto.groups.sites import AttentionSite, FFNSite, common_prefix, layer_of, walk_elementwise
from hf_oto.groups.space import (
    AttentionInfo,
    FFNInfo,
    GroupSet,
    SliceSpec,
)


def replicate(sets: list[GroupSet], layers_path: str, layers, rep_of: list[int]) -> list[GroupSet]:
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
                                s.prunable, s.reason.replace(old, new), info))
            out[-1].prefix = out[-1].prefix.rstrip(".")
    return out


def unrecognised_mlps(trace: tr.Trace, layers_path: str, sets: list[GroupSet], layers: range,
                       shapes) -> list[GroupSet]:
    """An unprunable FFN record, with its reason, for each traced layer whose MLP was not recognised."""
    claimed = {sl.param for gs in sets for sl in gs.slices}
    for site in trace.attention:
        claimed.update(p.param for ps in site.producers.values() for p in ps)
        claimed.update(c.param for c in site.consumers)
    with_mlp = {gs.layer for gs in sets if gs.block == "mlp"}
    by_layer: dict[int, list[tr.WeightOp]] = {}
    for w in trace.weight_ops:
        layer = layer_of(w.param, layers_path)
        if layer in layers and layer not in with_mlp and w.param not in claimed:
            by_layer.setdefault(layer, []).append(w)
    out = []
    for layer, ops in sorted(by_layer.items()):
        reasons = []
        for w in ops:
            frontier = tr.propagate_labels(w.node, tr.output_labels(w))
            if not frontier:
                continue
            found, blocker, _ = walk_elementwise([u for u, _, _ in frontier], trace, frontier[0][2].shape[-1])
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
        prefix = common_prefix([w.module for w in ops]) if len(ops) > 1 else first.module
        reason = f"FFN not recognised: {reasons[0]}, so its channels cannot be mapped"
        out.append(GroupSet(prefix, "ffn_channel", layer, "mlp", fake, _numel(fake, shapes), prunable=False,
                            reason=reason))
    return out


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


def site_sets(site: AttentionSite | FFNSite, shapes) -> list[GroupSet]:
    return _attention_sets(site, shapes) if isinstance(site, AttentionSite) else _ffn_sets(site, shapes)


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


def _attention_sets(site: AttentionSite, shapes) -> list[GroupSet]:
    o, roles, reason = site.o, site.roles, site.reason
    if reason:
        fake = [SliceSpec(o.param, o.in_dim, torch.arange(shapes[o.param][o.in_dim]).view(1, -1))]
        return [GroupSet(site.prefix, "attention_head", site.layer, "attention", fake,
                         _numel(fake, shapes), prunable=False, reason=reason)]
    q_heads, k_heads = roles["q"][0][1], roles["k"][0][1]
    cols = site.o_cols
    n_q, n_kv = len(q_heads), len(k_heads)
    rep = n_q // n_kv
    producers = tuple(sorted({p.param for rs in roles.values() for p, _ in rs}))
    info = AttentionInfo(num_heads=n_q, num_kv_heads=n_kv, head_dim=site.head_dim, producers=producers,
                         consumer=o.param)

    def role(r: str, heads: list[list[int]]) -> list[SliceSpec]:
        """Rows of every per-head producer of role ``r`` for each group of heads (of that role)."""
        return [sl for p, per_head in roles[r] for sl in
                _slices_for(p, "out", [[c for h in hs for c in per_head[h]] for hs in heads], None)]

    def o_of(heads):
        return _slices_for(o, "in", [[c for h in hs for c in cols[h]] for hs in heads], None)

    if rep == 1:
        heads = [[h] for h in range(n_q)]
        sl = _merge(role("q", heads) + role("k", heads) + role("v", heads) + o_of(heads))
        return [GroupSet(site.prefix, "attention_head", site.layer, "attention", sl, _numel(sl, shapes), info=info)]
    kv_heads = [list(range(g * rep, (g + 1) * rep)) for g in range(n_kv)]
    kv_own = [[g] for g in range(n_kv)]
    sl = _merge(role("q", kv_heads) + role("k", kv_own) + role("v", kv_own) + o_of(kv_heads))
    sets = [GroupSet(site.prefix, "kv_group", site.layer, "attention", sl, _numel(sl, shapes), info=info)]
    slots = [[g * rep + j for g in range(n_kv)] for j in range(rep)]
    sq = _merge(role("q", slots) + o_of(slots))
    sets.append(GroupSet(site.prefix, "query_head", site.layer, "attention", sq, _numel(sq, shapes), info=info))
    return sets


def _ffn_sets(site: FFNSite, shapes) -> list[GroupSet]:
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
