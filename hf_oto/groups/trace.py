"""Trace the real forward pass on the meta device and read, from the graph, which weights feed which.

The trace is a ``torch.export`` program of a meta-device twin of the model (no weights are
materialised). From it we extract:

* weight ops: each op that multiplies by a >=2-D parameter, with the parameter's output and input
  dimensions (followed through transposes) and its bias;
* attention sites: ``scaled_dot_product_attention`` calls, or the eager pattern
  ``matmul -> softmax -> matmul``, with the weight ops that produce q, k and v and the ones that
  consume the output;
* channel maps: by running the traced shape ops (view, split, chunk, transpose, ...) on integer label
  tensors we learn which output channels of a producer land in which head, including fused qkv
  layouts, without knowing the model's code.
"""

from __future__ import annotations

import operator
from collections import deque
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from hf_oto.errors import DiscoveryError

aten = torch.ops.aten

# Ops that only move, split or re-type data: labels are computed through them exactly.
SHAPE_OPS = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
    aten.t.default, aten.permute.default, aten.split.Tensor, aten.split_with_sizes.default,
    aten.chunk.default, aten.unbind.int, aten.slice.Tensor, aten.select.int, aten.unsqueeze.default,
    aten.squeeze.dim, aten.squeeze.dims, aten.expand.default, aten.flatten.using_ints,
    aten.narrow.default, operator.getitem, aten.slice_scatter.default, aten.select_scatter.default,
}
# Ops that make a new tensor and read their tensor argument for its shape and dtype only (no data
# flows through them): MLA builds its keys in ``new_empty`` and fills slices of it in place.
CREATION_OPS = {
    aten.new_empty.default, aten.new_zeros.default, aten.new_ones.default, aten.new_full.default,
    aten.empty_like.default, aten.zeros_like.default, aten.ones_like.default, aten.full_like.default,
    aten.empty.memory_format, aten.zeros.default, aten.ones.default, aten.full.default,
}
# In-place writes into one view of a new tensor, rewritten as the functional op that has the same result.
_SCATTER_OF = {aten.slice.Tensor: aten.slice_scatter.default, aten.select.int: aten.select_scatter.default}
# Ops that keep every element where it is: labels pass through unchanged.
IDENTITY_OPS = {
    aten.clone.default, aten.alias.default, aten.detach.default, aten._to_copy.default,
    aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.dropout.default,
    aten.contiguous.default, aten.lift_fresh_copy.default,
}
# Element-wise ops allowed between an FFN's producers and its consumer: every activation in
# transformers.activations traces to these (tests/test_discovery_archs.py audits that), except PReLU,
# whose weight may hold one value per channel.
ELEMENTWISE_OPS = IDENTITY_OPS | {
    aten.mul.Tensor, aten.mul.Scalar, aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar,
    aten.div.Tensor, aten.div.Scalar, aten.rsub.Scalar, aten.neg.default, aten.abs.default, aten.sign.default,
    aten.silu.default, aten.gelu.default, aten.tanh.default, aten.sigmoid.default, aten.relu.default,
    aten.erf.default, aten.erfc.default, aten.exp.default, aten.expm1.default, aten.log.default,
    aten.log1p.default, aten.sqrt.default, aten.rsqrt.default, aten.reciprocal.default, aten.square.default,
    aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor, aten.pow.Scalar, aten.sin.default, aten.cos.default,
    aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default, aten.clip.default,
    aten.hardtanh.default, aten.hardswish.default, aten.hardsigmoid.default, aten.leaky_relu.default,
    aten.elu.default, aten.selu.default, aten.celu.default, aten.mish.default, aten.softplus.default,
    aten.minimum.default, aten.maximum.default, aten.min.other, aten.max.other, aten.where.self,
    aten.gt.Scalar, aten.ge.Scalar, aten.lt.Scalar, aten.le.Scalar, aten.eq.Scalar,
}
SCALAR_ARITH = {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.add.Tensor, aten.sub.Tensor}
IGNORED = {aten._assert_tensor_metadata.default}


@dataclass(eq=False)
class WeightOp:
    """An op that multiplies activations by a parameter."""

    node: fx.Node
    param: str
    out_dim: int  # dimension of the parameter that indexes output channels
    in_dim: int  # dimension that indexes input channels
    bias: str | None
    expert_dim: int | None  # leading expert dimension of a 3-D weight, if any
    data_input: fx.Node

    @property
    def module(self) -> str:
        return self.param.rsplit(".", 1)[0]


@dataclass
class AttentionSite:
    node: fx.Node  # the op whose output is the attention result
    entries: dict[str, tuple[fx.Node, int]]  # role -> (op, argument position)
    producers: dict[str, list[WeightOp]] = field(default_factory=dict)
    consumers: list[WeightOp] = field(default_factory=list)


@dataclass
class Trace:
    graph: fx.Graph
    weight_ops: list[WeightOp]
    by_node: dict[fx.Node, WeightOp]
    attention: list[AttentionSite]
    seq_len: int


class _Wrapper(nn.Module):
    def __init__(self, model: nn.Module, causal: bool):
        super().__init__()
        self.model = model
        self.causal = causal

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.causal:
            return self.model(input_ids=input_ids, use_cache=False)[0]
        return self.model(input_ids=input_ids)[0]


def _pick_seq_len(config) -> int:
    taken = {v for v in config.to_dict().values() if isinstance(v, int) and not isinstance(v, bool)}
    for s in (7, 11, 13, 17, 19, 23, 29, 31, 37):
        if s not in taken:
            return s
    return 41


def trace_model(meta_model: nn.Module, causal: bool) -> Trace:
    """Export ``meta_model`` (already on the meta device) and index its weight ops."""
    seq = _pick_seq_len(meta_model.config)
    ids = torch.zeros(1, seq, dtype=torch.long, device="meta")
    try:
        ep = torch.export.export(_Wrapper(meta_model, causal).eval(), (ids,), strict=False)
    except Exception as exc:  # noqa: BLE001 - re-raised with context
        raise DiscoveryError(
            f"could not trace the forward pass of {type(meta_model).__name__} with torch.export "
            f"on the meta device: {type(exc).__name__}: {exc}"
        ) from exc
    graph = ep.graph_module.graph
    _functionalize_view_writes(graph)
    to_param = {k: v.removeprefix("model.") for k, v in ep.graph_signature.inputs_to_parameters.items()}
    placeholders = {n: to_param[n.name] for n in graph.nodes if n.op == "placeholder" and n.name in to_param}

    weight_ops = []
    for node in graph.nodes:
        if node.op != "call_function" or node.target in SHAPE_OPS or node.target in IGNORED:
            continue
        op = _as_weight_op(node, placeholders)
        if op is not None:
            weight_ops.append(op)
    by_node = {w.node: w for w in weight_ops}
    sites = _attention_sites(graph)
    for site in sites:
        for role, (op, pos) in site.entries.items():
            site.producers[role] = _producers(op.args[pos], by_node)
        site.consumers = _consumers(site.node, by_node)
    return Trace(graph, weight_ops, by_node, sites, seq)


def _functionalize_view_writes(graph: fx.Graph) -> None:
    """Rewrite ``buf[..., a:b].copy_(x)`` (``buf`` made by a creation op) as ``buf2 = slice_scatter(buf, x)``
    and point the later readers of ``buf`` at ``buf2``: the graph then says where the written data goes.

    The graph is only read, never run, so the new nodes carry the shape metadata the readers use.
    """
    order = {n: i for i, n in enumerate(graph.nodes)}  # original positions (new nodes are never readers)
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten.copy_.default or node.users:
            continue
        view, src = node.args[0], node.args[1]
        if not isinstance(view, fx.Node) or view.target not in _SCATTER_OF or len(view.users) != 1:
            continue
        base = view.args[0]
        if not isinstance(base, fx.Node) or not _is_created(base) or not isinstance(src, fx.Node):
            continue
        with graph.inserting_after(node):
            written = graph.call_function(_SCATTER_OF[view.target], (base, src, *view.args[1:]))
        written.meta["val"] = base.meta.get("val")
        for user in list(base.users):
            if user is not written and user is not view and order.get(user, -1) > order[node]:
                user.replace_input_with(base, written)


def _is_created(node: fx.Node) -> bool:
    """A tensor made by a creation op, possibly already rewritten by earlier writes."""
    while node.op == "call_function" and node.target in (aten.slice_scatter.default, aten.select_scatter.default):
        node = node.args[0]
    return node.op == "call_function" and node.target in CREATION_OPS


def _param_chain(node, placeholders) -> tuple[str, list[int], bool] | None:
    """If ``node`` is a parameter seen through transposes, return (name, dim order, expert-selected)."""
    perm: list[int] | None = None
    while True:
        if node in placeholders:
            name = placeholders[node]
            return name, perm, False
        if not isinstance(node, fx.Node) or node.op != "call_function":
            return None
        if node.target in (aten.t.default, aten.numpy_T.default, aten.transpose.int, aten.permute.default):
            ndim = len(node.meta["val"].shape)
            order = list(range(ndim))
            if node.target in (aten.t.default, aten.numpy_T.default):
                order = order[::-1]
            elif node.target is aten.transpose.int:
                a, b = (d % ndim for d in node.args[1:3])
                order[a], order[b] = order[b], order[a]
            else:
                order = [d % ndim for d in node.args[1]]
            perm = order if perm is None else [order[p] for p in perm]
            node = node.args[0]
            continue
        if node.target in IDENTITY_OPS:
            node = node.args[0]
            continue
        return None


def _as_weight_op(node: fx.Node, placeholders) -> WeightOp | None:
    if node.target is aten.embedding.default:
        return None
    found = []
    for pos, arg in enumerate(node.args):
        chain = _param_chain(arg, placeholders) if isinstance(arg, fx.Node) else None
        if chain is not None:
            found.append((pos, arg, chain))
    weights = [f for f in found if len(f[1].meta["val"].shape) >= 2]
    if len(weights) != 1:
        return None
    pos, arg, (name, perm, _) = weights[0]
    ndim = len(arg.meta["val"].shape)
    perm = perm if perm is not None else list(range(ndim))
    # `perm[k]` is the parameter dimension that appears at position k of the op's argument.
    if node.target is aten.linear.default:
        out_dim, in_dim = perm[-2], perm[-1]
    else:  # matmul convention: x @ M, M's last axis indexes outputs
        out_dim, in_dim = perm[-1], perm[-2]
    data = [a for p, a in enumerate(node.args) if isinstance(a, fx.Node) and p != pos and a not in placeholders]
    data = [a for a in data if _param_chain(a, placeholders) is None]
    if not data:
        return None
    out_val = node.meta.get("val")
    w_shape = arg.meta["val"].shape
    if out_val is None or not hasattr(out_val, "shape"):
        return None
    # The op's output must carry the weight's output channels in its last dimension.
    out_size = w_shape[[k for k in range(ndim) if perm[k] == out_dim][0]]
    if out_val.shape[-1] != out_size:
        return None
    bias = None
    for p, a, (bname, _, _) in found:
        if p != pos and len(a.meta["val"].shape) == 1 and a.meta["val"].shape[0] == out_size:
            bias = bname
    expert_dim = 0 if ndim == 3 else None
    return WeightOp(node, name, out_dim, in_dim, bias, expert_dim, data[0])


def _attention_sites(graph: fx.Graph) -> list[AttentionSite]:
    sites = []
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is aten.scaled_dot_product_attention.default:
            sites.append(AttentionSite(node, {"q": (node, 0), "k": (node, 1), "v": (node, 2)}))
        elif node.target in (aten.softmax.int, aten._softmax.default):
            scores = _back_until(node.args[0], {aten.matmul.default, aten.bmm.default})
            probs_users = _forward_until(node, {aten.matmul.default, aten.bmm.default})
            if scores is None or probs_users is None:
                continue
            qk = scores
            if _is_activation_product(qk):
                sites.append(AttentionSite(probs_users, {"q": (qk, 0), "k": (qk, 1), "v": (probs_users, 1)}))
    return sites


def _is_activation_product(node: fx.Node) -> bool:
    return all(isinstance(a, fx.Node) and a.op == "call_function" for a in node.args[:2])


def _back_until(node, targets, limit: int = 12):
    for _ in range(limit):
        if not isinstance(node, fx.Node) or node.op != "call_function":
            return None
        if node.target in targets:
            return node
        tensor_args = [a for a in node.args if isinstance(a, fx.Node)]
        if not tensor_args:
            return None
        node = tensor_args[0]
    return None


def _forward_until(node, targets, limit: int = 6):
    frontier = [node]
    for _ in range(limit):
        nxt = []
        for n in frontier:
            for u in n.users:
                if u.target in targets and u.args[0] is n:
                    return u
                nxt.append(u)
        frontier = nxt
    return None


def _producers(start, by_node) -> list[WeightOp]:
    """Weight ops whose output reaches ``start`` without passing another weight op."""
    found, seen, queue = [], set(), deque([start])
    while queue:
        n = queue.popleft()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        if n in by_node:
            found.append(by_node[n])
            continue
        if n.op == "call_function" and n.target not in CREATION_OPS:
            queue.extend(node_inputs(n))
    return found


def _consumers(start, by_node, limit: int = 64) -> list[WeightOp]:
    """Weight ops that take ``start``'s output as data input, passing no other weight op."""
    found, seen, queue = [], set(), deque([(start, 0)])
    while queue:
        n, depth = queue.popleft()
        if n in seen or depth > limit:
            continue
        seen.add(n)
        for u in n.users:
            if u in by_node and by_node[u].data_input is not None:
                if by_node[u] not in found:
                    found.append(by_node[u])
                continue
            queue.append((u, depth + 1))
    return found


# Label propagation -----------------------------------------------------------------------------
def propagate_labels(start: fx.Node, label: torch.Tensor, stop: set[fx.Node] | None = None):
    """Run the shape ops downstream of ``start`` on integer labels.

    Returns ``frontier``: a list of (node, input, labels) where labelled data enters ``node`` through
    its argument ``input`` and ``node`` is not a pure shape op (the labels describe that input).
    """
    values: dict[fx.Node, object] = {start: label}
    frontier: list[tuple[fx.Node, fx.Node, torch.Tensor]] = []
    queue = deque([start])
    done = set()
    while queue:
        n = queue.popleft()
        for u in list(n.users):
            if u in done or u.op != "call_function" or u.target in IGNORED or u.target in CREATION_OPS:
                continue
            if stop is not None and u in stop:
                frontier.append((u, n, values[n]))
                continue
            if u.target in SHAPE_OPS:
                args = [(values[a] if a in values else _unlabelled(a)) if isinstance(a, fx.Node) else a
                        for a in u.args]
                if any(isinstance(a, fx.Node) for a in args):  # another unlabelled tensor input
                    frontier.append((u, n, values[n]))
                    continue
                values[u] = u.target(*args, **u.kwargs)
            elif u.target in IDENTITY_OPS or (
                u.target in SCALAR_ARITH and not any(isinstance(a, fx.Node) and a is not n for a in u.args)
            ):
                values[u] = values[n]
            else:
                frontier.append((u, n, values[n]))
                continue
            done.add(u)
            queue.append(u)
    return frontier


def _unlabelled(node: fx.Node):
    """-1 labels (no channel) for a freshly created tensor; other unlabelled inputs stay nodes (they stop
    the propagation)."""
    if node.op == "call_function" and node.target in CREATION_OPS:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            return torch.full(tuple(val.shape), -1, dtype=torch.long)
    return node


def output_labels(op: WeightOp) -> torch.Tensor:
    """Labels for a weight op's output: channel index along the last dimension."""
    shape = tuple(op.node.meta["val"].shape)
    return torch.arange(shape[-1]).expand(shape).contiguous()


def node_inputs(n: fx.Node) -> list[fx.Node]:
    """The graph nodes among ``n``'s positional arguments (lists of nodes, as ``cat`` takes, unpacked)."""
    out: list[fx.Node] = []
    for a in n.args:
        if isinstance(a, fx.Node):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(x for x in a if isinstance(x, fx.Node))
    return out
