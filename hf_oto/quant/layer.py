"""QFALinear: a frozen linear stored as integer codes per bit-width, with one adapter per bit-width
(and optionally one that every width adds).

The adapter of width ``b`` follows QA-LoRA: it reads the input pooled over each quantization group,
so its product ``scaling * B_b @ A_b`` (out x groups) is one number per (row, group), that is, a shift
of that group's zero point. Every format that transformers and vLLM load stores integer zero points
(or none, for symmetric checkpoints), so the shift is applied in whole quantization steps, with a
straight-through gradient: the forward pass uses ``clamp(codes + round(shift / scale))``, and the
export writes exactly those integers as the codes. Training and the exported checkpoint therefore
compute the same weights. With a shared adapter (``shared_rank``), width ``b`` shifts by
``scaling * B_b @ A_b + shared_scaling * B_s @ A_s``: one more low-rank product, in weight units like the
widths' own, which every width adds and every step trains.

For pruning, ``enable_gates`` adds a per-output-channel scale (trained, shared by all widths, folded
into the scales at export) and a frozen per-input-channel gate; HESSO drives the gates of removed
groups to exactly zero, together with the adapters' matching rows and columns.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hf_oto.quant.config import SHARED, adapter_ranks
from hf_oto.quant.quantize import QuantizedWeight, code_range


class QFALinear(nn.Module):
    """``y = x @ W_b^T + bias`` with ``W_b`` the width-``b`` codes, shifted by its adapter, times scales."""

    def __init__(self, quantized: dict[int, QuantizedWeight], bias: torch.Tensor | None, *, rank: int, alpha: float,
                 shared_rank: int = 0):
        super().__init__()
        first = next(iter(quantized.values()))
        self.out_features, self.in_features = first.codes.shape
        self.group_size = first.group_size
        self.bits = tuple(sorted(quantized))
        groups = self.in_features // self.group_size
        for b, q in quantized.items():
            self.register_buffer(f"codes_{b}", q.codes.to(torch.int8).contiguous())
            self.register_buffer(f"scales_{b}", q.scales.float().contiguous())
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for key, r in adapter_ranks(self.bits, rank, shared_rank).items():
            a = torch.empty(r, groups)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.lora_A[key] = nn.Parameter(a)
            self.lora_B[key] = nn.Parameter(torch.zeros(self.out_features, r))
        self.scaling = alpha / rank
        self.shared_scaling = alpha / shared_rank if shared_rank else 0.0
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.gate_out: nn.Parameter | None = None
        self.gate_in: nn.Parameter | None = None
        self.active_bits = self.bits[-1]

    def enable_gates(self) -> None:
        """Add the channel gates HESSO prunes through (a no-op if they exist)."""
        if self.gate_out is None:
            self.gate_out = nn.Parameter(torch.ones(self.out_features))
            self.gate_in = nn.Parameter(torch.ones(self.in_features), requires_grad=False)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}"

    def codes(self, bits: int) -> torch.Tensor:
        return getattr(self, f"codes_{bits}")

    def scales(self, bits: int) -> torch.Tensor:
        return getattr(self, f"scales_{bits}")

    # The weight of one bit-width ------------------------------------------------------------------
    def shifted_codes(self, bits: int) -> torch.Tensor:
        """Codes plus the adapter's group shift, rounded (straight-through) and clamped, as floats."""
        key = str(bits)
        scales = self.scales(bits)
        delta = self.scaling * (self.lora_B[key] @ self.lora_A[key])
        if SHARED in self.lora_A:
            delta = delta + self.shared_scaling * (self.lora_B[SHARED] @ self.lora_A[SHARED])
        shift = delta / scales
        shift = shift + (torch.round(shift) - shift).detach()
        lo, hi = code_range(bits)
        codes = self.codes(bits).to(scales.dtype) + shift.repeat_interleave(self.group_size, dim=1)
        return torch.clamp(codes, lo, hi)

    def effective_scales(self, bits: int) -> torch.Tensor:
        """The scales with the output gate folded in (what the export stores)."""
        scales = self.scales(bits)
        return scales if self.gate_out is None else scales * self.gate_out[:, None]

    def weight_for(self, bits: int) -> torch.Tensor:
        w = self.shifted_codes(bits) * self.effective_scales(bits).repeat_interleave(self.group_size, dim=1)
        return w if self.gate_in is None else w * self.gate_in[None, :]

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight of the active width (for code that reads ``.weight``)."""
        return self.weight_for(self.active_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_for(self.active_bits)
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def folded(self, bits: int) -> QuantizedWeight:
        """The adapter and gates folded into integer codes and scales: ``dequantize()`` equals the weight."""
        codes = self.shifted_codes(bits)
        if self.gate_in is not None:
            codes = codes * (self.gate_in != 0)[None, :]
        return QuantizedWeight(codes.round().to(torch.int8), self.effective_scales(bits).detach().clone(),
                               bits, self.group_size)
