"""Pick per-layer bit-widths for a memory budget after a QFA run (sensitivity-guided search).

Following LLM-QFA: evaluate random configurations, estimate each layer's sensitivity from them
(an additive loss model fitted by least squares: one term per layer and width), take the
configuration the model predicts best under the budget (a knapsack over layers), then evaluate
candidates in the space narrowed around it (re-drawing only the most sensitive layers) and keep
the best measured one that fits.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from hf_oto.errors import ConfigError
from hf_oto.quant.prepare import decoder_layers, qfa_layers, set_bits


@dataclass
class Candidate:
    bits: tuple[int, ...]
    average_bits: float
    bytes: int
    loss: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)


@dataclass
class SearchResult:
    best: Candidate
    uniform: list[Candidate]
    evaluated: int
    sensitivity: list[float] = field(default_factory=list)  # loss rise per layer, lowest -> highest width

    def table(self) -> str:
        rows = [("chosen", self.best)] + [(f"uniform {c.bits[0]}-bit", c) for c in self.uniform]
        lines = ["| configuration | avg bits | MiB | eval loss | perplexity |", "|---|---|---|---|---|"]
        for name, c in rows:
            lines.append(f"| {name} | {c.average_bits:.2f} | {c.bytes / 2**20:.2f} | {c.loss:.4f} | "
                         f"{c.perplexity:.2f} |")
        return "\n".join(lines)


def parse_budget(text: str) -> tuple[float | None, int | None]:
    """``"2.5"`` (average bits) or ``"300MB"``/``"1.2GiB"``/``"123456B"`` (bytes) -> (bits, bytes)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMG]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise ConfigError(f"budget must be average bits (e.g. 2.5) or a size (e.g. 300MB), got {text!r}")
    value, unit = float(m.group(1)), (m.group(2) or "").upper()
    if not unit:
        return value, None
    scale = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return None, int(value * scale)


class Costs:
    """Weight bits and bytes of a configuration (kept rows/columns only, when gates pruned some)."""

    def __init__(self, model: nn.Module):
        self.per_layer: dict[int, list[tuple[int, int, int]]] = {}  # layer -> (rows, cols, group_size)
        for _, i, m in qfa_layers(model):
            rows = int((m.gate_out != 0).sum()) if m.gate_out is not None else m.out_features
            cols = int((m.gate_in != 0).sum()) if m.gate_in is not None else m.in_features
            self.per_layer.setdefault(i, []).append((rows, cols, m.group_size))
        qfa_params = {id(p) for _, _, m in qfa_layers(model) for p in m.parameters()}
        self.other = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in qfa_params)
        self.scale_bytes = next(p for p in model.parameters() if p.is_floating_point()).element_size()
        self.weights = sum(r * c for mods in self.per_layer.values() for r, c, _ in mods)

    def layer_bytes(self, layer: int, bits: int) -> int:
        return sum(r * math.ceil(c * bits / 32) * 4 + r * (c // g) * self.scale_bytes
                   for r, c, g in self.per_layer.get(layer, []))

    def layer_weights(self, layer: int) -> int:
        return sum(r * c for r, c, _ in self.per_layer.get(layer, []))

    def bytes(self, bits: Sequence[int]) -> int:
        return self.other + sum(self.layer_bytes(i, b) for i, b in enumerate(bits))

    def average_bits(self, bits: Sequence[int]) -> float:
        return sum(self.layer_weights(i) * b for i, b in enumerate(bits)) / self.weights


@torch.no_grad()
def eval_loss(model: nn.Module, bits: Sequence[int] | int, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token loss of ``model`` at per-layer ``bits`` on ``blocks`` (N x T input ids)."""
    set_bits(model, bits)
    was = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    try:
        for i in range(0, blocks.shape[0], batch_size):
            ids = blocks[i:i + batch_size].to(device)
            logits = model(input_ids=ids).logits[:, :-1].float()
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                               reduction="sum")
            total, count = total + float(loss), count + ids[:, 1:].numel()
    finally:
        model.train(was)
    return total / count


def _knapsack(theta: torch.Tensor, widths: Sequence[int], costs: Costs, limit: int) -> tuple[int, ...] | None:
    """Per-layer widths minimising the summed predicted loss with bytes <= limit (DP over a byte grid)."""
    layers = theta.shape[0]
    unit = max(1, (limit - costs.other) // 4000)
    best: dict[int, tuple[float, tuple[int, ...]]] = {0: (0.0, ())}
    for i in range(layers):
        nxt: dict[int, tuple[float, tuple[int, ...]]] = {}
        for used, (score, choice) in best.items():
            for j, b in enumerate(widths):
                u = used + math.ceil(costs.layer_bytes(i, b) / unit)
                if u * unit > limit - costs.other:
                    continue
                s = score + float(theta[i, j])
                if u not in nxt or s < nxt[u][0]:
                    nxt[u] = (s, choice + (b,))
        best = nxt
    if not best:
        return None
    return min(best.values())[1]


def qfa_search(model: nn.Module, blocks: torch.Tensor, *, average_bits: float | None = None,
               max_bytes: int | None = None, samples: int = 32, refine: int = 16, seed: int = 0,
               progress: bool = True) -> SearchResult:
    """The per-layer widths with the lowest eval loss on ``blocks`` within the budget.

    Give the budget as ``average_bits`` (mean width of the quantized weights) or ``max_bytes``
    (the export's weight bytes, estimated from the kept shapes). ``samples`` random configurations
    fit the sensitivity model; ``refine`` candidates are drawn in the narrowed space.
    """
    layers_q = qfa_layers(model)
    if not layers_q:
        raise ConfigError("qfa_search needs a QFA model (prepare_qfa, or load_qfa_run)")
    widths = sorted(layers_q[0][2].bits)
    n = len(decoder_layers(model)[1])
    costs = Costs(model)
    if (average_bits is None) == (max_bytes is None):
        raise ConfigError("give the budget as average_bits or as max_bytes (one of them)")
    if average_bits is not None:
        # the bytes of the average-bits budget: interpolate each layer's bytes between widths
        limit = costs.other + sum(bytes_at_average(costs, i, average_bits, widths) for i in range(n))
    else:
        limit = max_bytes
    smallest = costs.bytes([widths[0]] * n)
    if limit < smallest or (average_bits is not None and average_bits < widths[0]):
        raise ConfigError(f"the budget ({_describe(average_bits, max_bytes)}) is below the smallest configuration "
                          f"({costs.average_bits([widths[0]] * n):.2f} bits, {smallest / 2**20:.2f} MiB)")
    g = torch.Generator().manual_seed(seed)
    seen: dict[tuple[int, ...], Candidate] = {}
    bar = tqdm(total=len(widths) + samples + refine + 1, desc="qfa-search", disable=not progress)

    def measure(cfg: tuple[int, ...]) -> Candidate:
        if cfg not in seen:
            seen[cfg] = Candidate(cfg, costs.average_bits(cfg), costs.bytes(cfg), eval_loss(model, cfg, blocks))
            bar.update(1)
        return seen[cfg]

    uniform = [measure(tuple([b] * n)) for b in widths]
    for _ in range(samples):
        measure(tuple(widths[j] for j in torch.randint(len(widths), (n,), generator=g).tolist()))
    theta = _fit(list(seen.values()), widths, n)
    sensitivity = (theta[:, 0] - theta[:, -1]).tolist()
    pick = _knapsack(theta, widths, costs, limit) or tuple([widths[0]] * n)
    measure(pick)
    ranked = sorted(range(n), key=lambda i: -sensitivity[i])
    hot = ranked[:max(1, n // 2)]
    for _ in range(refine * 4):
        if len(seen) >= len(widths) + samples + refine + 1:
            break
        cand = list(pick)
        for i in hot:
            if torch.rand((), generator=g) < 0.5:
                cand[i] = widths[int(torch.randint(len(widths), (), generator=g))]
        cand = _fit_budget(cand, ranked, widths, costs, limit)
        if cand is not None:
            measure(tuple(cand))
    bar.close()
    set_bits(model, widths[-1])
    fitting = [c for c in seen.values() if c.bytes <= limit]
    best = min(fitting, key=lambda c: c.loss)
    return SearchResult(best, uniform, len(seen), sensitivity)


def bytes_at_average(costs: Costs, layer: int, avg: float, widths: Sequence[int]) -> int:
    """A layer's bytes at a mean width ``avg``, interpolated between the widths around it."""
    lo = max([b for b in widths if b <= avg], default=widths[0])
    hi = min([b for b in widths if b >= avg], default=widths[-1])
    if hi == lo:
        return costs.layer_bytes(layer, lo)
    t = (avg - lo) / (hi - lo)
    return int(costs.layer_bytes(layer, lo) * (1 - t) + costs.layer_bytes(layer, hi) * t)


def _fit_budget(cand: list[int], ranked: list[int], widths: Sequence[int], costs: Costs, limit: int):
    """Lower the least sensitive layers' widths until ``cand`` fits (None if it cannot)."""
    for i in reversed(ranked):
        while costs.bytes(cand) > limit and cand[i] > widths[0]:
            cand[i] = widths[widths.index(cand[i]) - 1]
    return cand if costs.bytes(cand) <= limit else None


def _fit(cands: list[Candidate], widths: Sequence[int], n: int) -> torch.Tensor:
    """Least-squares additive model: loss ~ sum_i theta[i, width_i] (ridge-regularised)."""
    k = len(widths)
    x = torch.zeros(len(cands), n * k, dtype=torch.float64)
    y = torch.tensor([c.loss for c in cands], dtype=torch.float64)
    for r, c in enumerate(cands):
        for i, b in enumerate(c.bits):
            x[r, i * k + widths.index(b)] = 1.0
    mean = y.mean()
    a = x.T @ x + 1e-3 * torch.eye(n * k, dtype=torch.float64)
    theta = torch.linalg.solve(a, x.T @ (y - mean))
    return theta.reshape(n, k).float()


def _describe(bits: float | None, nbytes: int | None) -> str:
    return f"{bits} bits" if bits is not None else f"{nbytes / 2**20:.2f} MiB"
