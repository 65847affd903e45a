"""Masked views of a model: run it as if some groups were removed, without touching or copying a weight.

Elastic (once-for-all) training runs several nested sub-networks of one model in every step. A
sub-network here is the model with forward hooks, not a copy: a removed head or FFN channel is
masked where its output enters its consumer (the input columns of the attention output projection or
of the FFN down projection, the adapter's input included), a removed decoder layer passes its hidden
states through, and a removed attention or MLP block returns zeros (what its no-op in the export does).
By zero-invariance this computes exactly what the model with those groups zeroed computes, which is
what the sub-network step then slices out, so an extracted size equals the masked view that was
trained (tested). Masks are per consumer channel: a few vectors per layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from hf_oto.errors import ConfigError
from hf_oto.groups.names import unwrap_peft
from hf_oto.groups.space import AttentionInfo, BlockInfo, FFNInfo, PruningSpace

MASKABLE_KINDS = ("attention_head", "kv_group", "query_head", "ffn_channel", "layer", "attention_block", "mlp_block")


def input_dim(module: nn.Module) -> int:
    """The weight dimension that indexes a layer's inputs: 0 for transformers' ``Conv1D`` (its weight is
    stored as (in, out)), 1 for ``nn.Linear`` and layers shaped like it (QFA's quantized linears)."""
    from transformers.pytorch_utils import Conv1D

    return 0 if isinstance(module, Conv1D) else 1


def _consumer(model: nn.Module, param: str) -> tuple[nn.Module, nn.Module]:
    """(module to hook, module holding the weight) for a consumer weight named as in the transformers
    model (``info.consumer``): under peft the hook goes on the adapter's wrapper, so the adapter's input
    is masked with the base layer's."""
    module = unwrap_peft(model).get_submodule(param.rpartition(".")[0])
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    return module, base


class MaskedView:
    """Forward-time masks over ``space``'s groups: ``with view.removed(flags): model(...)`` runs the
    sub-network without the flagged groups (a boolean per group of the space)."""

    def __init__(self, model: nn.Module, space: PruningSpace):
        self.model, self.space = model, space
        names = {id(p): n for n, p in model.named_parameters()}
        # per set: (consumer module, its input width, index tensor of each group's input channels)
        self._consumers: dict[int, tuple[nn.Module, int, torch.Tensor]] = {}
        self._layers: dict[int, nn.Module] = {}
        self._zeroed: dict[int, nn.Module] = {}  # whole attention or MLP blocks
        blocks = (unwrap_peft(model).get_submodule(space.layers_path) if space.layer_sets() or space.block_sets()
                  else None)
        for k, gs in enumerate(space.sets):
            if not gs.prunable:
                continue
            if gs.kind not in MASKABLE_KINDS:
                raise ConfigError(f"elastic sizes mask heads, kv groups, FFN channels and whole layers; {gs.prefix} "
                                  f"has prunable {gs.kind!r} groups (leave prune_experts off)")
            if gs.kind == "layer":
                self._layers[k] = blocks[gs.layer]
                continue
            if isinstance(gs.info, BlockInfo):
                self._zeroed[k] = blocks[gs.layer].get_submodule(gs.info.module)
                continue
            if not isinstance(gs.info, AttentionInfo | FFNInfo):
                raise ConfigError(f"{gs.prefix}: no consumer is known for its {gs.kind} groups")
            module, base = _consumer(model, gs.info.consumer)
            dim = input_dim(base)
            # a layer that stores its weight in another form (QFA's codes) is named as the space names it
            name = names.get(id(getattr(base, "weight", None)), gs.info.consumer)
            spec = next((s for s in gs.slices if s.param == name and s.dim == dim and s.expert is None), None)
            if spec is None or name not in space.param_shapes:
                raise ConfigError(f"{gs.prefix}: its {gs.kind} groups have no input slice on {gs.info.consumer}")
            self._consumers[k] = (module, space.param_shapes[name][dim], spec.index)

    @contextlib.contextmanager
    def removed(self, flags: torch.Tensor) -> Iterator[None]:
        """Run the model inside this block as if the flagged groups were removed."""
        if flags.numel() != len(self.space):
            raise ValueError(f"expected one flag per group ({len(self.space)}), got {flags.numel()}")
        flags = flags.detach().bool().cpu()
        masks: dict[nn.Module, torch.Tensor] = {}
        skipped: list[nn.Module] = []
        for k, (module, width, index) in self._consumers.items():
            start = self.space.set_offset(k)
            gone = flags[start:start + index.shape[0]]
            if bool(gone.any()):
                mask = masks.setdefault(module, torch.ones(width))
                mask[index[gone].flatten()] = 0.0
        for k, layer in self._layers.items():
            if bool(flags[self.space.set_offset(k)]):
                skipped.append(layer)
        handles = [m.register_forward_pre_hook(_mask_input(mask), with_kwargs=True) for m, mask in masks.items()]
        handles += [layer.register_forward_hook(_pass_through, with_kwargs=True) for layer in skipped]
        handles += [block.register_forward_hook(_zero_output) for k, block in self._zeroed.items()
                    if bool(flags[self.space.set_offset(k)])]
        try:
            yield
        finally:
            for h in handles:
                h.remove()


def _mask_input(mask: torch.Tensor):
    cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def hook(_module, args, kwargs):
        x = args[0] if args else kwargs["input"]
        key = (x.device, x.dtype)
        if key not in cache:
            cache[key] = mask.to(x.device, x.dtype)
        x = x * cache[key]
        if args:
            return (x, *args[1:]), kwargs
        return args, dict(kwargs, input=x)
    return hook


def _pass_through(_module, args, kwargs, output):
    """A removed decoder layer: its output is its input hidden states (what the layer computes with every
    weight zeroed, which discovery checked for each layer it offers)."""
    x = args[0] if args else kwargs["hidden_states"]
    if isinstance(output, tuple):
        return (x, *output[1:])
    if isinstance(output, list):
        return [x, *output[1:]]
    return x


def _zero_output(_module, _args, output):
    """A removed attention or MLP block: zeros where its output went (its weights zeroed give exactly that,
    which discovery checked for each block it offers)."""
    if isinstance(output, (tuple, list)):
        return type(output)([torch.zeros_like(output[0]), *output[1:]])
    return torch.zeros_like(output)
