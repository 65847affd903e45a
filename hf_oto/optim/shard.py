"""FSDP2 support: where a row-sharded parameter's local shard sits in the full tensor.

FSDP2 (``torch.distributed.fsdp.fully_shard``) stores each parameter as a DTensor sharded on dim 0
over a 1-D mesh, torch.chunk style. HESSO works on local shards: slice indices along dim 0 are narrowed
to the local rows, other dims are whole, and per-group partial sums are all-reduced across ranks.
"""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor, Shard


def is_sharded(t: torch.Tensor) -> bool:
    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The rank-local tensor of a DTensor (a view that shares storage), or ``t`` itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def row_range(t: torch.Tensor) -> tuple[int, int]:
    """(first row, number of rows) of this rank's shard of a dim-0-sharded DTensor."""
    if not isinstance(t, DTensor):
        return 0, t.shape[0]
    mesh = t.device_mesh
    if mesh.ndim != 1 or tuple(t.placements) != (Shard(0),):
        raise ValueError(f"HESSO supports FSDP2's dim-0 sharding on a 1-D mesh, got placements {t.placements}")
    n, world, rank = t.shape[0], mesh.size(), mesh.get_local_rank()
    chunk = math.ceil(n / world)
    start = min(rank * chunk, n)
    length = t.to_local().shape[0]
    if length != max(0, min(chunk, n - start)):
        raise ValueError(f"unexpected FSDP shard: {length} local rows of {n} on rank {rank} of {world}")
    return start, length


def all_reduce_sum(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` summed over all ranks (reduced on ``device``, where the process group can reach it)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return t
    out = t.to(device)
    torch.distributed.all_reduce(out)
    return out.to(t.device)


def unsharded_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A plain (unsharded) CPU copy of an FSDP2 model, for :func:`hf_oto.construct_subnet` and export.

    Collective: every rank must call it (each parameter is all-gathered); every rank gets the copy.
    """
    import copy

    full = {n: local(p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().clone()
            for n, p in model.state_dict().items()}
    plain = type(model)(copy.deepcopy(model.config))  # buffers (e.g. rotary tables) built as usual
    result = plain.load_state_dict(full, strict=False)
    if result.missing_keys:
        raise ValueError(f"could not rebuild an unsharded copy: missing {result.missing_keys[:3]}")
    return plain.eval()
