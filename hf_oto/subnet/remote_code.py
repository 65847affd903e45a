"""Per-layer dimensions for a pruned Hugging Face model.

This file is self-contained on purpose: hf_oto builds its in-memory sub-networks with it, and copies
it verbatim into exported repos whose layers differ in size, where it runs with only torch and
transformers installed (``trust_remote_code=True``). It holds no model code: each decoder layer is
the architecture's own class, built from a copy of the config with that layer's head counts and
widths. The widths come from ``hf_oto_layers`` (hf-oto's own record) or, in a DeciLM/Nemotron-NAS
export, from ``block_configs`` (the per-layer format vLLM and llama.cpp read).
"""

from __future__ import annotations

import copy
import inspect

import transformers
from torch import nn

LAYERS_KEY = "hf_oto_layers"


class _Attrs(dict):
    """A JSON-serialisable dict whose keys also read as attributes (``block.attention.no_op``)."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


def _attrs(value):
    if isinstance(value, dict):
        return _Attrs({k: _attrs(v) for k, v in value.items()})
    if isinstance(value, list):
        return [_attrs(v) for v in value]
    return value


class DeciLMConfig(transformers.LlamaConfig):
    """Llama's config with per-layer ``block_configs`` (DeciLM/Nemotron-NAS): one kv-head count and
    one FFN width per layer, query heads shared by all layers."""

    model_type = "nemotron-nas"

    def __init__(self, *args, block_configs=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.block_configs = _attrs(list(block_configs or []))


def layer_overrides(config) -> list[dict]:
    """Each decoder layer's own config values (an empty dict where the layer is stock)."""
    spec = getattr(config, LAYERS_KEY, None)
    if spec:
        return [dict(o) for o in spec["layers"]]
    blocks = getattr(config, "block_configs", None)
    if not blocks:
        return []
    heads = config.num_attention_heads
    return [{"num_attention_heads": heads,
             "num_key_value_heads": heads // b["attention"]["n_heads_in_group"],
             "intermediate_size": b["ffn"]["intermediate_size"]} for b in blocks]


def flat_config(config):
    """``config`` as stock model code can read it: where this transformers parsed ``per_layer_config``
    into per-layer views, a copy without them (the layers are built here, from ``hf_oto_layers``)."""
    if not getattr(config, "is_heterogeneous", False):
        return config
    flat = copy.deepcopy(config)
    flat.per_layer_config = None
    return flat


def build_layers(model: nn.Module, config) -> nn.Module:
    """Rebuild each decoder layer that has its own dimensions in ``config``."""
    overrides = layer_overrides(config)
    if not overrides:
        return model
    spec = getattr(config, LAYERS_KEY, None)
    path = spec["path"] if spec else "model.layers"
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and path.startswith(prefix + ".") and not hasattr(model, prefix):  # a base model (AutoModel)
        path = path[len(prefix) + 1:]
    layers = model.get_submodule(path)
    for i, values in enumerate(overrides):
        if not values:
            continue
        layer_config = copy.deepcopy(config)
        for key, value in values.items():
            setattr(layer_config, key, value)
        cls = type(layers[i])
        accepts_idx = "layer_idx" in inspect.signature(cls.__init__).parameters
        layers[i] = cls(layer_config, layer_idx=i) if accepts_idx else cls(layer_config)
    return model


def pruned_class(base_class_name: str, config_class: type | None = None) -> type:
    """A subclass of the stock transformers class that applies per-layer dimensions."""
    base = getattr(transformers, base_class_name)

    class HFOTOPruned(base):  # type: ignore[misc, valid-type]
        def __init__(self, config, *args, **kwargs):
            super().__init__(flat_config(config), *args, **kwargs)
            build_layers(self, self.config)

    if config_class is not None:
        HFOTOPruned.config_class = config_class
    # Keep the stock name: transformers looks up checkpoint key renames (e.g. GPT-NeoX's embed_out)
    # by class name.
    HFOTOPruned.__name__ = HFOTOPruned.__qualname__ = base_class_name
    return HFOTOPruned
