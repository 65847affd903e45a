"""Knowledge distillation from the dense starting model while HESSO prunes the student.

The teacher is a frozen copy of the model the trainer was given (with LoRA: the merged model, so
the base plus the adapters as they were, which at the start of a LoRA run is the base itself). It
runs under ``torch.inference_mode`` and never receives a gradient. The loss is

    (1 - weight) * language-model loss + weight * T^2 * KL(teacher_T || student_T)
    (+ hidden_weight * mean over layers of ||h_s - h_t||^2 / ||h_t||^2, when hidden_weight > 0)

over the tokens that carry a label, normalised the way Trainer normalises the language-model loss.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hf_oto.errors import ConfigError
from hf_oto.groups import unwrap_peft

TEACHER_DEVICES = ("same", "cpu")


@dataclass(frozen=True)
class DistillConfig:
    """How the pruned student learns from the dense teacher (see the module docstring)."""

    weight: float = 0.5
    temperature: float = 1.0
    hidden_weight: float = 0.0
    teacher_device: str = "same"

    def __post_init__(self) -> None:
        if not 0.0 <= self.weight <= 1.0:
            raise ConfigError(f"distill_weight must be in [0, 1], got {self.weight}")
        if self.temperature <= 0:
            raise ConfigError(f"distill_temperature must be positive, got {self.temperature}")
        if self.hidden_weight < 0:
            raise ConfigError(f"distill_hidden_weight must be >= 0, got {self.hidden_weight}")
        if self.teacher_device not in TEACHER_DEVICES:
            raise ConfigError(f"distill_teacher_device must be one of {TEACHER_DEVICES}, got {self.teacher_device!r}")


def make_teacher(model: nn.Module, device: torch.device | str) -> nn.Module:
    """A frozen, evaluation-mode copy of ``model`` (adapters merged) on ``device``."""
    teacher = copy.deepcopy(model)
    if unwrap_peft(teacher) is not teacher:
        teacher = teacher.merge_and_unload()
    teacher = teacher.to(device).eval()
    teacher.requires_grad_(False)
    if hasattr(teacher, "config"):
        teacher.config.use_cache = False
    return teacher


def teacher_outputs(teacher: nn.Module, inputs: dict[str, torch.Tensor], hidden: bool):
    """The teacher's logits (and hidden states) for ``inputs``, as ordinary tensors on the inputs' device."""
    device = next(teacher.parameters()).device
    feed = {k: v.to(device) for k, v in inputs.items() if k in ("input_ids", "attention_mask", "position_ids")}
    with torch.inference_mode():
        out = teacher(**feed, output_hidden_states=hidden)
    target = inputs["input_ids"].device
    logits = out.logits.to(target).clone()  # clone: a normal tensor, usable by autograd as a constant
    states = [h.to(target).clone() for h in out.hidden_states[1:]] if hidden else None
    return logits, states


def token_mask(inputs: dict[str, torch.Tensor], labels: torch.Tensor | None) -> torch.Tensor:
    """Positions whose next token is predicted (a label other than -100, else an attended token)."""
    if labels is not None:
        return labels[:, 1:] != -100
    mask = inputs.get("attention_mask")
    return torch.ones_like(inputs["input_ids"][:, 1:], dtype=torch.bool) if mask is None else mask[:, 1:].bool()


def kl_sum(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """Sum over masked positions of KL(teacher || student) at ``temperature`` (positions predict the next token)."""
    s = student[:, :-1][mask].float() / temperature
    t = teacher[:, :-1][mask].float() / temperature
    log_t = F.log_softmax(t, dim=-1)
    return (log_t.exp() * (log_t - F.log_softmax(s, dim=-1))).sum()


def hidden_sum(student: list[torch.Tensor], teacher: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Sum over masked positions of the layer-mean relative squared error of the hidden states."""
    total = student[0].new_zeros(())
    for s, t in zip(student, teacher, strict=True):
        s, t = s[:, :-1][mask].float(), t[:, :-1][mask].float()
        total = total + ((s - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(1e-6)).sum()
    return total / len(student)
