"""Discovery, step 3: which smaller structures the stock config can express, found by building
meta-device models with changed config fields (the config's own validation decides)."""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from hf_oto.errors import DiscoveryError
from hf_oto.groups.space import GroupSet, layer_fields, layer_relative

# Config fields that may hold an FFN width. Which one sets which FFN is confirmed by a probe.
FFN_WIDTH_FIELDS = (
    "intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size", "moe_intermediate_size",
    "shared_expert_intermediate_size", "decoder_ffn_dim",
)


def truncated(config, num_layers: int, keep: int) -> dict:
    """Config overrides for a twin with only the first ``keep`` decoder layers."""
    return {} if keep == num_layers else layer_fields(config, num_layers, range(keep))


def meta_twin(base: nn.Module, config, **overrides) -> nn.Module:
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


def check_shapes(base: nn.Module, twin: nn.Module) -> None:
    expected = dict(twin.named_parameters())
    for name, p in base.named_parameters():
        if name not in expected:
            continue  # adapter factors, or a layer the twin does not hold (its structure equals a traced one)
        if name in expected and tuple(p.shape) != tuple(expected[name].shape):
            raise DiscoveryError(
                f"parameter {name} has shape {tuple(p.shape)} but the config implies "
                f"{tuple(expected[name].shape)}: the config's dimensions disagree with the weights"
            )


def mark_expressible(sets: list[GroupSet], base: nn.Module, config, shapes) -> None:
    """Probe meta models with changed config fields; record which field sets which FFN width, and
    which head counts the config accepts. Each FFN is probed in a twin that holds its own layer
    (DeepSeek's first layers are dense, the others MoE)."""
    num_layers = config.num_hidden_layers
    found: dict[tuple[str, str], tuple[str, int] | None] = {}
    for s in sets:
        if s.block != "mlp" or not s.prunable:
            continue
        key = (s.kind, layer_relative(s.ffn.consumer))
        if key not in found:
            found[key] = _probe_ffn_field(base, config, s, num_layers)
        if found[key] is None:
            s.prunable = False
            s.reason = "no config field sets this FFN width, so a smaller one cannot be saved"
        else:
            s.info = dataclasses.replace(s.ffn, field=found[key][0], per_field=found[key][1])
    layer0 = [s for s in sets if s.layer == min(x.layer for x in sets)]
    heads = [s for s in layer0 if s.block == "attention" and s.prunable]
    heads_reason = _probe_heads(base, config, heads, num_layers)
    valid = _valid_head_counts(config, heads)
    for s in sets:
        if s.block == "attention" and valid is not None and s.prunable:
            s.info = dataclasses.replace(s.attention, valid_counts=valid)
        if s.block == "attention" and s.prunable and heads_reason:
            s.prunable = False
            s.reason = heads_reason


def _probe_model(base, config, **fields):
    try:
        twin = meta_twin(base, config, **fields)
        return {n: tuple(p.shape) for n, p in twin.named_parameters()}
    except Exception:  # noqa: BLE001 - a field value the architecture rejects simply does not express it
        return None


def _probe_ffn_field(base, config, s: GroupSet, num_layers: int) -> tuple[str, int] | None:
    """(field, channels per unit of the field) that sets this FFN's width, or None. A field may set a
    multiple of its value: DeepSeek's shared expert is ``moe_intermediate_size * n_shared_experts`` wide."""
    consumer, width = s.ffn.consumer, s.ffn.width
    dim = s.slices[-1].dim if s.slices[-1].param == consumer else None
    if dim is None:
        return None
    layers = truncated(config, num_layers, s.layer + 1)  # the twin holds this FFN's layer
    for name in FFN_WIDTH_FIELDS:
        if not hasattr(config, name):
            continue
        current = getattr(config, name)
        if current is None:
            per = 1
        elif isinstance(current, int) and current > 1 and width % current == 0:
            per = width // current
        else:
            continue
        trial = width // per - 1
        shapes = _probe_model(base, config, **layers, **{name: trial})
        if shapes is not None and consumer in shapes and shapes[consumer][dim] == trial * per:
            return name, per
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


def _probe_heads(base, config, attn_sets: list[GroupSet], num_layers: int) -> str:
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
    # A config whose head_dim is another size (DeepSeek's: the rotary part) keeps it; one that derives
    # head_dim from hidden_size is probed with it set, then without.
    keeps_head_dim = getattr(config, "head_dim", None) not in (None, hd)
    one = truncated(config, num_layers, 1)
    shapes = None
    for new_q, new_kv in candidates:
        fields = {"num_attention_heads": new_q, **one}
        if has_kv:
            fields["num_key_value_heads"] = new_kv
        shapes = None if keeps_head_dim else _probe_model(base, config, **fields, head_dim=hd)
        shapes = shapes or _probe_model(base, config, **fields)
        if shapes is not None:
            break
    if shapes is None:
        return f"the stock config refuses every smaller head count with head_dim={hd}, so fewer heads cannot be saved"
    o = info.consumer  # a layer-0 set: the same name in the 1-layer probe
    in_dim = [s.dim for s in attn_sets[0].slices if s.param == info.consumer][0]
    if o in shapes and shapes[o][in_dim] == new_q * hd:
        return ""
    full = _probe_model(base, config, **one) or {}
    producers_shrank = any(shapes.get(n) != full.get(n) for n in info.producers)
    module = o.rsplit(".", 1)[0]
    if not producers_shrank:
        return ("the stock config derives head_dim from hidden_size / num_attention_heads, so fewer heads of the "
                "same size cannot be saved")
    width = shapes.get(o, (None, None))[in_dim]
    return (f"{module}'s input width stays {width} in the stock code when num_attention_heads changes (it is set by "
            f"another field, not num_attention_heads x head_dim), so fewer heads cannot be saved")
