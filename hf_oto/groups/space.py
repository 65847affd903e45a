"""The pruning space: every later step (optimizer, sub-network, export) speaks in these groups.

A :class:`GroupSet` holds all groups of one kind inside one module (for example every FFN channel of
layer 3) as index tensors, so a 70B model's millions of channels cost a few tensors, not millions of
Python objects. :class:`Group` is a light view of one member, with a stable human-readable name.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import nn

from hf_oto.io import JSONObject

Kind = Literal["attention_head", "kv_group", "query_head", "ffn_channel", "expert_channel", "expert", "layer",
               "attention_block", "mlp_block"]
KINDS: tuple[str, ...] = get_args(Kind)
# Whole blocks (depth pruning): one group per decoder layer owning every parameter of the layer, of its
# attention block or of its MLP block (the block's module with the norms that only it uses).
WHOLE_KINDS: tuple[str, ...] = ("layer", "attention_block", "mlp_block")
FFN_KINDS: tuple[str, ...] = ("ffn_channel", "expert_channel")  # the kinds whose sets are FFN widths
# Expert widths stay multiples of this (grouped-mm kernels need 16-byte aligned strides).
EXPERT_MULTIPLE = 8
# An "expert" group is one whole routed expert with its router row (:mod:`hf_oto.groups.experts`): it
# overlaps that expert's channels. A "layer" group is a whole decoder layer (depth pruning,
# :mod:`hf_oto.groups.depth`): it owns every parameter of the layer, so it overlaps the layer's heads
# and channels; an "attention_block" or "mlp_block" group overlaps the heads or channels of its block.
Block = Literal["attention", "mlp", "layer"]
# How per-layer sizes may differ, one vocabulary for planner, sub-network and trainer: "uniform" keeps
# equal counts in every layer (the stock config), "per_layer_ffn" keeps attention uniform and lets each
# layer keep its own FFN width (the DeciLM/Nemotron-NAS form vLLM and llama.cpp load), "global" lets
# each layer keep its own counts of everything.
Layout = Literal["uniform", "per_layer_ffn", "global"]
LAYOUTS: tuple[str, ...] = get_args(Layout)


def find_decoder_layers(model: nn.Module, num_layers: int | None) -> tuple[str, nn.ModuleList] | None:
    """(path, module list) of the decoder layers: the first ModuleList with ``num_layers`` entries, or None."""
    if not num_layers:
        return None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == num_layers:
            return name, mod
    return None


def layer_fields(config, num_layers: int, kept: Sequence[int]) -> JSONObject:
    """Config values for a model that keeps only the decoder layers ``kept`` (source indexes, in order):
    ``num_hidden_layers`` and every per-layer list of the config (``layer_types``, say) cut to match."""
    out: JSONObject = {"num_hidden_layers": len(kept)}
    for key, value in config.to_dict().items():
        if isinstance(value, (list, tuple)) and len(value) == num_layers and key != "architectures":
            out[key] = type(value)(value[i] for i in kept)
    return out


def layer_signature(layer: nn.Module) -> tuple:
    """Structure of a decoder layer: module classes and parameter shapes, by relative name."""
    mods = tuple((n, type(m).__name__) for n, m in layer.named_modules())
    params = tuple((n, tuple(p.shape)) for n, p in layer.named_parameters())
    return mods, params


def representatives(signatures: Sequence[tuple]) -> dict[tuple, int]:
    """Each distinct layer signature -> the index of its first layer."""
    out: dict[tuple, int] = {}
    for i, sig in enumerate(signatures):
        out.setdefault(sig, i)
    return out


def field_tie(gs: GroupSet) -> tuple[int, str] | None:
    """(layer, config field) for an FFN set whose width a config field sets (sets with the same key keep
    one width per unit of that field); None for every other set."""
    if gs.block == "mlp" and isinstance(gs.info, FFNInfo) and gs.info.field:
        return gs.layer, gs.info.field
    return None


def close_ties(sets: list[GroupSet]) -> list[GroupSet]:
    """FFN sets of one layer whose width one config field sets (a layer's experts, DeepSeek's shared
    expert with them) are prunable together or not at all: a set that must keep its width keeps the
    field, so the others made unprunable too, with the reason. Returns new set objects where changed."""
    blocked: dict[tuple[int, str], GroupSet] = {}
    for gs in sets:
        if not gs.prunable and field_tie(gs):
            blocked.setdefault(field_tie(gs), gs)
    out = []
    for gs in sets:
        stop = blocked.get(field_tie(gs)) if gs.prunable and field_tie(gs) else None
        if stop is not None:
            why = f"{gs.info.field} also sets the width of {stop.prefix}, which keeps its channels ({stop.reason})"
            gs = dataclasses.replace(gs, prunable=False, reason=why)
        out.append(gs)
    return out


def kept_uniform(layout: str, block: str, kind: str = "") -> bool:
    """Whether ``layout`` keeps the same count in every layer for groups of this block and kind (whole
    layers leave one by one in every layout: a stock config just has fewer of them; every MoE layer keeps
    the same number of experts in every layout, since one config field counts them)."""
    if kind == "expert":
        return True
    if kind in WHOLE_KINDS:
        return False
    return block != "layer" and (layout == "uniform" or (layout == "per_layer_ffn" and block == "attention"))


@dataclass(frozen=True)
class AttentionInfo:
    """Facts about one attention block that later steps need (read from the config and the trace)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    producers: tuple[str, ...]  # the q/k/v weights
    consumer: str  # the output projection's weight
    valid_counts: tuple[tuple[int, int], ...] | None = None  # (kv heads, queries per kv head) the config accepts

    def renamed(self, move: Callable[[str], str]) -> AttentionInfo:
        return dataclasses.replace(self, producers=tuple(map(move, self.producers)), consumer=move(self.consumer))


@dataclass(frozen=True)
class FFNInfo:
    """Facts about one FFN (or one expert of an MoE layer)."""

    width: int
    producers: tuple[str, ...]  # weights whose output channels are the FFN channels
    consumer: str  # the down projection's weight
    expert: int | None = None
    field: str | None = None  # the config field that sets this width (None: no field does)
    per_field: int = 1  # channels per unit of the field (DeepSeek's shared expert: n_shared_experts)

    def renamed(self, move: Callable[[str], str]) -> FFNInfo:
        return dataclasses.replace(self, producers=tuple(map(move, self.producers)), consumer=move(self.consumer))


@dataclass(frozen=True)
class BlockInfo:
    """How a whole attention or MLP block leaves: its module (relative to the decoder layer) gives way to
    a no-op that returns zeros shaped as it returned them (``outputs``: 0 for a bare tensor, n for a tuple
    of n whose first entry is the hidden states), and the norms that only it reads become identities."""

    module: str
    norms: tuple[str, ...] = ()
    outputs: int = 0

    def renamed(self, move: Callable[[str], str]) -> BlockInfo:
        return self


@dataclass(frozen=True)
class ExpertInfo:
    """Facts about the routed experts of one MoE block (module and parameter names as in the space)."""

    count: int
    block: str  # the MoE block: the experts and the router are inside it
    router: str  # the module holding the router weight
    weights: tuple[str, ...]  # expert weights with a leading expert dimension
    router_params: tuple[str, ...]  # router weight (and bias): one row per expert
    buffers: tuple[str, ...] = ()  # router buffers with one entry per expert (DeepSeek's score correction)
    field: str = ""  # the config field that counts the experts
    top_k: int = 1  # experts per token: the fewest a block may keep
    # Group-limited routing (DeepSeek-V3's n_group): experts sit in this many equal consecutive blocks,
    # and leave one from every block at a time, each block keeping at least top_k.
    blocks: int = 1

    def renamed(self, move: Callable[[str], str]) -> ExpertInfo:
        return dataclasses.replace(self, block=move(self.block), router=move(self.router),
                                   weights=tuple(map(move, self.weights)),
                                   router_params=tuple(map(move, self.router_params)),
                                   buffers=tuple(map(move, self.buffers)))


@dataclass(frozen=True)
class SliceSpec:
    """Group ``i`` of a set owns ``param[expert?][..., index[i], ...]`` along ``dim``.

    ``expert`` selects one entry of a leading expert dimension first (3-D MoE weights); ``dim`` then
    counts in the full parameter's dimensions.
    """

    param: str
    dim: int
    index: torch.Tensor  # (num_groups, width), int64
    expert: int | None = None

    def per_index_numel(self, shape: Sequence[int]) -> int:
        numel = 1
        for d, size in enumerate(shape):
            if d != self.dim and not (self.expert is not None and d == 0):
                numel *= size
        return numel


@dataclass
class GroupSet:
    """All groups of one kind owned by one module (e.g. the kv groups of one attention block)."""

    prefix: str  # module path, e.g. "model.layers.3.self_attn"
    kind: Kind
    layer: int
    block: Block  # what disappears when every group of the block is gone
    slices: list[SliceSpec]
    params_per_group: int
    prunable: bool = True
    reason: str = ""
    # Facts the planner and the sub-network step need (head counts, which config field sets a width);
    # None for the placeholder record of a structure that is not prunable.
    info: AttentionInfo | FFNInfo | ExpertInfo | BlockInfo | None = None
    # FFN channels leave in aligned blocks of this many (j // align): set where the consumer's input is
    # quantized in groups of that width (QFA), so a removed block is a whole quantization group.
    align: int = 1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown group kind {self.kind!r}; expected one of {KINDS}")
        counts = {s.index.shape[0] for s in self.slices}
        if len(counts) != 1:
            raise ValueError(f"{self.prefix}.{self.kind}: slices disagree on the number of groups {counts}")

    @property
    def count(self) -> int:
        return self.slices[0].index.shape[0]

    @property
    def attention(self) -> AttentionInfo:
        """The attention facts of a prunable attention set."""
        if not isinstance(self.info, AttentionInfo):
            raise TypeError(f"{self.prefix}.{self.kind} carries no attention facts")
        return self.info

    @property
    def ffn(self) -> FFNInfo:
        """The FFN facts of a prunable FFN or expert set."""
        if not isinstance(self.info, FFNInfo):
            raise TypeError(f"{self.prefix}.{self.kind} carries no FFN facts")
        return self.info

    def name(self, i: int) -> str:
        return f"{self.prefix}.{self.kind}.{i}"


@dataclass(frozen=True)
class Group:
    """One prunable structure: the slices of several tensors that live or die together."""

    name: str
    kind: str
    layer: int
    num_params: int
    prunable: bool
    reason: str
    slices: tuple[tuple[str, int, tuple[int, ...]], ...]  # (param, dim, indices); expert folded into param


@dataclass
class PruningSpace(Sequence[Group]):
    """The ordered list of groups of a model, built by :func:`hf_oto.discover_groups`."""

    model_type: str
    sets: list[GroupSet]
    param_shapes: dict[str, tuple[int, ...]]
    config: JSONObject  # the source config, as a dict
    layers_path: str  # module path of the decoder layer list, e.g. "model.layers"
    num_layers: int
    total_params: int  # every parameter of the source model (adapters excluded)

    def __post_init__(self) -> None:
        self._offsets = [0]
        for s in self.sets:
            self._offsets.append(self._offsets[-1] + s.count)

    # Sequence protocol over individual groups -------------------------------------------------
    def __len__(self) -> int:
        return self._offsets[-1]

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = self.set_of(i)
        gs, j = self.sets[k], i - self._offsets[k]
        return self._group(gs, j)

    def __iter__(self) -> Iterator[Group]:
        for gs in self.sets:
            for j in range(gs.count):
                yield self._group(gs, j)

    def _group(self, gs: GroupSet, j: int) -> Group:
        slices = tuple(
            (s.param if s.expert is None else f"{s.param}[{s.expert}]", s.dim, tuple(s.index[j].tolist()))
            for s in gs.slices
        )
        return Group(gs.name(j), gs.kind, gs.layer, gs.params_per_group, gs.prunable, gs.reason, slices)

    # Queries ---------------------------------------------------------------------------------
    def set_of(self, i: int) -> int:
        """Index of the set that holds flat group ``i``."""
        return bisect.bisect_right(self._offsets, i) - 1

    def set_offset(self, set_index: int) -> int:
        """Position of the first group of ``sets[set_index]`` in the flat group order."""
        return self._offsets[set_index]

    def index_of(self, name: str) -> int:
        """Flat position of the group called ``name``."""
        prefix, _, number = name.rpartition(".")
        head, _, kind = prefix.rpartition(".")
        for k, gs in enumerate(self.sets):
            if gs.prefix == head and gs.kind == kind:
                j = int(number)
                if 0 <= j < gs.count:
                    return self._offsets[k] + j
        raise KeyError(f"no group named {name!r}")

    @property
    def prunable_params(self) -> int:
        """Parameters owned by prunable groups, each counted once: overlapping query heads once per kv
        group, a block whose whole-block group is prunable as all of its parameters, and a layer whose
        whole-layer group is prunable as all of its parameters."""
        width: dict[tuple[int, str], int] = defaultdict(int)
        whole_block: dict[tuple[int, str], int] = {}
        whole: dict[int, int] = {}
        inner = expert_channel_sets(self.sets)
        for k, gs in enumerate(self.sets):
            if not gs.prunable or gs.kind == "query_head":
                continue
            if gs.kind == "layer":
                whole[gs.layer] = gs.params_per_group
            elif gs.kind in WHOLE_KINDS:
                whole_block[(gs.layer, gs.block)] = gs.params_per_group
            elif gs.kind == "expert":  # less what the expert's prunable channels own already
                width[(gs.layer, gs.block)] += gs.count * gs.params_per_group - sum(
                    self.sets[c].count * self.sets[c].params_per_group for c in inner.get(k, {}).values()
                    if self.sets[c].prunable)
            else:
                width[(gs.layer, gs.block)] += gs.count * gs.params_per_group
        per_layer: dict[int, int] = defaultdict(int)
        for key in set(width) | set(whole_block):
            per_layer[key[0]] += whole_block.get(key, width.get(key, 0))
        return sum(whole.get(layer, n) for layer, n in per_layer.items()) + sum(
            n for layer, n in whole.items() if layer not in per_layer)

    def block_sets(self) -> dict[tuple[int, str], int]:
        """(decoder layer, "attention" or "mlp") -> the index of that block's whole-block set."""
        return {(gs.layer, gs.block): k for k, gs in enumerate(self.sets)
                if gs.kind in WHOLE_KINDS and gs.kind != "layer"}

    def layer_sets(self) -> dict[int, int]:
        """Decoder layer -> the index of its whole-layer set (layers without one are absent)."""
        return {gs.layer: k for k, gs in enumerate(self.sets) if gs.kind == "layer"}

    def gone_blocks(self, removed: Sequence[set[int]]) -> tuple[set[int], set[tuple[int, str]]]:
        """Given each set's removed groups: the decoder layers that leave whole (their layer group is
        removed, or both of their blocks are and the layer could leave: it then passes its input
        through), and the (layer, block) pairs removed in the layers that stay."""
        layers = {gs.layer for gs, rm in zip(self.sets, removed, strict=True) if gs.kind == "layer" and rm}
        blocks = {(gs.layer, gs.block) for gs, rm in zip(self.sets, removed, strict=True)
                  if gs.kind in WHOLE_KINDS and gs.kind != "layer" and rm}
        for gs in self.sets:
            if gs.kind == "layer" and gs.prunable and {(gs.layer, "attention"), (gs.layer, "mlp")} <= blocks:
                layers.add(gs.layer)
        return layers, {b for b in blocks if b[0] not in layers}

    def summary(self) -> list[JSONObject]:
        """One row per (layer, kind): counts, params per group, prunable and why not."""
        return [
            {
                "layer": gs.layer,
                "module": gs.prefix,
                "kind": gs.kind,
                "groups": gs.count,
                "params_per_group": gs.params_per_group,
                "prunable": gs.prunable,
                "reason": gs.reason,
            }
            for gs in self.sets
        ]

    def to_json(self) -> str:
        """The pruning space as JSON: model facts and the per-(layer, kind) summary."""
        return json.dumps(
            {
                "model_type": self.model_type,
                "num_layers": self.num_layers,
                "total_params": self.total_params,
                "prunable_params": self.prunable_params,
                "num_groups": len(self),
                "sets": self.summary(),
            },
            indent=2,
        )


def expert_channel_sets(sets: Sequence[GroupSet]) -> dict[int, dict[int, int]]:
    """Index of each ``"expert"`` set -> expert number -> index of that expert's channel set."""
    owner = {}
    for k, gs in enumerate(sets):
        if gs.kind == "expert" and isinstance(gs.info, ExpertInfo):
            owner.update({w: k for w in gs.info.weights})
    out: dict[int, dict[int, int]] = defaultdict(dict)
    for c, gs in enumerate(sets):
        if gs.kind == "expert_channel":
            spec = next(sl for sl in gs.slices if sl.expert is not None)
            if spec.param in owner:
                out[owner[spec.param]][spec.expert] = c
    return dict(out)


def layer_relative(name: str) -> str:
    """A module or parameter path after its layer index ("model.layers.3.mlp.up" -> "mlp.up")."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[i + 1:])
    return name


# Operations on a model through the space ------------------------------------------------------
def _select(param: torch.Tensor, spec: SliceSpec) -> tuple[torch.Tensor, int]:
    if spec.expert is None:
        return param, spec.dim
    return param[spec.expert], spec.dim - 1


@torch.no_grad()
def zero_groups(model: nn.Module, space: PruningSpace, names: Sequence[str]) -> None:
    """Set every slice of the named groups to exactly zero, in place (LoRA factors included)."""
    params = dict(model.named_parameters())
    for name in names:
        i = space.index_of(name)
        k = space.set_of(i)
        gs, j = space.sets[k], i - space.set_offset(k)
        for spec in gs.slices:
            t, dim = _select(params[spec.param], spec)
            t.index_fill_(dim, spec.index[j].to(t.device), 0.0)


@torch.no_grad()
def group_is_zero(model: nn.Module, space: PruningSpace) -> torch.Tensor:
    """Boolean vector over all groups: True where every slice of the group is exactly zero."""
    params = dict(model.named_parameters())
    flags = []
    for gs in space.sets:
        zero = torch.ones(gs.count, dtype=torch.bool)
        for spec in gs.slices:
            t, dim = _select(params[spec.param], spec)
            moved = t.detach().movedim(dim, 0)
            picked = moved.index_select(0, spec.index.flatten().to(t.device))
            picked = picked.reshape(gs.count, -1)
            zero &= (picked == 0).all(dim=1).cpu()
        flags.append(zero)
    return torch.cat(flags) if flags else torch.zeros(0, dtype=torch.bool)
