"""Wanda-sp's evidence: the input activations of the linears that consume each group.

A group whose slices include input columns of a linear layer (``o_proj`` for heads and kv groups,
``down_proj`` for FFN channels) is scored ``sum_j ||X_j||_2 * sum_i |W_ij|`` over its columns ``j``,
with ``X_j`` the activations of input feature ``j`` over the tokens seen. One-shot pruning
(:mod:`hf_oto.optim.oneshot`) collects them on calibration batches; HESSO's ``wanda_sp`` criterion
(:mod:`hf_oto.optim.criteria`) on its training passes. Groups with no such consumer (whole experts,
layers) are scored by their magnitude.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_oto.groups.mask import input_dim
from hf_oto.groups.space import PruningSpace
from hf_oto.optim.saliency import group_statistics


def linear_consumers(model: nn.Module, space: PruningSpace) -> dict[str, nn.Module]:
    """The linear layer (``nn.Linear`` or transformers' ``Conv1D``) owning each sliced weight whose slices
    are its input columns, by parameter name."""
    modules = dict(model.named_modules())
    out: dict[str, nn.Module] = {}
    for gs in space.sets:
        for s in gs.slices:
            owner = modules.get(s.param.rpartition(".")[0])
            if (s.expert is None and isinstance(owner, (nn.Linear, Conv1D)) and s.param.endswith(".weight")
                    and s.dim == input_dim(owner)):
                out[s.param] = owner
    return out


def _width(module: nn.Module) -> int:
    return module.weight.shape[input_dim(module)]


class InputNorms:
    """Per consumer linear, the sum over tokens of each input feature's square, from forward pre-hooks.

    ``training_only``: count only passes with gradients on (not evaluation, pricing probes or a
    distillation teacher's no-grad passes; a copy of the model, such as a teacher, is never counted).
    :meth:`attach` installs the hooks, :meth:`detach` removes them; :meth:`flat` and
    :meth:`load_flat` carry the sums through a checkpoint.
    """

    def __init__(self, consumers: dict[str, nn.Module], *, training_only: bool = False):
        self.consumers = consumers
        self.training_only = training_only
        self.sums: dict[str, torch.Tensor] = {}
        self._handles: list = []

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> InputNorms:
        if not self._handles:
            self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.consumers.items()]
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, name: str):
        owner = self.consumers[name]

        def fn(module, args):
            if module is not owner:  # a copy of the model (a distillation teacher) carries the hook along
                return
            if self.training_only and not torch.is_grad_enabled():
                return
            with torch.no_grad():
                x = args[0].detach().float().reshape(-1, args[0].shape[-1])
                term = (x * x).sum(0)
            self.sums[name] = term if name not in self.sums else self.sums[name].add_(term)
        return fn

    def flat(self) -> torch.Tensor:
        """The sums of every consumer in order (zeros where nothing was seen yet), on CPU."""
        parts = [self.sums[n].cpu() if n in self.sums else torch.zeros(_width(m)) for n, m in self.consumers.items()]
        return torch.cat(parts) if parts else torch.zeros(0)

    def load_flat(self, value: torch.Tensor | None) -> None:
        """Restore what :meth:`flat` returned (None: nothing seen)."""
        self.sums = {}
        if value is None:
            return
        if value.numel() != sum(_width(m) for m in self.consumers.values()):
            raise ValueError("the saved activation sums belong to other layers")
        for n, part in self.unflatten(value).items():
            self.sums[n] = part.to(self.consumers[n].weight.device, torch.float32).clone()

    def unflatten(self, value: torch.Tensor) -> dict[str, torch.Tensor]:
        """``value`` (shaped as :meth:`flat`) split per consumer."""
        out, off = {}, 0
        for n, m in self.consumers.items():
            out[n] = value[off:off + _width(m)]
            off += _width(m)
        return out


@torch.no_grad()
def activation_scores(model: nn.Module, space: PruningSpace, consumers: dict[str, nn.Module],
                      sums: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each group's activation-weighted magnitude (flat order of ``space``) from the current weights and
    ``sums`` (squared inputs per consumer); a set with no observed consumer falls back to magnitude."""
    fallback: torch.Tensor | None = None
    scores = []
    for k, gs in enumerate(space.sets):
        s = torch.zeros(gs.count)
        found = False
        for spec in gs.slices:
            if spec.param in consumers and spec.param in sums:
                layer = consumers[spec.param]
                w = layer.weight.detach().float()
                per_column = w.abs().sum(1 - input_dim(layer)) * sums[spec.param].to(w.device, torch.float32).sqrt()
                s += per_column[spec.index.to(w.device)].sum(1).cpu()
                found = True
        if not found:
            if fallback is None:
                fallback = group_statistics(dict(model.named_parameters()), space).sq.sqrt()
            off = space.set_offset(k)
            s = fallback[off:off + gs.count].clone()
        scores.append(s)
    return torch.cat(scores)
