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

import torch
import transformers
from torch import nn

LAYERS_KEY = "hf_oto_layers"
# In a layer's entry of ``hf_oto_layers``: module name -> how that removed block is replaced (NoOpBlock).
NO_OP_KEY = "no_op"


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


class NoOpBlock(nn.Module):
    """A removed attention or MLP block: it returns zeros shaped as the block's output was (a bare tensor,
    or a tuple of ``outputs`` entries whose first is the hidden states and the rest None), which is what
    the block computed with every weight zeroed. A removed attention block still records the sequence
    length in its layer's KV cache (one zero head of width 1; an empty tensor would count as no tokens), so
    each layer's cache answers as a stock layer's does when transformers asks it for the length."""

    def __init__(self, outputs: int = 0, layer_idx: int | None = None):
        super().__init__()
        self.outputs, self.layer_idx = outputs, layer_idx

    def forward(self, *args, **kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        cache = next((kwargs[k] for k in ("cache", "past_key_values", "past_key_value") if kwargs.get(k) is not None),
                     None)
        if self.layer_idx is not None and cache is not None and hasattr(cache, "update"):
            stub = x.new_zeros(x.shape[0], 1, x.shape[1], 1)  # caches count an empty tensor as no tokens
            cache.update(stub, stub, self.layer_idx)
        zeros = torch.zeros_like(x)
        return (zeros,) + (None,) * (self.outputs - 1) if self.outputs else zeros


def remove_blocks(layer: nn.Module, no_op: dict) -> None:
    """Replace the blocks named in ``no_op`` (module name -> {"outputs", "norms", "attention"}) in ``layer``."""
    for name, spec in no_op.items():
        old = layer.get_submodule(name)
        idx = getattr(old, "layer_idx", getattr(layer, "layer_idx", None)) if spec.get("attention") else None
        setattr(layer, name, NoOpBlock(int(spec.get("outputs", 0)), idx))
        for norm in spec.get("norms", ()):
            setattr(layer, norm, nn.Identity())


# What a removed block of a DeciLM (Llama) layer is: Llama's attention returns (output, weights) and reads
# input_layernorm; its MLP returns a tensor and reads post_attention_layernorm.
DECI_NO_OP = {"attention": ("self_attn", {"outputs": 2, "norms": ["input_layernorm"], "attention": True}),
              "ffn": ("mlp", {"outputs": 0, "norms": ["post_attention_layernorm"], "attention": False})}


def _deci_layer(block: dict, heads: int) -> dict:
    out: dict = {"num_attention_heads": heads}
    no_op = {}
    for part, (name, spec) in DECI_NO_OP.items():
        if block[part].get("no_op"):
            no_op[name] = spec
    if not block["attention"].get("no_op"):
        out["num_key_value_heads"] = heads // block["attention"]["n_heads_in_group"]
    if not block["ffn"].get("no_op"):
        out["intermediate_size"] = block["ffn"]["intermediate_size"]
    if no_op:
        out[NO_OP_KEY] = no_op
    return out


def layer_overrides(config) -> list[dict]:
    """Each decoder layer's own config values (an empty dict where the layer is stock)."""
    spec = getattr(config, LAYERS_KEY, None)
    if spec:
        return [dict(o) for o in spec["layers"]]
    blocks = getattr(config, "block_configs", None)
    if not blocks:
        return []
    return [_deci_layer(b, config.num_attention_heads) for b in blocks]


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
        no_op = values.get(NO_OP_KEY)
        # None: the config has no such field at the top level (a removed block's layer lists its fields so)
        values = {k: v for k, v in values.items() if k != NO_OP_KEY and v is not None}
        if values:
            layer_config = copy.deepcopy(config)
            for key, value in values.items():
                setattr(layer_config, key, value)
            cls = type(layers[i])
            accepts_idx = "layer_idx" in inspect.signature(cls.__init__).parameters
            layers[i] = cls(layer_config, layer_idx=i) if accepts_idx else cls(layer_config)
        if no_op:
            remove_blocks(layers[i], no_op)
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
