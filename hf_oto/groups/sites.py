"""Discovery, step 1: read the traced graph into sites (one attention block or one FFN each), with
the producing and consuming weights of every head and channel."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from hf_oto.errors import DiscoveryError
from hf_oto.groups import trace as tr

RULE_HELP = (
    "If this architecture needs a hand-written rule, register one with "
    "hf_oto.register_rule(model_type, fn), where fn(model) returns the GroupSets of the modules the "
    "trace could not map (see hf_oto/groups/discover.py)."
)


@dataclass
class AttentionSite:
    """One attention block as the trace shows it, before it becomes group sets."""

    layer: int
    prefix: str
    o: tr.WeightOp  # the output projection
    roles: dict[str, list[tuple[tr.WeightOp, list[list[int]]]]]  # "q"/"k"/"v" -> [(producer, channels per head)]
    reason: str = ""  # why its heads cannot be removed ("" when they can)
    o_cols: list[list[int]] | None = None  # input columns of ``o`` per query head
    head_dim: int = 0  # channels of one head in the output projection's input (the value head size)


@dataclass
class FFNSite:
    """One FFN (all experts of an MoE layer) as the trace shows it."""

    layer: int
    prefix: str
    down: tr.WeightOp
    width: int
    rows: dict[tr.WeightOp, list[set[int]]] = field(default_factory=dict)  # producer -> its rows per channel
    experts: bool = False
    reason: str = ""


def layer_of(param: str, layers_path: str) -> int | None:
    head = layers_path + "."
    if not param.startswith(head):
        return None
    return int(param[len(head):].split(".", 1)[0])


def common_prefix(names: list[str]) -> str:
    parts = [n.split(".") for n in names]
    out = []
    for items in zip(*parts, strict=False):  # stops at the shortest name
        if len(set(items)) != 1:
            break
        out.append(items[0])
    return ".".join(out)


def _head_axis(labels: torch.Tensor, seq: int) -> int | None:
    """The dimension of a labelled attention tensor that indexes heads: the one dimension that is not
    batch, sequence or channels. In the (batch, heads, seq, ...) layout, extra dimensions after the
    sequence belong to the channels (rotary embeddings viewed as complex pairs)."""
    inner = range(1, labels.dim() - 1)
    middle = [d for d in inner if labels.shape[d] != seq]
    if len(middle) == 1:
        return middle[0]
    seq_dims = [d for d in inner if labels.shape[d] == seq]
    if len(seq_dims) == 1 and middle and middle[0] < seq_dims[0] < min(middle[1:], default=labels.dim()):
        return middle[0]
    return None


def _head_sets(frontier, seq: int) -> list[list[int]] | None:
    """Channel lists per head from labelled frontier tensors; None if heads are not split yet.
    Label -1 marks elements that come from elsewhere (a created tensor the channels were written into)."""
    per_head: list[set[int]] | None = None
    for _, labels in frontier:
        if labels.numel() == 0:  # an empty pass-through slice (e.g. rotary over the whole head)
            continue
        if labels.dim() < 3:
            return None
        axis = _head_axis(labels, seq)
        if axis is None:
            return None
        moved = labels.movedim(axis, 0).reshape(labels.shape[axis], -1)
        heads: list[tuple[int, ...]] = []
        for row in moved:
            key = tuple(sorted(set(row.tolist()) - {-1}))
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


def attention_sites(trace: tr.Trace, layers_path: str, config) -> list[AttentionSite]:
    sites = []
    for site in trace.attention:
        if len(site.consumers) != 1:
            continue
        o = site.consumers[0]
        layer = layer_of(o.param, layers_path)
        if layer is None:
            continue
        prefix = common_prefix([w.param for ps in site.producers.values() for w in ps] + [o.param])
        roles: dict[str, list[tuple[tr.WeightOp, list[list[int]]]]] = {}
        reason = ""
        for role, producers in site.producers.items():
            if not producers:
                raise DiscoveryError(f"{prefix}: no weight produces the attention {role} input. {RULE_HELP}")
            entry_node, entry_pos = site.entries[role]
            entry_arg = entry_node.args[entry_pos]
            ancestors = _ancestors(entry_arg, trace)
            found = []
            for prod in producers:
                frontier = [
                    (u, lab) for u, n, lab in tr.propagate_labels(prod.node, tr.output_labels(prod))
                    if (u in ancestors and u is not entry_node) or (u is entry_node and n is entry_arg)
                ]
                heads = _head_sets(frontier, trace.seq_len)
                if heads is None:
                    ops = sorted({str(u.target) for u, _ in frontier})
                    reason = reason or (
                        f"{prod.module}: {', '.join(ops)} mixes channels of several heads before they are "
                        "split, so a head cannot be removed without changing the others"
                    )
                    heads = []
                found.append((prod, heads))
            # A producer seen as one head while the others split into several is broadcast to every
            # head (MLA's shared rotary key): it is left out of the roles, so it stays whole.
            n = max(len(h) for _, h in found)
            roles[role] = [(p, h) for p, h in found if len(h) == n or n <= 1]
            if any(0 < len(h) != n and len(h) != 1 for _, h in found):
                reason = reason or (f"{prefix}: the weights producing the attention {role} input split into "
                                    f"{sorted({len(h) for _, h in found})} heads, so heads cannot be removed safely")
        if reason:
            sites.append(AttentionSite(layer, prefix, o, roles, reason))
            continue
        q_heads, k_heads, v_heads = (roles[r][0][1] for r in ("q", "k", "v"))
        n_q, n_kv = len(q_heads), len(k_heads)
        equal = all(len({len(h) for h in heads}) == 1 for rs in roles.values() for _, heads in rs)
        if n_kv != len(v_heads) or n_q % max(n_kv, 1) or not equal:
            reason = (
                f"{prefix}: the traced graph splits q/k/v into {n_q}/{n_kv}/{len(v_heads)} heads that do not "
                "form equal query groups per kv head (k and v are selected in a way the label propagation "
                "does not follow), so heads cannot be removed safely"
            )
            sites.append(AttentionSite(layer, prefix, o, roles, reason))
            continue
        head_dim = sum(len(heads[0]) for _, heads in roles["v"])  # a head's width in the output projection
        _check_head_config(prefix, config, n_q, n_kv)
        cols = _o_columns(site, o, n_q, head_dim)
        if cols is None:
            reason = f"{o.module}: the attention output is transformed before {o.module} reads it"
        sites.append(AttentionSite(layer, prefix, o, roles, reason, cols, head_dim))
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
        if n.op == "call_function" and n.target not in tr.CREATION_OPS:
            stack.extend(tr.node_inputs(n))
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


def ffn_sites(trace: tr.Trace, layers_path: str) -> list[FFNSite]:
    attention_ops = set()
    for site in trace.attention:
        for ps in site.producers.values():
            attention_ops.update(p.node for p in ps)
    by_consumer: dict[fx.Node, list] = {}
    for w in trace.weight_ops:
        if w.node in attention_ops or layer_of(w.param, layers_path) is None:
            continue
        frontier = tr.propagate_labels(w.node, tr.output_labels(w))
        if not frontier:
            continue
        width = frontier[0][2].shape[-1]
        found, blocker, visited = walk_elementwise([u for u, _, _ in frontier], trace, width)
        if blocker is not None or len(found) != 1:
            continue
        by_consumer.setdefault(next(iter(found)).node, []).append((w, frontier, visited))
    sites = []
    for node, producers in by_consumer.items():
        down = trace.by_node[node]
        layer = layer_of(down.param, layers_path)
        width = node.args[[i for i, a in enumerate(node.args) if a is down.data_input][0]].meta["val"].shape[-1]
        prefix = common_prefix([w.param for w, _, _ in producers] + [down.param])
        foreign = _foreign_input(producers, width)
        if foreign is not None:
            reason = (f"FFN not recognised: {down.module} also reads {foreign}, which hf-oto does not treat as "
                      "element-wise, so its channels cannot be mapped")
            sites.append(FFNSite(layer, prefix, down, width, reason=reason))
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
        sites.append(FFNSite(layer, prefix, down, width, rows, experts=down.expert_dim is not None))
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


def walk_elementwise(starts, trace: tr.Trace, width: int) -> tuple[set, str | None, set]:
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
