"""Pick per-layer bit-widths for a memory budget after a QFA run (sensitivity-guided search).

Every layer's sensitivity is measured, not guessed: around a centre configuration (the cheapest uniform
width whose memory reaches the budget), each layer alone is set to each other width and the loss change
is recorded. An additive model of those changes picks the configuration predicted best under the budget
(a knapsack over layers); a measured local search then walks from the best configuration found so far,
trying the single moves the model ranks first (raise a layer where the budget allows, or raise one and
lower another), and keeps a move only when the measured loss drops. Uniform configurations that fit and
``samples`` random allocations of the same memory are measured too, so the best configuration measured is
never worse on the search blocks than either.

A search that measures dozens of configurations on the same blocks favours the one whose noise happened
to be lowest, so a mixed configuration replaces the best uniform one within the budget only when it beats
it on the blocks by more than ``min_gain_se`` paired standard errors (per-block loss differences); otherwise
the uniform configuration is returned, which is simpler to serve and as good as the blocks can tell. The
test runs on the blocks the mix was chosen on, so it is optimistic: on SmolLM2 a mix that passed it at 2.4
standard errors was worse than uniform 3-bit on held-out blocks (README, QFA without the shared adapter).
With ``holdout`` the last share of the blocks is kept out of the search and the test runs there instead,
on blocks the choice never saw (fewer blocks to search on and to test on: give it more blocks). By default
it is half of the blocks where there are at least 64 (what a QFA run saves), and none below that.
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
from hf_oto.metrics import token_nll
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
    random: list[Candidate] = field(default_factory=list)  # the random allocations of the budget's memory
    mix: Candidate | None = None  # the best mixed configuration measured, when the uniform one was kept over it
    gain_se: float | None = None  # the best mix's paired loss gain over the best uniform fit, in standard errors
    held_out: int = 0  # blocks kept out of the search that gain_se was measured on (0: the search's own blocks)

    def table(self) -> str:
        rows = [("chosen", self.best)] + [(f"uniform {c.bits[0]}-bit", c) for c in self.uniform]
        if self.mix is not None:
            rows.append(("best mix (not chosen)", self.mix))
        if self.random:
            rows.append((f"best of {len(self.random)} random allocations", min(self.random, key=lambda c: c.loss)))
        lines = ["| configuration | avg bits | MiB | eval loss | perplexity |", "|---|---|---|---|---|"]
        for name, c in rows:
            lines.append(f"| {name} | {c.average_bits:.2f} | {c.bytes / 2**20:.2f} | {c.loss:.4f} | "
                         f"{c.perplexity:.2f} |")
        if self.gain_se is not None:
            verdict = "kept" if self.mix is None else "not enough: the uniform configuration is kept"
            where = (f"on {self.held_out} held-out blocks" if self.held_out
                     else "on the blocks it was chosen on")
            lines.append(f"\nthe best mix's gain over the best uniform configuration within the budget, {where}: "
                         f"{self.gain_se:.1f} paired standard errors ({verdict})")
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
def block_losses(model: nn.Module, bits: Sequence[int] | int, blocks: torch.Tensor,
                 batch_size: int = 8) -> torch.Tensor:
    """Each block's mean next-token loss (float64, one per row of ``blocks``, N x T input ids) of ``model``
    at per-layer ``bits``."""
    set_bits(model, bits)
    was = model.training
    model.eval()
    out = []
    device = next(model.parameters()).device
    try:
        for i in range(0, blocks.shape[0], batch_size):
            ids = blocks[i:i + batch_size].to(device)
            out.append(token_nll(model(input_ids=ids).logits, ids).double().mean(dim=1).cpu())
    finally:
        model.train(was)
    return torch.cat(out)


def eval_loss(model: nn.Module, bits: Sequence[int] | int, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token loss of ``model`` at per-layer ``bits`` on ``blocks`` (N x T input ids)."""
    return float(block_losses(model, bits, blocks, batch_size).mean())


def paired_gain_se(worse: torch.Tensor, better: torch.Tensor) -> float:
    """The mean per-block loss gain of ``better`` over ``worse`` in paired standard errors (inf when every
    block gains the same positive amount, 0 when there is no gain)."""
    d = worse - better
    gain = float(d.mean())
    if gain <= 0:
        return 0.0
    se = float(d.std()) / math.sqrt(d.numel()) if d.numel() > 1 else 0.0
    return gain / se if se > 0 else math.inf


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


AUTO_HOLDOUT, AUTO_HOLDOUT_BLOCKS = 0.5, 64  # the default holdout, from this many blocks on (README: QFA search)


def check_holdout(holdout: float | None, name: str = "holdout") -> None:
    """One clear error for a ``holdout`` outside [0, 1) (``name``: the setting as the user typed it)."""
    if holdout is not None and not 0.0 <= holdout < 1.0:
        raise ConfigError(f"{name} is the share of the blocks kept out of the search: in [0, 1), got {holdout}")


def resolve_holdout(holdout: float | None, n_blocks: int) -> float:
    """``holdout`` as given, or (None) the default: half of the blocks from 64 blocks on, none below."""
    if holdout is not None:
        return holdout
    return AUTO_HOLDOUT if n_blocks >= AUTO_HOLDOUT_BLOCKS else 0.0


def qfa_search(model: nn.Module, blocks: torch.Tensor, *, average_bits: float | None = None,
               max_bytes: int | None = None, samples: int = 8, refine: int = 16, seed: int = 0,
               min_gain_se: float = 2.0, holdout: float | None = None, progress: bool = True) -> SearchResult:
    """The per-layer widths with the lowest eval loss on ``blocks`` within the budget.

    Give the budget as ``average_bits`` (mean width of the quantized weights) or ``max_bytes``
    (the export's weight bytes, estimated from the kept shapes). Each layer's sensitivity costs
    ``layers x (widths - 1)`` evaluations; ``samples`` random allocations of the budget's memory and up to
    ``refine`` steps of the measured local search come on top. A mixed configuration is chosen over the best
    uniform one that fits only when it beats it by more than ``min_gain_se`` paired standard errors on the
    blocks (0: whenever its mean loss is lower); with ``holdout`` (a share of the blocks, e.g. 0.5) on the last
    blocks, which the search does not see (None: 0.5 from 64 blocks on, else 0). To search several budgets of
    one model, use :class:`BitSearch`, which measures each configuration once.
    """
    search = BitSearch(model, blocks, holdout=holdout, progress=progress)
    return search.search(average_bits=average_bits, max_bytes=max_bytes, samples=samples, refine=refine, seed=seed,
                         min_gain_se=min_gain_se)


class BitSearch:
    """The bit-width search on one QFA model and evaluation set; every configuration is measured once,
    however many budgets are searched (see the module docstring for the method)."""

    def __init__(self, model: nn.Module, blocks: torch.Tensor, *, holdout: float | None = None,
                 progress: bool = True):
        layers_q = qfa_layers(model)
        if not layers_q:
            raise ConfigError("qfa_search needs a QFA model (prepare_qfa, or load_qfa_run)")
        check_holdout(holdout)
        holdout = resolve_holdout(holdout, len(blocks))
        held = round(len(blocks) * holdout)
        if holdout and (held < 2 or held == len(blocks)):
            raise ConfigError(f"holdout {holdout:g} of {len(blocks)} blocks leaves {held} to test on and "
                              f"{len(blocks) - held} to search on; both need blocks (at least 2 to test on): "
                              "give more blocks or holdout 0")
        self.model, self.progress = model, progress
        self.blocks, self.held = blocks[:len(blocks) - held], (blocks[len(blocks) - held:] if held else None)
        self._held_losses: dict[tuple[int, ...], torch.Tensor] = {}
        self.widths = sorted(layers_q[0][2].bits)
        self.n = len(decoder_layers(model)[1])
        self.costs = Costs(model)
        self._losses: dict[tuple[int, ...], torch.Tensor] = {}  # per-block losses of each measured configuration

    def limit(self, average_bits: float | None = None, max_bytes: int | None = None) -> int:
        """The budget in bytes; one clear error when it is malformed or below the narrowest configuration."""
        costs, widths, n = self.costs, self.widths, self.n
        if (average_bits is None) == (max_bytes is None):
            raise ConfigError("give the budget as average_bits or as max_bytes (one of them)")
        if average_bits is not None:
            # the bytes of the average-bits budget: interpolate each layer's bytes between widths
            limit = costs.other + sum(bytes_at_average(costs, i, average_bits, widths) for i in range(n))
        else:
            limit = int(max_bytes)
        smallest = costs.bytes([widths[0]] * n)
        if limit < smallest or (average_bits is not None and average_bits < widths[0]):
            raise ConfigError(f"the budget ({_describe(average_bits, max_bytes)}) is below the smallest "
                              f"configuration ({costs.average_bits([widths[0]] * n):.2f} bits, "
                              f"{smallest / 2**20:.2f} MiB)")
        return limit

    def search(self, *, average_bits: float | None = None, max_bytes: int | None = None, samples: int = 8,
               refine: int = 16, seed: int = 0, min_gain_se: float = 2.0) -> SearchResult:
        """The best measured configuration within the budget (see :func:`qfa_search`)."""
        limit = self.limit(average_bits, max_bytes)
        costs, widths, n = self.costs, self.widths, self.n
        seen: dict[tuple[int, ...], Candidate] = {}
        bar = tqdm(total=len(widths) * (1 + n) - n + 1 + samples + refine, desc="qfa-search",
                   disable=not self.progress)

        def measure(cfg: tuple[int, ...]) -> Candidate:
            if cfg not in seen:
                if cfg not in self._losses:
                    self._losses[cfg] = block_losses(self.model, cfg, self.blocks)
                seen[cfg] = Candidate(cfg, costs.average_bits(cfg), costs.bytes(cfg), float(self._losses[cfg].mean()))
                bar.update(1)
            return seen[cfg]

        try:
            uniform = [measure((b,) * n) for b in widths]
            # the probes' centre: the cheapest uniform width that reaches the budget (the widest if all fit)
            centre = next((b for b in widths if costs.bytes((b,) * n) >= limit), widths[-1])
            theta = self._probe(centre, measure)
            measure(_knapsack(theta, widths, costs, limit) or (widths[0],) * n)
            g = torch.Generator().manual_seed(seed)
            drawn = {self.random_allocation(limit, g) for _ in range(samples)}
            random = [measure(cfg) for cfg in sorted(drawn)]
            best = min((c for c in seen.values() if c.bytes <= limit), key=lambda c: c.loss)
            for _ in range(refine):  # measured local search: the model's best untried move from the best
                step = next((cfg for cfg in self._moves(best.bits, theta, limit) if cfg not in seen), None)
                if step is None:
                    break
                tried = measure(step)
                if tried.loss < best.loss:
                    best = tried
        finally:
            bar.close()
            set_bits(self.model, widths[-1])
        mix, gain_se = None, None
        fits = [c for c in uniform if c.bytes <= limit]
        if fits and len(set(best.bits)) > 1:  # a mix must beat the best uniform fit beyond the blocks' noise
            anchor = min(fits, key=lambda c: c.loss)
            if self.held is not None:  # the test on blocks the search never saw
                gain_se = paired_gain_se(self._held_loss(anchor.bits), self._held_loss(best.bits))
            else:
                gain_se = paired_gain_se(self._losses[anchor.bits], self._losses[best.bits])
            if gain_se <= min_gain_se:
                best, mix = anchor, best
        return SearchResult(best, uniform, len(seen), (theta[:, 0] - theta[:, -1]).tolist(), random, mix, gain_se,
                            0 if self.held is None else len(self.held))

    def _held_loss(self, cfg: tuple[int, ...]) -> torch.Tensor:
        if cfg not in self._held_losses:
            try:
                self._held_losses[cfg] = block_losses(self.model, cfg, self.held)
            finally:
                set_bits(self.model, self.widths[-1])
        return self._held_losses[cfg]

    def _probe(self, centre: int, measure) -> torch.Tensor:
        """theta[i, j]: the loss change when layer i alone moves from ``centre`` to ``widths[j]``."""
        base = (centre,) * self.n
        ref = measure(base).loss
        theta = torch.zeros(self.n, len(self.widths), dtype=torch.float64)
        for i in range(self.n):
            for j, b in enumerate(self.widths):
                if b != centre:
                    theta[i, j] = measure(base[:i] + (b,) + base[i + 1:]).loss - ref
        return theta

    def random_allocation(self, limit: int, g: torch.Generator) -> tuple[int, ...]:
        """A random allocation of ``limit`` bytes to the two widths around it: in a random order, each layer
        takes the wider one if it still fits (the baseline a search has to beat)."""
        costs, widths = self.costs, self.widths
        lo = max(b for b in widths if costs.bytes((b,) * self.n) <= limit)
        hi = next((b for b in widths if b > lo), lo)
        cfg = [lo] * self.n
        for i in torch.randperm(self.n, generator=g).tolist():
            cfg[i] = hi
            if costs.bytes(cfg) > limit:
                cfg[i] = lo
        return tuple(cfg)

    def _moves(self, cfg: tuple[int, ...], theta: torch.Tensor, limit: int):
        """Neighbours of ``cfg`` within the budget that the model predicts better, best first: one layer a
        width up, or one up and another one down; each then spends what is left (:meth:`_fill`)."""
        widths = self.widths
        index = [widths.index(b) for b in cfg]
        used = self.costs.bytes(cfg)
        scored: list[tuple[float, dict[int, int]]] = []
        for i in (i for i in range(self.n) if index[i] + 1 < len(widths)):
            gain, extra = self._step(theta, i, index[i], +1)
            if used + extra <= limit:
                scored.append((gain, {i: index[i] + 1}))
                continue
            for k in (k for k in range(self.n) if k != i and index[k] > 0):
                loss, saved = self._step(theta, k, index[k], -1)
                if used + extra + saved <= limit:
                    scored.append((gain + loss, {i: index[i] + 1, k: index[k] - 1}))
        scored.sort(key=lambda s: s[0])
        for predicted, moved in scored:
            if predicted >= 0:
                return
            yield self._fill(tuple(widths[moved.get(i, j)] for i, j in enumerate(index)), theta, limit)

    def _fill(self, cfg: tuple[int, ...], theta: torch.Tensor, limit: int) -> tuple[int, ...]:
        """Raise layers one width at a time while the budget allows, the largest predicted gain per byte first."""
        widths = self.widths
        out = list(cfg)
        while True:
            used, options = self.costs.bytes(out), []
            for i, b in enumerate(out):
                j = widths.index(b)
                if j + 1 == len(widths):
                    continue
                gain, extra = self._step(theta, i, j, +1)
                if gain < 0 and used + extra <= limit:
                    options.append((gain / max(extra, 1), i))
            if not options:
                return tuple(out)
            i = min(options)[1]
            out[i] = widths[widths.index(out[i]) + 1]

    def _step(self, theta: torch.Tensor, layer: int, j: int, d: int) -> tuple[float, int]:
        """(predicted loss change, bytes change) of moving ``layer`` from ``widths[j]`` to ``widths[j + d]``."""
        before, after = self.widths[j], self.widths[j + d]
        return (float(theta[layer, j + d] - theta[layer, j]),
                self.costs.layer_bytes(layer, after) - self.costs.layer_bytes(layer, before))


def bytes_at_average(costs: Costs, layer: int, avg: float, widths: Sequence[int]) -> int:
    """A layer's bytes at a mean width ``avg``, interpolated between the widths around it."""
    lo = max([b for b in widths if b <= avg], default=widths[0])
    hi = min([b for b in widths if b >= avg], default=widths[-1])
    if hi == lo:
        return costs.layer_bytes(layer, lo)
    t = (avg - lo) / (hi - lo)
    return int(costs.layer_bytes(layer, lo) * (1 - t) + costs.layer_bytes(layer, hi) * t)


def _describe(bits: float | None, nbytes: int | None) -> str:
    return f"{bits} bits" if bits is not None else f"{nbytes / 2**20:.2f} MiB"
