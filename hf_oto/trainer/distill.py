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
import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hf_oto.errors import ConfigError
from hf_oto.groups import unwrap_peft

TEACHER_DEVICES = ("same", "cpu")
# The teacher's weights: the student's own dtype, or half precision (half the memory; on a CPU with a
# fast bf16 product a bfloat16 teacher ran SmolLM2-135M's forward of 4 x 256 tokens in 0.97 s against
# 2.03 s), or "auto": bfloat16 where the teacher's device multiplies bf16 matrices fast, else the same
TEACHER_DTYPES = ("same", "auto", "bfloat16", "float16")


@dataclass(frozen=True)
class DistillConfig:
    """How the pruned student learns from the dense teacher (see the module docstring)."""

    weight: float = 0.5
    temperature: float = 1.0
    hidden_weight: float = 0.0
    teacher_device: str = "same"
    teacher_dtype: str = "same"

    def __post_init__(self) -> None:
        if not 0.0 <= self.weight <= 1.0:
            raise ConfigError(f"distill_weight must be in [0, 1], got {self.weight}")
        if self.temperature <= 0:
            raise ConfigError(f"distill_temperature must be positive, got {self.temperature}")
        if self.hidden_weight < 0:
            raise ConfigError(f"distill_hidden_weight must be >= 0, got {self.hidden_weight}")
        if self.teacher_device not in TEACHER_DEVICES:
            raise ConfigError(f"distill_teacher_device must be one of {TEACHER_DEVICES}, got {self.teacher_device!r}")
        if self.teacher_dtype not in TEACHER_DTYPES:
            raise ConfigError(f"distill_teacher_dtype must be one of {TEACHER_DTYPES}, got {self.teacher_dtype!r}")


def teacher_dtype(choice: str, device: torch.device | str) -> str:
    """The dtype ``choice`` gives on ``device``: "auto" is "bfloat16" where :func:`hf_oto.env.fast_bf16`
    holds (a GPU that supports it, a CPU whose bf16 matrix product is clearly faster than fp32; some torch
    builds are 7-50x slower in bf16 on some CPUs), else "same"."""
    if choice != "auto":
        return choice
    from hf_oto import env

    return "bfloat16" if env.fast_bf16(device) else "same"


def make_teacher(model: nn.Module, device: torch.device | str, dtype: str = "same") -> nn.Module:
    """A frozen, evaluation-mode copy of ``model`` (adapters merged) on ``device``; with ``dtype`` other
    than ``"same"``, its floating-point weights in that dtype (buffers such as rotary frequencies keep
    theirs: rounded to half precision they would shift positions far into a sequence)."""
    teacher = copy.deepcopy(model)
    if unwrap_peft(teacher) is not teacher:
        teacher = teacher.merge_and_unload()
    teacher = teacher.to(device).eval()
    teacher.requires_grad_(False)
    if dtype != "same":
        buffers = {name: b for name, b in teacher.named_buffers() if b.is_floating_point()}
        teacher = teacher.to(getattr(torch, dtype))
        for name, b in buffers.items():
            owner, _, leaf = name.rpartition(".")
            setattr(teacher.get_submodule(owner), leaf, b)
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
    """Sum over masked positions of KL(teacher || student) at ``temperature`` (positions predict the next token).

    KL = sum p_t log p_t - sum p_t log q_s: the first term is a constant (computed without a graph), the
    second a soft-target cross-entropy, so autograd keeps one vocabulary-sized tensor for the student
    instead of four. Positions that do not count get a zero teacher distribution instead of being
    gathered, so the logits are read in place (no vocabulary-sized copies).
    """
    vocab = student.shape[-1]
    counted = torch.zeros(student.shape[:-1], dtype=torch.float32, device=student.device)
    counted[:, :-1] = mask.to(counted.device, torch.float32)
    s, t = student.reshape(-1, vocab).float(), teacher.reshape(-1, vocab).float()
    if temperature != 1.0:
        s, t = s / temperature, t / temperature
    with torch.no_grad():
        log_t = F.log_softmax(t, dim=-1)
        p_t = log_t.exp().mul_(counted.reshape(-1, 1))
        neg_entropy = p_t.flatten() @ log_t.flatten()  # a dot product: no third vocabulary-sized tensor
        del log_t
    return neg_entropy + F.cross_entropy(s, p_t, reduction="sum")


def lm_sum(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over masked positions of the next-token cross-entropy (position t predicts ``labels[t + 1]``)."""
    vocab = logits.shape[-1]
    target = labels[:, 1:].masked_fill(~mask.to(labels.device), -100)
    return F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), target.reshape(-1), ignore_index=-100,
                           reduction="sum")


def hidden_sum(student: list[torch.Tensor], teacher: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Sum over masked positions of the layer-mean relative squared error of the hidden states."""
    total = student[0].new_zeros(())
    for s, t in zip(student, teacher, strict=True):
        s, t = s[:, :-1][mask].float(), t[:, :-1][mask].float()
        total = total + ((s - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(1e-6)).sum()
    return total / len(student)


class DistillMixin:
    """Adds distillation to a ``transformers.Trainer`` subclass: ``class T(DistillMixin, Trainer)``.

    Call :meth:`setup_distillation` once the model is in place (``HFOTOTrainer`` does, from its
    ``distill*`` arguments). Without a config the Trainer's own loss is untouched.
    """

    distill_config: DistillConfig | None = None
    teacher: nn.Module | None = None
    teacher_logits: torch.Tensor | None = None
    keep_teacher_logits: bool = False

    def setup_distillation(self, config: DistillConfig | None, model: nn.Module) -> None:
        """Freeze a copy of ``model`` as the teacher (on the student's device, or the CPU)."""
        self.distill_config = config
        self.teacher = None
        self._distill_stats = _fresh_stats()
        if config is not None:
            device = self.args.device if config.teacher_device == "same" else torch.device("cpu")
            dtype = teacher_dtype(config.teacher_dtype, device)
            self.teacher = make_teacher(model, device, dtype)
            if config.teacher_dtype == "auto":
                held = next(self.teacher.parameters()).dtype
                logging.getLogger(__name__).info(f"hf-oto: distill_teacher_dtype auto: the teacher's weights in "
                                                 f"{str(held).removeprefix('torch.')} on {device}")

    @property
    def teacher_bytes(self) -> int:
        """Memory held by the teacher's parameters and buffers (0 without one)."""
        if self.teacher is None:
            return 0
        tensors = [*self.teacher.parameters(), *self.teacher.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The Trainer's loss, mixed with the distillation terms while training."""
        d = self.distill_config
        if d is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        labels = inputs.get("labels")
        hidden = d.hidden_weight > 0
        inputs = dict(inputs, output_hidden_states=True) if hidden else inputs
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        start = time.perf_counter()
        with self.accelerator.autocast():  # bf16/fp16 runs: the teacher computes in the student's precision
            t_logits, t_states = teacher_outputs(self.teacher, inputs, hidden)
        self._distill_stats["teacher_s"] += time.perf_counter() - start
        if self.keep_teacher_logits:  # for elastic sub-networks that distil from them too (else freed now)
            self.teacher_logits = t_logits
        mask = token_mask(inputs, labels)
        norm = self._distill_normaliser(mask, num_items_in_batch)
        kl = kl_sum(outputs["logits"], t_logits, mask, d.temperature) * norm
        loss = (1 - d.weight) * loss + d.weight * d.temperature ** 2 * kl
        self._distill_stats["kl"] += float(kl.detach())
        if hidden:
            h = hidden_sum(list(outputs["hidden_states"][1:]), t_states, mask) * norm
            loss = loss + d.hidden_weight * h
            self._distill_stats["hidden"] += float(h.detach())
        self._distill_stats["steps"] += 1
        return (loss, outputs) if return_outputs else loss

    def _distill_normaliser(self, mask: torch.Tensor, num_items_in_batch) -> float | torch.Tensor:
        """Turn a sum over tokens into what Trainer does with the language-model loss: a mean over this
        micro-batch, or (when the model normalises by ``num_items_in_batch``) a share of the whole batch."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or \
                self.compute_loss_func is not None
        if not scaled or num_items_in_batch is None:
            return 1.0 / max(int(mask.sum()), 1)
        norm = 1.0 / num_items_in_batch
        if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs:
            norm = norm * (self.accelerator.num_processes if self.args.n_gpu <= 1 else self.args.n_gpu)
        return norm

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        stats = getattr(self, "_distill_stats", None)
        if self.teacher is not None and "loss" in logs and stats and stats["steps"]:
            n = stats["steps"]
            logs.update({"distill/kl": stats["kl"] / n, "distill/teacher_s_per_step": stats["teacher_s"] / n,
                         "distill/teacher_mib": self.teacher_bytes / 2**20})
            if self.distill_config.hidden_weight > 0:
                logs["distill/hidden"] = stats["hidden"] / n
            self._distill_stats = _fresh_stats()
        super().log(logs, *args, **kwargs)


def _fresh_stats() -> dict[str, float]:
    return {"kl": 0.0, "hidden": 0.0, "teacher_s": 0.0, "steps": 0}
