"""Group saliency (HESSO's criteria), computed for all groups at once, set by set."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hf_oto.groups.space import PruningSpace, SliceSpec
from hf_oto.optim.shard import all_reduce_sum, is_sharded, local, row_range


@dataclass(frozen=True)
class SaliencyWeights:
    """Weights of HESSO's criteria; each criterion is L2-normalised over all groups first."""

    magnitude: float = 0.25
    avg_magnitude: float = 0.25
    cosine_similarity: float = 0.25
    taylor_first_order: float = 0.25


@dataclass(frozen=True)
class LoraFactors:
    """The LoRA factors on one base weight: W_eff = W + sum_i scaling_i * B_i @ A_i (transposed if set)."""

    a: tuple[str, ...]
    b: tuple[str, ...]
    scaling: tuple[float, ...]
    transpose: bool


def lora_factors(model: torch.nn.Module) -> dict[str, LoraFactors]:
    """Base weight name -> its active LoRA factors, for every peft LoRA layer of ``model`` (else empty)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # peft not installed: no adapters to account for
        return {}
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, LoraFactors] = {}
    for mod in model.modules():
        if not isinstance(mod, LoraLayer):
            continue
        base_w = getattr(mod.get_base_layer(), "weight", None)
        active = [a for a in mod.active_adapters if a in mod.lora_A]
        if base_w is None or id(base_w) not in names or not active:
            continue
        out[names[id(base_w)]] = LoraFactors(
            a=tuple(names[id(mod.lora_A[a].weight)] for a in active),
            b=tuple(names[id(mod.lora_B[a].weight)] for a in active),
            scaling=tuple(float(mod.scaling[a]) for a in active),
            transpose=bool(getattr(mod, "fan_in_fan_out", False)),
        )
    return out


def _effective(params, f: LoraFactors, base: torch.Tensor, update=None) -> torch.Tensor:
    """W + s*B@A, or with ``update`` the change of the effective weight over the last step."""
    delta = torch.zeros_like(base, dtype=torch.float32)
    for a, b, s in zip(f.a, f.b, f.scaling, strict=True):
        A, B = params[a].detach().float(), params[b].detach().float()
        if update is None:
            d = B @ A
        else:
            A0, B0 = A - update[a].float(), B - update[b].float()
            d = B @ A - B0 @ A0
        delta += s * (d.t() if f.transpose else d)
    return delta if update is not None else base.float() + delta


def _index_sums(values: torch.Tensor, dim: int) -> torch.Tensor:
    """``values`` summed over every dim but ``dim``: one float32 value per index along ``dim``."""
    values = values.float()
    others = [d for d in range(values.dim()) if d != dim]
    return values.sum(others) if others else values


def _per_index(x: torch.Tensor, y: torch.Tensor, dim: int) -> torch.Tensor:
    """sum(x * y) over every dim but ``dim``."""
    return _index_sums(x.float() * y.float(), dim)


def slice_sums(values: torch.Tensor, spec: SliceSpec) -> torch.Tensor:
    """Per-group sums of ``values`` (shaped like ``spec``'s parameter) over the spec's slices, shape (count,)."""
    if spec.expert is not None:
        values, dim = values[spec.expert], spec.dim - 1
    else:
        dim = spec.dim
    return _index_sums(values, dim)[spec.index.to(values.device)].sum(1)


@dataclass(frozen=True)
class GroupStats:
    """Per-group sums, one value per group of the space (its flat order).

    ``sq`` = ||x||^2, ``xg`` = x . g, ``ag`` = sum |x * g| (only with ``grad_only``), ``xu`` = x . u,
    ``uu`` = ||u||^2 for the group's weights x, gradient g and update u; ``size`` = its element count.
    """

    sq: torch.Tensor
    xg: torch.Tensor
    ag: torch.Tensor
    xu: torch.Tensor
    uu: torch.Tensor
    size: torch.Tensor


@torch.no_grad()
def group_statistics(
    params: dict[str, torch.Tensor], space: PruningSpace, update: dict[str, torch.Tensor] | None = None,
    lora: dict[str, LoraFactors] | None = None, *, grad_only: bool = False,
) -> GroupStats:
    """Per-group sums: ||x||^2, x.g, |x*g| (elementwise), x.u, ||u||^2 and group sizes (:class:`GroupStats`).

    ``grad_only`` computes just the gradient terms (``xg``, ``ag``) on the parameters as stored (no
    LoRA effective weights): the cheap per-step statistics of the accumulated criteria. ``ag`` is
    computed only then (zeros otherwise).

    With ``lora`` (from :func:`lora_factors`), ``x`` and ``u`` are the *effective* weight
    W + s*B@A and its change, so a frozen base weight is judged as the model uses it; the adapter
    slices then contribute only their first-order Taylor term (the frozen base has no gradient).

    Each parameter is read once: its products are reduced to one value per index along the sliced
    dim, and groups sum the values of their indices (no strided gathers, and a LoRA effective weight
    is built once however many sets slice it).
    """
    lora = lora or {}
    factor_names = {n for f in lora.values() for n in f.a + f.b}
    if lora and any(is_sharded(params[n]) for n in lora):
        raise ValueError("LoRA adapters on FSDP-sharded weights are not supported by HESSO")
    keys: dict[str, set[tuple[int, int | None]]] = {}
    for gs in space.sets:
        for spec in gs.slices:
            keys.setdefault(spec.param, set()).add((spec.dim, spec.expert))
    # (param, dim, expert) -> {"sq"|"xg"|"ag"|"xu"|"uu": per-index sums over the full index range}
    per_key: dict[tuple[str, int, int | None], dict[str, torch.Tensor]] = {}
    device = None
    for name in sorted(keys):
        p = params[name]
        if is_sharded(p):
            device = device or p.device
        grad = None if p.grad is None else local(p.grad)
        if grad_only:
            if grad is None:
                continue
            x, u = local(p.detach()), None
        elif name in factor_names:
            x, u = local(p.detach()), None
        else:
            f = lora.get(name)
            x = _effective(params, f, p.detach()) if f else local(p.detach())
            u = None
            if f is not None and update is not None and all(k in update for k in f.a + f.b):
                u = _effective(params, f, p.detach(), update)
            elif update is not None and name in update:
                u = local(update[name])
        for dim, expert in keys[name]:
            ex, eg, eu = (t if expert is None or t is None else t[expert] for t in (x, grad, u))
            d = dim - 1 if expert is not None else dim
            out: dict[str, torch.Tensor] = {}
            if eg is not None:
                prod = ex.float() * eg.float()
                out["xg"] = _index_sums(prod, d)
                if grad_only:  # only the accumulated Taylor criterion reads it
                    out["ag"] = _index_sums(prod.abs_(), d)
                del prod
            if name not in factor_names and not grad_only:
                out["sq"] = _per_index(ex, ex, d)
                if eu is not None:
                    out["xu"] = _per_index(ex, eu, d)
                    out["uu"] = _per_index(eu, eu, d)
            if is_sharded(p) and d == 0:  # this rank's rows, placed in the full index range
                start, length = row_range(p)
                for k, v in out.items():
                    full = v.new_zeros(p.shape[0])
                    full[start:start + length] = v
                    out[k] = full
            per_key[(name, dim, expert)] = {k: v.cpu() for k, v in out.items()}
        del x, u, grad

    keys4 = ("sq", "xg", "ag", "xu", "uu")
    # FSDP: a sharded parameter yields partial sums (its local rows); they are summed over ranks.
    full: list[dict[str, torch.Tensor]] = []
    part: list[dict[str, torch.Tensor]] = []
    size = []
    for gs in space.sets:
        n = gs.count
        full.append({k: torch.zeros(n) for k in keys4})
        part.append({k: torch.zeros(n) for k in keys4})
        numel = 0
        for spec in gs.slices:
            p = params[spec.param]
            acc = part[-1] if is_sharded(p) else full[-1]
            if spec.param not in factor_names:
                numel += _full_width(spec, p.shape)
            for k, v in per_key.get((spec.param, spec.dim, spec.expert), {}).items():
                acc[k] += v[spec.index].sum(1)
        size.append(torch.full((n,), float(numel)))
    stats = {k: torch.cat([f[k] for f in full]) for k in keys4}
    stats["size"] = torch.cat(size)
    if device is not None:
        partial = all_reduce_sum(torch.stack([torch.cat([q[k] for q in part]) for k in keys4]), device)
        for k, row in zip(keys4, partial, strict=True):
            stats[k] = stats[k] + row
    return GroupStats(**stats)


def _full_width(spec: SliceSpec, shape) -> int:
    """Elements per group of a slice in the full (unsharded) tensor."""
    return spec.index.shape[1] * spec.per_index_numel(shape)


def saliency(stats: GroupStats, weights: SaliencyWeights) -> torch.Tensor:
    """Weighted sum of the L2-normalised criteria (higher = more important)."""
    norm = stats.sq.sqrt()
    crit = {
        "magnitude": norm,
        "avg_magnitude": norm / stats.size.clamp_min(1),
        "cosine_similarity": stats.xu / (norm * stats.uu.sqrt()).clamp_min(1e-12) + 1.0,
        "taylor_first_order": stats.xg.abs(),
    }
    score = torch.zeros_like(norm)
    for name, values in crit.items():
        w = getattr(weights, name)
        if w:
            score += w * values / values.norm().clamp_min(1e-12)
    return score


def sliced_params(space: PruningSpace, lora: dict[str, LoraFactors]) -> list[str]:
    """Parameters whose update saliency needs: the prunable slices' and every LoRA factor."""
    names = {s.param for gs in space.sets if gs.prunable for s in gs.slices}
    names.update(n for f in lora.values() for n in f.a + f.b)
    return sorted(names)
