"""Group saliency (HESSO's criteria), computed for all groups at once, set by set."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hf_oto.groups.space import PruningSpace, SliceSpec


@dataclass(frozen=True)
class SaliencyWeights:
    """Weights of HESSO's criteria; each criterion is L2-normalised over all groups first."""

    magnitude: float = 0.25
    avg_magnitude: float = 0.25
    cosine_similarity: float = 0.25
    taylor_first_order: float = 0.25


def _gather(t: torch.Tensor, spec: SliceSpec, count: int) -> torch.Tensor:
    if spec.expert is not None:
        t, dim = t[spec.expert], spec.dim - 1
    else:
        dim = spec.dim
    picked = t.movedim(dim, 0).index_select(0, spec.index.flatten().to(t.device))
    return picked.reshape(count, -1).float()


@torch.no_grad()
def group_statistics(
    params: dict[str, torch.Tensor], space: PruningSpace, update: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Per-group sums: ||x||^2, x.g, x.u, ||u||^2 and group sizes (vectors over all groups)."""
    sq, xg, xu, uu, size = [], [], [], [], []
    for gs in space.sets:
        n = gs.count
        s_sq = torch.zeros(n)
        s_xg = torch.zeros(n)
        s_xu = torch.zeros(n)
        s_uu = torch.zeros(n)
        numel = 0
        for spec in gs.slices:
            p = params[spec.param]
            x = _gather(p.detach(), spec, n)
            numel += x.shape[1]
            s_sq += (x * x).sum(1).cpu()
            if p.grad is not None:
                s_xg += (x * _gather(p.grad, spec, n)).sum(1).cpu()
            if update is not None and spec.param in update:
                u = _gather(update[spec.param], spec, n)
                s_xu += (x * u).sum(1).cpu()
                s_uu += (u * u).sum(1).cpu()
        sq.append(s_sq)
        xg.append(s_xg)
        xu.append(s_xu)
        uu.append(s_uu)
        size.append(torch.full((n,), float(numel)))
    cat = torch.cat
    return {"sq": cat(sq), "xg": cat(xg), "xu": cat(xu), "uu": cat(uu), "size": cat(size)}


def saliency(stats: dict[str, torch.Tensor], weights: SaliencyWeights) -> torch.Tensor:
    """Weighted sum of the L2-normalised criteria (higher = more important)."""
    norm = stats["sq"].sqrt()
    crit = {
        "magnitude": norm,
        "avg_magnitude": norm / stats["size"].clamp_min(1),
        "cosine_similarity": stats["xu"] / (norm * stats["uu"].sqrt()).clamp_min(1e-12) + 1.0,
        "taylor_first_order": stats["xg"].abs(),
    }
    score = torch.zeros_like(norm)
    for name, values in crit.items():
        w = getattr(weights, name)
        if w:
            score += w * values / values.norm().clamp_min(1e-12)
    return score
