"""The joint search over sizes and per-layer bit-widths of an elastic QFA run (APQ's search, from one run).

An elastic QFA run (``qfa`` with ``elastic_sizes``) trains nested sub-networks and one adapter per
bit-width together, so every (size, per-layer bits) pair is a model it trained. For each size (the full
model included) the size's groups are zeroed through the quantized layers' gates, which computes what its
masked view computed in training (zero-invariance) and what its export will hold; then the per-layer
search of :func:`~hf_oto.quant.search.qfa_search` runs under the memory budget with that size's kept
shapes. The pair with the lowest held-out loss wins. A smaller size leaves more bits per weight for the
same bytes; which trade is better is what the search measures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from hf_oto.errors import ConfigError
from hf_oto.groups.space import PruningSpace, zero_groups
from hf_oto.io import JSONObject
from hf_oto.quant.prepare import decoder_layers, target_linears
from hf_oto.quant.pruning import qfa_space
from hf_oto.quant.run import QFARun, base_model_for_space
from hf_oto.quant.search import Candidate, Costs, SearchResult, bytes_at_average, qfa_search


@dataclass
class SizeResult:
    """One size's best configuration under the budget (``search`` is None when even its narrowest does not fit)."""

    size: float
    search: SearchResult | None
    smallest_bytes: int


@dataclass
class JointResult:
    """The chosen (size, bits) and every size's own best, under one memory budget (``limit`` bytes)."""

    size: float
    best: Candidate
    per_size: list[SizeResult]
    limit: int

    @property
    def evaluated(self) -> int:
        return sum(r.search.evaluated for r in self.per_size if r.search is not None)

    def table(self) -> str:
        lines = [f"budget: {self.limit / 2**20:.2f} MiB",
                 "| size (kept) | best bits per layer (avg) | MiB | eval loss | perplexity | best uniform that fits |",
                 "|---|---|---|---|---|---|"]
        for r in self.per_size:
            if r.search is None:
                lines.append(f"| {r.size:g} | does not fit (narrowest: {r.smallest_bytes / 2**20:.2f} MiB) | | | | |")
                continue
            b = r.search.best
            fits = [c for c in r.search.uniform if c.bytes <= self.limit]
            uniform = (f"{fits[-1].bits[0]}-bit: {fits[-1].perplexity:.2f}" if fits else "none")
            mark = " (chosen)" if r.size == self.size else ""
            lines.append(f"| {r.size:g}{mark} | {b.average_bits:.2f} | {b.bytes / 2**20:.2f} | {b.loss:.4f} | "
                         f"{b.perplexity:.2f} | {uniform} |")
        return "\n".join(lines)


def run_sizes(info: JSONObject) -> list[float]:
    """The sizes an elastic QFA run trained, largest first (empty for a plain QFA run)."""
    data = info.get("elastic") or {}
    return sorted((float(k) for k in data.get("sizes", {})), reverse=True)


def run_spaces(run: QFARun) -> tuple[PruningSpace, PruningSpace]:
    """(space on the base architecture, the same groups on the QFA layers' gates and adapters) of a saved
    elastic QFA run, rebuilt from the settings it recorded."""
    from hf_oto.export.sizes import size_space

    data = run.info["elastic"]
    base = base_model_for_space(run.info)
    space = size_space(base, data)
    targets = {name: tuple(m.weight.shape) for name, _, m in target_linears(base, run.config)}
    return space, qfa_space(space, targets, run.config, int(data["record"]["ffn_multiple"]))


def check_size(info: JSONObject, size: float) -> float:
    """``size`` if the run trained it (1.0 always); one clear error naming the trained sizes otherwise."""
    sizes = [1.0, *run_sizes(info)]
    if not any(math.isclose(size, s) for s in sizes):
        raise ConfigError(f"size {size:g} was not trained in this run; its sizes are "
                          f"{', '.join(f'{s:g}' for s in sorted(sizes))}")
    return next(s for s in sizes if math.isclose(size, s))


def zero_size(model: nn.Module, info: JSONObject, gates: PruningSpace, size: float) -> None:
    """Zero (in place) the gates and adapter rows of ``size``'s removed groups (nothing for 1.0)."""
    if size < 1.0:
        zero_groups(model, gates, info["elastic"]["sizes"][f"{size:g}"]["removed"])


def joint_search(run: QFARun, blocks: torch.Tensor, *, average_bits: float | None = None,
                 max_bytes: int | None = None, sizes: list[float] | None = None, samples: int = 8,
                 refine: int = 16, seed: int = 0, min_gain_se: float = 2.0, holdout: float | None = None,
                 progress: bool = True) -> JointResult:
    """The (size, per-layer bits) of an elastic QFA run with the lowest loss on ``blocks`` within the budget.

    ``max_bytes``: the export's weight bytes; ``average_bits``: the bytes of the full model at that mean width
    (so smaller sizes may spend more bits per weight). ``sizes``: the ones to consider (default: every trained
    size and the full model). ``min_gain_se``, ``holdout``: each size's search, as in
    :func:`~hf_oto.quant.qfa_search`. The run's model is left as it was loaded.
    """
    if (average_bits is None) == (max_bytes is None):
        raise ConfigError("give the budget as average_bits or as max_bytes (one of them)")
    model = run.model
    _, gates = run_spaces(run)
    chosen = sorted({check_size(run.info, s) for s in (sizes or [1.0, *run_sizes(run.info)])}, reverse=True)
    widths = sorted(run.config.bits)
    n = len(decoder_layers(model)[1])
    if average_bits is not None:
        full = Costs(model)
        limit = full.other + sum(bytes_at_average(full, i, average_bits, widths) for i in range(n))
    else:
        limit = int(max_bytes)
    touched = {sl.param for gs in gates.sets for sl in gs.slices}
    saved = {name: p.detach().clone() for name, p in model.named_parameters() if name in touched}
    results: list[SizeResult] = []
    try:
        for size in chosen:  # largest first: each size's removals contain the previous one's
            zero_size(model, run.info, gates, size)
            smallest = Costs(model).bytes([widths[0]] * n)
            found = None
            if smallest <= limit:
                found = qfa_search(model, blocks, max_bytes=limit, samples=samples, refine=refine, seed=seed,
                                   min_gain_se=min_gain_se, holdout=holdout, progress=progress)
            results.append(SizeResult(size, found, smallest))
    finally:
        with torch.no_grad():
            params = dict(model.named_parameters())
            for name, value in saved.items():
                params[name].copy_(value)
    fitting = [r for r in results if r.search is not None]
    if not fitting:
        narrowest = min(r.smallest_bytes for r in results)
        raise ConfigError(f"the budget ({limit / 2**20:.2f} MiB) is below every size's smallest configuration "
                          f"(the smallest: {narrowest / 2**20:.2f} MiB at {widths[0]} bits)")
    win = min(fitting, key=lambda r: r.search.best.loss)
    return JointResult(win.size, win.search.best, results, limit)
