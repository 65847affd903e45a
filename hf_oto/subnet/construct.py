"""construct_subnet: slice zeroed groups out of the parameters and the config."""

from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal, TypeVar

import torch
from torch import nn

from hf_oto.errors import ConstructionError
from hf_oto.groups.names import unwrap_peft
from hf_oto.groups.space import (
    EXPERT_MULTIPLE,
    LAYOUTS,
    WHOLE_KINDS,
    AttentionInfo,
    BlockInfo,
    ExpertInfo,
    GroupSet,
    Layout,
    PruningSpace,
    field_tie,
    group_is_zero,
    kept_uniform,
    layer_fields,
    layer_relative,
)
from hf_oto.io import JSONObject
from hf_oto.manifest import Manifest, SetRecord
from hf_oto.subnet.remote_code import LAYERS_KEY, NO_OP_KEY, build_layers


@dataclass
class Subnet:
    """What :func:`construct_subnet` returns: the smaller model and the manifest of what it kept
    (``save_pruned(subnet, out_dir)`` writes both)."""

    model: nn.Module
    manifest: Manifest


def construct_subnet(model: nn.Module, space: PruningSpace, *,
                     layout: Layout | Literal["auto"] = "global") -> Subnet:
    """Build a new, physically smaller model without the groups whose weights are all zero.

    The result computes exactly what the zeroed ``model`` computes. ``layout="uniform"`` keeps the
    same counts in every layer (zero groups are kept where a layer would otherwise be smaller), so
    the config is the architecture's stock config. ``"global"`` keeps per-layer sizes when they differ
    (the config then lists them, and exports ship remote code); ``"auto"`` is its older name.
    ``"per_layer_ffn"`` keeps attention uniform and FFN widths per layer.
    ``model`` is not modified. Returns a :class:`Subnet`: ``.model`` and its ``.manifest``.
    """
    if layout == "auto":
        layout = "global"
    if layout not in LAYOUTS:
        raise ConstructionError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    base = unwrap_peft(model)
    if base is not model:
        raise ConstructionError(
            "construct_subnet takes a plain transformers model; merge LoRA adapters first "
            "(model.merge_and_unload()) or prune the adapters with hf_oto's trainer export"
        )
    zero = group_is_zero(model, space)
    removed = _removed_groups(space, zero)
    gone, blocks = space.gone_blocks(removed)
    _first_layer_attends(space, removed, gone, blocks)
    _pad_ragged(space, removed, layout, gone, blocks)
    overrides = [o for i, o in enumerate(_layer_overrides(space, removed, blocks)) if i not in gone]

    config = copy.deepcopy(base.config)
    drop_dequantized_marks(config)
    renumber = _drop_layers(config, space.num_layers, gone)
    values: dict[str, set] = defaultdict(set)
    for o in overrides:
        for key, value in o.items():
            if key != NO_OP_KEY:
                values[key].add(value)
    # One value per field: DeepSeek's dense layers set intermediate_size, its MoE layers moe_intermediate_size.
    # A layer without its attention or MLP block is always described per layer.
    uniform = all(len(v) == 1 for v in values.values()) and not blocks
    if uniform:
        for key, value in values.items():
            setattr(config, key, next(iter(value)))
        setattr(config, LAYERS_KEY, None)
    else:
        setattr(config, LAYERS_KEY, {
            "path": space.layers_path,
            "layers": overrides,
            "base_class": type(base).__name__,
        })
    state = _renamed(_without_blocks(_sliced_state(base, space, removed), space, blocks), space.layers_path,
                     renumber)
    new = _build(base, config, state, _renamed({n: n for n, _ in base.named_buffers()}, space.layers_path, renumber))

    manifest = Manifest(
        model_type=space.model_type, params_before=space.total_params,
        params_after=sum(p.numel() for p in new.parameters()), layout="uniform" if uniform else "per-layer",
        sets=tuple(SetRecord(gs.prefix, gs.kind, gs.layer, gs.count,
                             () if gs.layer in gone or (gs.layer, gs.block) in blocks
                             else tuple(j for j in range(gs.count) if j not in rm))
                   for gs, rm in zip(space.sets, removed, strict=True)),
        flops_per_token_before=linear_flops_per_token(base), flops_per_token_after=linear_flops_per_token(new),
    )
    return Subnet(new, manifest)


def kept_indices(space: PruningSpace, manifest: Manifest) -> dict[str, dict[int, torch.Tensor]]:
    """param -> dim -> the indices the sub-network described by ``manifest`` kept there (sorted; slices
    outside an expert dimension): what adapters and quantized codes of the same weights must keep."""
    removed = [set(range(gs.count)) - set(entry.kept) for gs, entry in zip(space.sets, manifest.sets, strict=True)]
    out: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
    for (param, dim, expert), idx in kept_slices(space, removed).items():
        if expert is None:
            out[param][dim] = idx
    return dict(out)


def linear_flops_per_token(model: nn.Module) -> int:
    """Forward FLOPs per token of the weight matmuls: 2 x every >=2-D weight except the input embedding.

    A tied LM head counts once as a matmul. Attention-score FLOPs (which grow with context) are left out.
    """
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    emb_w = getattr(emb, "weight", None)
    total = sum(p.numel() for p in model.parameters() if p.dim() >= 2 and p is not emb_w)
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb_w is not None and out is not None and getattr(out, "weight", None) is emb_w:
        total += emb_w.numel()
    return 2 * total


# Which groups go -------------------------------------------------------------------------------
def _removed_groups(space: PruningSpace, zero: torch.Tensor) -> list[set[int]]:
    removed = []
    for k, gs in enumerate(space.sets):
        if not gs.prunable:
            removed.append(set())
            continue
        off = space.set_offset(k)
        removed.append({j for j in range(gs.count) if bool(zero[off + j])})
    return removed


def removed_layers(space: PruningSpace, removed: list[set[int]]) -> set[int]:
    """The decoder layers that leave the sub-network (see :meth:`PruningSpace.gone_blocks`)."""
    return space.gone_blocks(removed)[0]


def _first_layer_attends(space: PruningSpace, removed: list[set[int]], gone: set[int],
                         blocks: set[tuple[int, str]]) -> None:
    """The first layer that stays keeps an attention block (:data:`hf_oto.groups.depth.FIRST_ATTENTION`):
    where whole layers before it left and its attention was zeroed, the zeroed block stays (exact)."""
    first = min((i for i in range(space.num_layers) if i not in gone), default=None)
    if (first, "attention") in blocks:
        blocks.discard((first, "attention"))
        for gs, rm in zip(space.sets, removed, strict=True):
            if gs.layer == first and gs.block == "attention" and gs.kind in WHOLE_KINDS:
                rm.clear()


def _without_blocks(state: dict[str, torch.Tensor], space: PruningSpace,
                    blocks: set[tuple[int, str]]) -> dict[str, torch.Tensor]:
    """``state`` without the weights of removed attention and MLP blocks (their modules and norms)."""
    heads = tuple(f"{space.layers_path}.{gs.layer}.{m}." for gs in space.sets
                  if (gs.layer, gs.block) in blocks and isinstance(gs.info, BlockInfo)
                  for m in (gs.info.module, *gs.info.norms))
    return {n: t for n, t in state.items() if not n.startswith(heads)} if heads else state


def _keep_at_least_one(gs: GroupSet, gone: set[int]) -> None:
    # Removing an attention or MLP block alone needs a replacement module; one zero group stays (exact).
    # An MoE block keeps top-k experts, the lowest-numbered zeroed ones first (the live model's routing
    # rule: hf_oto.groups.experts.dead_experts).
    keep = gs.info.top_k if isinstance(gs.info, ExpertInfo) else 1
    while gone and gs.count - len(gone) < keep and gs.kind not in WHOLE_KINDS:
        gone.discard(min(gone))


def _pad_ragged(space: PruningSpace, removed: list[set[int]], layout: Layout, gone_layers: set[int],
                gone_blocks: set[tuple[int, str]]) -> None:
    """Re-admit zero groups where a config cannot express different sizes (layers and blocks that leave
    whole do not count)."""
    for gs, gone in zip(space.sets, removed, strict=True):
        _keep_at_least_one(gs, gone)
    for _ in range(2):  # each pass can only re-admit; the second finds the widths the first agreed on
        _tie_fields(space, removed)
        _valid_head_counts(space, removed)
        by_kind: dict[tuple[str, str], list[int]] = defaultdict(list)
        for k, gs in enumerate(space.sets):
            if (kept_uniform(layout, gs.block, gs.kind) and gs.layer not in gone_layers
                    and (gs.layer, gs.block) not in gone_blocks):
                by_kind[(gs.kind, layer_relative(gs.prefix))].append(k)
        for (kind, _), ks in by_kind.items():
            if kind == "expert":
                _same_expert_counts(space, removed, ks)
                continue
            width = max(space.sets[k].count - len(removed[k]) for k in ks)
            for k in ks:
                _readmit(space.sets[k], removed[k], width)


def _same_expert_counts(space: PruningSpace, removed: list[set[int]], ks: list[int]) -> None:
    """A zeroed expert cannot come back (the zeroed model routes no token to it), so the MoE layers must
    have zeroed equally many: one config field counts the experts of every layer."""
    kept = {space.sets[k].prefix: space.sets[k].count - len(removed[k]) for k in ks if space.sets[k].prunable}
    if len(set(kept.values())) > 1:
        raise ConstructionError(
            f"the MoE blocks keep different numbers of experts ({kept}); one config field counts the experts of "
            "every layer, so zero the same number of whole experts in each")
    for k in ks:
        gs = space.sets[k]
        if gs.prunable and gs.info.blocks > 1:
            size = gs.count // gs.info.blocks
            per_block = {b: sum(1 for j in removed[k] if j // size == b) for b in range(gs.info.blocks)}
            if len(set(per_block.values())) > 1:
                raise ConstructionError(
                    f"{gs.prefix} routes within {gs.info.blocks} groups of {size} experts, which must lose equally "
                    f"many (zeroed per group: {list(per_block.values())})")


def _valid_head_counts(space: PruningSpace, removed: list[set[int]]) -> None:
    """Head counts the config refuses (Llama and DeepSeek-V2 check ``hidden_size % num_attention_heads``)
    go up to the smallest count it accepts."""
    blocks: dict[str, dict[str, int]] = defaultdict(dict)
    for k, gs in enumerate(space.sets):
        if gs.block == "attention" and gs.prunable and isinstance(gs.info, AttentionInfo) and gs.info.valid_counts:
            blocks[gs.prefix][gs.kind] = k
    for kinds in blocks.values():
        sets = {kind: space.sets[k] for kind, k in kinds.items()}
        kept = {kind: gs.count - len(removed[kinds[kind]]) for kind, gs in sets.items()}
        info = next(iter(sets.values())).attention
        if "attention_head" in kept:
            now = (kept["attention_head"], 1)
        else:
            now = (kept.get("kv_group", info.num_kv_heads), kept.get("query_head", info.num_heads // info.num_kv_heads))
        if now in info.valid_counts:
            continue
        above = [(kv * q, kv, q) for kv, q in info.valid_counts if kv >= now[0] and q >= now[1]]
        if not above:
            continue
        _, kv, q = min(above)
        for kind, want in (("attention_head", kv), ("kv_group", kv), ("query_head", q)):
            if kind in kinds:
                _readmit(sets[kind], removed[kinds[kind]], want)


def _tie_fields(space: PruningSpace, removed: list[set[int]]) -> None:
    """FFNs of one layer whose widths one config field sets keep one width per unit of that field: a
    layer's experts, and DeepSeek's shared expert (``moe_intermediate_size x n_shared_experts``) with
    them. Expert widths go up to a multiple of :data:`EXPERT_MULTIPLE`."""
    tied: dict[tuple[int, str], list[int]] = defaultdict(list)
    for k, gs in enumerate(space.sets):
        if gs.prunable and field_tie(gs):
            tied[field_tie(gs)].append(k)
    for ks in tied.values():
        sets = [space.sets[k] for k in ks]
        units = max(-(-(gs.count - len(removed[k])) // gs.ffn.per_field) for k, gs in zip(ks, sets, strict=True))
        if any(gs.kind == "expert_channel" for gs in sets):
            units = -(-units // EXPERT_MULTIPLE) * EXPERT_MULTIPLE
        units = min(units, *(gs.count // gs.ffn.per_field for gs in sets))
        for k, gs in zip(ks, sets, strict=True):
            _readmit(gs, removed[k], units * gs.ffn.per_field)


def _readmit(gs: GroupSet, gone: set[int], keep: int) -> None:
    while gs.count - len(gone) < keep:
        gone.discard(min(gone))


def _layer_overrides(space: PruningSpace, removed: list[set[int]], blocks: set[tuple[int, str]]) -> list[JSONObject]:
    overrides: list[JSONObject] = [{} for _ in range(space.num_layers)]
    attn: dict[tuple[int, str], dict[str, int]] = defaultdict(dict)
    for gs, gone in zip(space.sets, removed, strict=True):
        kept = gs.count - len(gone)
        if (gs.layer, gs.block) in blocks:
            if isinstance(gs.info, BlockInfo):
                overrides[gs.layer].setdefault(NO_OP_KEY, {})[gs.info.module] = {
                    "outputs": gs.info.outputs, "norms": list(gs.info.norms), "attention": gs.block == "attention"}
            continue  # the block is gone: its widths say nothing
        if gs.kind in WHOLE_KINDS:
            continue
        if gs.block == "attention" and gs.prunable:
            info = gs.attention
            attn[(gs.layer, gs.prefix)][gs.kind] = kept
            attn[(gs.layer, gs.prefix)]["head_dim"] = info.head_dim
            attn[(gs.layer, gs.prefix)]["kv"] = info.num_kv_heads
            attn[(gs.layer, gs.prefix)]["q"] = info.num_heads
        elif isinstance(gs.info, ExpertInfo) and gs.prunable:
            overrides[gs.layer][gs.info.field] = kept
        elif gs.block == "mlp" and gs.prunable:
            field = gs.ffn.field
            overrides[gs.layer][field] = max(overrides[gs.layer].get(field, 0), kept // gs.ffn.per_field)
    for (layer, _), c in attn.items():
        if "attention_head" in c:
            heads, kv = c["attention_head"], c["attention_head"]
        else:
            kv = c.get("kv_group", c["kv"])
            heads = kv * c.get("query_head", c["q"] // c["kv"])
        overrides[layer]["num_attention_heads"] = heads
        if space.config.get("head_dim") in (None, c["head_dim"]):  # DeepSeek's head_dim is the rotary part
            overrides[layer]["head_dim"] = c["head_dim"]
        if "num_key_value_heads" in space.config:
            overrides[layer]["num_key_value_heads"] = kv
    return overrides


# Slicing the weights ----------------------------------------------------------------------------
def kept_slices(space: PruningSpace, removed: list[set[int]]) -> dict[tuple[str, int, int | None], torch.Tensor]:
    """(param, dim, expert) -> sorted kept indices, for every sliced tensor, given each set's removed groups."""
    gone: dict[tuple[str, int, int | None], set[int]] = defaultdict(set)
    for gs, rm in zip(space.sets, removed, strict=True):
        if gs.kind in WHOLE_KINDS:
            continue  # a removed layer or block leaves whole (_drop_layers, _without_blocks), it is not sliced
        for spec in gs.slices:
            key = (spec.param, spec.dim, spec.expert)
            gone[key]  # noqa: B018 - register the key even when nothing is removed
            for j in rm:
                gone[key].update(spec.index[j].tolist())
    kept = {}
    for (param, dim, expert), rm in gone.items():
        size = space.param_shapes[param][dim]
        kept[(param, dim, expert)] = torch.tensor([i for i in range(size) if i not in rm], dtype=torch.long)
    return kept


@torch.no_grad()
def _sliced_state(base: nn.Module, space: PruningSpace, removed: list[set[int]]) -> dict[str, torch.Tensor]:
    kept = kept_slices(space, removed)
    per_param: dict[str, list[tuple[int, int | None, torch.Tensor]]] = defaultdict(list)
    for (param, dim, expert), idx in kept.items():
        per_param[param].append((dim, expert, idx))
    aliases = _aliases(base)
    rows = _expert_buffer_rows(space, kept)
    state = {}
    for name, tensor in base.state_dict(keep_vars=False).items():
        canonical = aliases.get(name, name)
        t = tensor
        specs = per_param.get(canonical, [])
        experts = {e: (dim, idx) for dim, e, idx in specs if e is not None}
        keep_experts = range(t.shape[0]) if experts else None
        for dim, _, idx in sorted((x for x in specs if x[1] is None), key=lambda x: x[0]):
            if experts and dim == 0:
                keep_experts = idx.tolist()  # whole experts go; their channels are sliced below
            else:
                t = t.index_select(dim, idx.to(t.device))
        if experts:
            dims = {d for d, _ in experts.values()}
            if len(dims) != 1 or len(experts) != t.shape[0]:
                raise ConstructionError(f"{name}: expert slices must cover every expert along one dim")
            t = torch.stack([t[e].index_select(experts[e][0] - 1, experts[e][1].to(t.device)) for e in keep_experts])
        if name in rows:
            t = t.index_select(0, rows[name].to(t.device))
        state[name] = t.clone()
    return state


def _expert_buffer_rows(space: PruningSpace, kept: dict[tuple[str, int, int | None], torch.Tensor]) -> dict:
    """Router buffers with one entry per expert (DeepSeek's score correction) -> the kept experts."""
    out = {}
    for gs in space.sets:
        if isinstance(gs.info, ExpertInfo) and gs.info.buffers:
            idx = kept[(gs.slices[0].param, 0, None)]
            out.update({b: idx for b in gs.info.buffers})
    return out


def _drop_layers(config, num_layers: int, gone: set[int]) -> dict[int, int]:
    """Take removed layers out of ``config`` (the layer count and every per-layer list, such as
    ``layer_types``); returns old layer index -> new index for the layers that stay."""
    if not gone:
        return {i: i for i in range(num_layers)}
    kept = [i for i in range(num_layers) if i not in gone]
    for key, value in layer_fields(config, num_layers, kept).items():
        setattr(config, key, value)
    return {old: new for new, old in enumerate(kept)}


V = TypeVar("V")


def _renamed(named: dict[str, V], layers_path: str, renumber: dict[int, int]) -> dict[str, V]:
    """``named`` with decoder-layer entries moved to their new layer index (removed layers dropped)."""
    head = layers_path + "."
    out = {}
    for name, value in named.items():
        if not name.startswith(head):
            out[name] = value
            continue
        index, _, rest = name[len(head):].partition(".")
        if int(index) in renumber:
            out[f"{head}{renumber[int(index)]}.{rest}"] = value
    return out


def _aliases(base: nn.Module) -> dict[str, str]:
    """state_dict names of tied parameters -> the name named_parameters() reports."""
    first: dict[int, str] = {}
    for name, p in base.named_parameters(remove_duplicate=False):
        first.setdefault(id(p), name)
    out = {}
    for name, p in base.named_parameters(remove_duplicate=False):
        if first[id(p)] != name:
            out[name] = first[id(p)]
    return out


def drop_dequantized_marks(config) -> None:
    """A model loaded from a GGUF file holds plain dequantized weights but keeps ``quantization_config``
    (quant_method "gguf"); the sub-network's config does not carry it, so its export is a plain checkpoint."""
    qc = getattr(config, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    if str(getattr(method, "value", method)) == "gguf":
        del config.quantization_config


def _build(base: nn.Module, config, state: dict[str, torch.Tensor], buffer_source: dict[str, str]) -> nn.Module:
    """The pruned model of ``config`` holding ``state``; ``buffer_source`` maps each of its buffer names
    to the source model's (they differ where layers were removed)."""
    cls = type(base)
    with torch.device("meta"):
        new = cls(config)
        build_layers(new, config)
    result = new.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in result.missing_keys if k not in _tied_names(new)]
    source_buffers = dict(base.named_buffers())
    for name, buf in list(new.named_buffers()):
        if buf.is_meta:  # non-persistent buffers (rotary frequencies, position ids)
            src = buffer_source.get(name, name)
            if src not in source_buffers or source_buffers[src].shape != buf.shape:
                raise ConstructionError(f"buffer {name} of the pruned model could not be filled")
            owner, _, attr = name.rpartition(".")
            module = new.get_submodule(owner) if owner else new
            module.register_buffer(attr, source_buffers[src].clone(), persistent=False)
    if missing or result.unexpected_keys:
        raise ConstructionError(
            f"the pruned {cls.__name__} does not match the sliced weights: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    if getattr(config, "tie_word_embeddings", False):
        new.tie_weights()
    new.train(base.training)
    return new.to(next(base.parameters()).dtype)


def _tied_names(model: nn.Module) -> set[str]:
    names = set()
    seen: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            names.add(name)
        seen.setdefault(id(p), name)
    tied = getattr(model, "_tied_weights_keys", None) or {}
    names.update(tied if isinstance(tied, dict) else tied)
    return names
