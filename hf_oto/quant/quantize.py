"""Group-wise symmetric integer quantization of a weight: round-to-nearest and GPTQ.

A weight ``W`` (out x in) is split along its input columns into groups of ``group_size``; each
(row, group) has one scale ``s`` and every weight is stored as an integer code ``q`` in
``[-2^(b-1), 2^(b-1) - 1]``, so ``W ~ q * s``. This is the layout compressed-tensors' symmetric
"group" strategy stores, so codes and scales go into an export unchanged.

The code range has one more negative code than positive ones (at 2 bits: -2, -1, 0, 1). A scale may be
negative, which mirrors the grid (at 2 bits: -1, 0, 1, 2 steps), so each (row, group) points the long
side at whichever tail its weights need it for. That is what an asymmetric quantizer's zero point buys
on zero-centred groups, in a format that stores no zero points (transformers cannot load
compressed-tensors' asymmetric checkpoints).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Scale candidates, as fractions of the scale that maps the group's largest |w| onto the code range;
# each (row, group) keeps the one with the least squared error (a clipping search).
_SHRINK = torch.linspace(1.0, 0.55, 10).tolist()


def code_range(bits: int) -> tuple[int, int]:
    """(lowest, highest) signed code of a ``bits``-wide symmetric quantizer."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


@dataclass
class QuantizedWeight:
    """Integer codes (int8, out x in) and per-group scales (float32, out x in/group_size)."""

    codes: torch.Tensor
    scales: torch.Tensor
    bits: int
    group_size: int

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.codes, self.scales, self.group_size)


def whole_groups(index: torch.Tensor, size: int) -> bool:
    """Whether every row of ``index`` is a union of aligned runs of ``size`` consecutive columns."""
    if index.shape[-1] % size:
        return False
    runs = index.reshape(index.shape[0], -1, size)
    starts = runs[..., :1]
    return bool(((starts % size) == 0).all() and (runs == starts + torch.arange(size, device=index.device)).all())


def dequantize(codes: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """``codes * scale`` with each scale repeated over its group of input columns."""
    return codes.to(scales.dtype) * scales.repeat_interleave(group_size, dim=1)


def _best_scale(w: torch.Tensor, bits: int, signed: bool = True) -> torch.Tensor:
    """Per-row scale for one group of columns ``w`` (out x g) with the least squared error.

    The candidates put the group's largest |w| on the long side of the grid, between the two sides, or on the
    short side, each shrunk by the factors of ``_SHRINK`` (a clipping search), with both signs (``signed``)
    or positive only: the positive scales alone are the grid without mirroring, so the error with both signs
    is never above theirs.
    """
    lo, hi = code_range(bits)
    amax = w.abs().amax(dim=1).clamp_min(1e-12)
    fractions = torch.tensor([f / d for d in (-lo, hi + 0.5, hi) for f in _SHRINK], dtype=w.dtype, device=w.device)
    best, best_err = amax / hi, torch.full_like(amax, float("inf"))
    for chunk in (fractions, -fractions) if signed else (fractions,):
        for part in chunk.split(len(_SHRINK)):  # ten candidates at a time bound the memory (candidates x out x g)
            s = part[:, None] * amax[None, :]
            q = torch.clamp(torch.round(w[None] / s[..., None]), lo, hi)
            err, k = ((q * s[..., None] - w[None]) ** 2).sum(dim=2).min(dim=0)
            better = err < best_err
            best = torch.where(better, s.gather(0, k[None]).squeeze(0), best)
            best_err = torch.where(better, err, best_err)
    return best


def rtn(weight: torch.Tensor, bits: int, group_size: int, *, signed: bool = True) -> QuantizedWeight:
    """Round-to-nearest with a per-(row, group) clipping search (``signed``: scales of either sign)."""
    w = weight.detach().float()
    lo, hi = code_range(bits)
    scales = torch.stack([_best_scale(w[:, g:g + group_size], bits, signed)
                          for g in range(0, w.shape[1], group_size)], dim=1)
    codes = torch.clamp(torch.round(w / scales.repeat_interleave(group_size, dim=1)), lo, hi)
    return QuantizedWeight(codes.to(torch.int8), scales, bits, group_size)


def gptq(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, *,
         damp: float = 0.01, block: int = 128, signed: bool = True) -> QuantizedWeight:
    """GPTQ (Frantar et al., 2022): quantize columns in order and spread each column's error over the
    columns not yet quantized, weighted by the inverse of ``hessian`` (``X^T X`` of the layer's inputs).
    Each group's scale is chosen when the group is reached, from its error-corrected weights (``signed``:
    scales of either sign; False gives the grid without mirroring).

    Works on the weight's device, in float32 whatever the weight's dtype; codes and scales come back on
    that device (int8 and float32), wherever ``hessian`` was accumulated.
    """
    device = weight.device
    w = weight.detach().to(device=device, dtype=torch.float32, copy=True)
    out, n = w.shape
    lo, hi = code_range(bits)
    h = hessian.detach().to(device=device, dtype=torch.float32, copy=True)
    dead = torch.diag(h) == 0  # inputs that never fired: their weights cannot matter, give them a unit curvature
    h = h + torch.diag(dead.to(h.dtype))
    w = w * (~dead).to(w.dtype)[None, :]
    h = h + torch.eye(n, device=device) * (damp * torch.diag(h).mean())
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.zeros(out, n, dtype=torch.int8, device=device)
    scales = torch.zeros(out, n // group_size, device=device)
    block = max(group_size, block // group_size * group_size)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        w1, h1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err1 = torch.zeros(out, i2 - i1, device=device)
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0:
                scales[:, col // group_size] = _best_scale(w1[:, i:i + group_size], bits, signed)
            s = scales[:, col // group_size]
            q = torch.clamp(torch.round(w1[:, i] / s), lo, hi)
            codes[:, col] = q.to(torch.int8)
            e = (w1[:, i] - q * s) / h1[i, i]
            w1[:, i:] -= e[:, None] * h1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return QuantizedWeight(codes, scales, bits, group_size)
