"""discover_groups: the model config proposes, the traced graph confirms, the result is a PruningSpace."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from torch import nn

from hf_oto.errors import DiscoveryError
from hf_oto.groups import trace as tr
from hf_oto.groups.build import replicate, site_sets, unrecognised_mlps
from hf_oto.groups.names import is_adapter_param, map_to_model, unwrap_peft
from hf_oto.groups.probe import check_shapes, mark_expressible, meta_twin, truncated
from hf_oto.groups.sites import RULE_HELP, attention_sites, ffn_sites
from hf_oto.groups.space import (
    GroupSet,
    PruningSpace,
    close_ties,
    find_decoder_layers,
    layer_signature,
    representatives,
)

_RULES: dict[str, Callable[[nn.Module], list[GroupSet]]] = {}
# Traces of meta twins, by (class, causal, the twin's full config): a twin is built from nothing else, and the
# trace is only read after it is made, so a model of the same class and config (the job's pre-flight, then its
# trainer; a model reloaded) is not traced again. Bounded: a trace holds a graph of a few thousand nodes.
_TRACES: OrderedDict[tuple, tr.Trace] = OrderedDict()
TRACE_CACHE_SIZE = 8


def _trace(twin: nn.Module, causal: bool) -> tr.Trace:
    key = (type(twin), causal, twin.config.to_json_string(use_diff=False))
    found = _TRACES.get(key)
    if found is None:
        found = _TRACES[key] = tr.trace_model(twin, causal=causal)
        while len(_TRACES) > TRACE_CACHE_SIZE:
            _TRACES.popitem(last=False)
    else:
        _TRACES.move_to_end(key)
    return found


def register_rule(model_type: str, fn: Callable[[nn.Module], list[GroupSet]]) -> None:
    """Register ``fn(model) -> list[GroupSet]`` for ``model_type``; it replaces automatic discovery."""
    _RULES[model_type] = fn


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
    signatures = [layer_signature(layer) for layer in base.get_submodule(layers_path)]
    representative = representatives(signatures)
    traced_layers = max(representative.values()) + 1
    twin = meta_twin(base, config, **truncated(config, num_layers, traced_layers))
    check_shapes(base, twin)
    trace = _trace(twin, _is_causal(base))

    if model_type in _RULES:
        sets = _RULES[model_type](base)
    else:
        sites = attention_sites(trace, layers_path, config) + ffn_sites(trace, layers_path)
        if not sites:
            raise DiscoveryError(
                f"found no attention heads or FFN channels in {type(base).__name__} (model_type "
                f"{model_type!r}). {RULE_HELP}"
            )
        twin_shapes = {n: tuple(p.shape) for n, p in twin.named_parameters()}
        sets = []
        for site in sites:
            sets.extend(site_sets(site, twin_shapes))
        sets += unrecognised_mlps(trace, layers_path, sets, range(traced_layers), twin_shapes)
        mark_expressible(sets, base, config, twin_shapes)
        sets += replicate(sets, layers_path, range(traced_layers, num_layers),
                           [representative[signatures[i]] for i in range(num_layers)])
    sets.sort(key=lambda s: (s.layer, 0 if s.block == "attention" else 1, s.prefix, s.kind))

    renamed = close_ties(map_to_model(model, base, sets))
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    total = sum(p.numel() for n, p in base.named_parameters() if not is_adapter_param(n))
    return PruningSpace(
        model_type=model_type,
        sets=renamed,
        param_shapes=shapes,
        config=cfg,
        layers_path=layers_path,
        num_layers=num_layers,
        total_params=total,
    )


def _find_layers(base: nn.Module, num_layers: int) -> str:
    found = find_decoder_layers(base, num_layers)
    if found is not None:
        return found[0]
    raise DiscoveryError(
        f"no module list of {num_layers} layers (config.num_hidden_layers) in {type(base).__name__}. {RULE_HELP}"
    )


def _is_causal(base: nn.Module) -> bool:
    import inspect

    return "use_cache" in inspect.signature(base.forward).parameters
