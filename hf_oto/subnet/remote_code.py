"""Per-layer dimensions for a pruned Hugging Face model.

This file is self-contained on purpose: hf_oto builds its in-memory sub-networks with it, and copies
it verbatim into exported repos whose layers differ in size, where it runs with only torch and
transformers installed (``trust_remote_code=True``). It holds no model code: each decoder layer is
the architecture's own class, built from a copy of the config with that layer's head counts and
widths.
"""

from __future__ import annotations

import copy
import inspect

import transformers
from torch import nn

LAYERS_KEY = "hf_oto_layers"


def build_layers(model: nn.Module, config) -> nn.Module:
    """Rebuild each decoder layer listed in ``config.hf_oto_layers`` with its own dimensions."""
    spec = getattr(config, LAYERS_KEY, None)
    if not spec:
        return model
    layers = model.get_submodule(spec["path"])
    for i, overrides in enumerate(spec["layers"]):
        if not overrides:
            continue
        layer_config = copy.deepcopy(config)
        setattr(layer_config, LAYERS_KEY, None)
        for key, value in overrides.items():
            setattr(layer_config, key, value)
        cls = type(layers[i])
        accepts_idx = "layer_idx" in inspect.signature(cls.__init__).parameters
        layers[i] = cls(layer_config, layer_idx=i) if accepts_idx else cls(layer_config)
    return model


def pruned_class(base_class_name: str) -> type:
    """A subclass of the stock transformers class that applies per-layer dimensions."""
    base = getattr(transformers, base_class_name)

    class HFOTOPruned(base):  # type: ignore[misc, valid-type]
        def __init__(self, config, *args, **kwargs):
            super().__init__(config, *args, **kwargs)
            build_layers(self, config)

    # Keep the stock name: transformers looks up checkpoint key renames (e.g. GPT-NeoX's embed_out)
    # by class name.
    HFOTOPruned.__name__ = HFOTOPruned.__qualname__ = base_class_name
    return HFOTOPruned
