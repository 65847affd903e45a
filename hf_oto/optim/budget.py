"""Which groups to prune: a greedy fill of a parameter budget under the pruning space's constraints.

Items are single attention groups or chunks of FFN channels (so FFN widths move in multiples of
``ffn_multiple``); with ``layout="uniform"`` an item is "the next-lowest group of this kind in every
layer", so all layers end with the same counts and the export is a stock config
(``"per_layer_ffn"`` does that for attention groups only). Items are taken
in ascending saliency while the exact pruned parameter count stays within the tolerance.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from hf_oto.errors import ConfigError
from hf_oto.groups.space import (
    EXPERT_MULTIPLE,
    FFN_KINDS,
    LAYOUTS,
    WHOLE_KINDS,
    ExpertInfo,
    FFNInfo,
    GroupSet,
    Layout,
    PruningSpace,
    expert_channel_sets,
    field_tie,
    kept_uniform,
    layer_relative,
)

# How removals are ranked: by the removed groups' mean saliency ("saliency", lowest first), or by
# saliency per parameter freed ("per_param": the greedy rule of a knapsack that frees the budget at
# the least total saliency, so a head that frees 40x an FFN channel's parameters may cost 40x more).
SELECTIONS: tuple[str, ...] = ("saliency", "per_param")


@dataclass(frozen=True)
class BudgetRules:
    """The rules every plan keeps, whoever ranks the groups (HESSO, one-shot, pricing trials).

    ``layout``: ``"uniform"`` (the same counts in every layer: a stock config), ``"per_layer_ffn"``
    (attention uniform, FFN widths per layer) or ``"global"``. Kept FFN widths stay multiples of
    ``ffn_multiple``; at least ``min_keep`` groups stay in every set; removals are ranked by
    ``selection`` (see :data:`SELECTIONS`); targets are met within ``tolerance`` (a fraction of the
    target) where the group sizes allow.
    """

    layout: Layout = "uniform"
    ffn_multiple: int = 8
    min_keep: int = 1
    selection: str = "saliency"
    tolerance: float = 0.01

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ConfigError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.selection not in SELECTIONS:
            raise ConfigError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.ffn_multiple < 1 or self.min_keep < 0:
            raise ConfigError(f"ffn_multiple must be >= 1 and min_keep >= 0, got {self.ffn_multiple}, {self.min_keep}")
        if not 0.0 <= self.tolerance < 1.0:
            raise ConfigError(f"tolerance must be in [0, 1), got {self.tolerance}")


@dataclass
class Item:
    score: float
    members: list[tuple[int, list[int]]]  # (set index, group indices within the set)
    chain: tuple  # items of one chain must be taken in order
    order: int


@dataclass
class Plan:
    """Removal state per set, with exact parameter accounting (GQA kv groups and query slots overlap)."""

    space: PruningSpace
    removed: list[set[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.removed:
            self.removed = [set() for _ in self.space.sets]
        self._partner: dict[int, int] = {}
        by_prefix: dict[str, dict[str, int]] = defaultdict(dict)
        for k, gs in enumerate(self.space.sets):
            by_prefix[gs.prefix][gs.kind] = k
        for kinds in by_prefix.values():
            if "kv_group" in kinds and "query_head" in kinds:
                self._partner[kinds["kv_group"]] = kinds["query_head"]
                self._partner[kinds["query_head"]] = kinds["kv_group"]
        # whole-layer sets overlap every set of their layer, whole-block sets every set of their block:
        # a removed layer or block frees all of its parameters
        self._whole = self.space.layer_sets()
        self._blocks = self.space.block_sets()
        self._in_layer: dict[int, list[int]] = defaultdict(list)
        for k, gs in enumerate(self.space.sets):
            if gs.kind not in WHOLE_KINDS:
                self._in_layer[gs.layer].append(k)
        # whole-expert sets overlap their experts' channel sets: a removed expert frees all of its channels
        self._inner = expert_channel_sets(self.space.sets)
        self._outer = {c: (k, e) for k, inner in self._inner.items() for e, c in inner.items()}

    @classmethod
    def from_mask(cls, space: PruningSpace, mask: torch.Tensor) -> Plan:
        """A plan whose removed groups are those set in ``mask`` (a flag per flat group)."""
        plan = cls(space)
        for k, gs in enumerate(space.sets):
            off = space.set_offset(k)
            plan.removed[k] = set(torch.nonzero(mask[off:off + gs.count]).flatten().tolist())
        return plan

    def mask(self) -> torch.Tensor:
        """The removed groups as a flag per flat group."""
        out = torch.zeros(len(self.space), dtype=torch.bool)
        for k, removed in enumerate(self.removed):
            off = self.space.set_offset(k)
            out[[off + j for j in removed]] = True
        return out

    def kept(self, k: int) -> int:
        """Groups of set k that this plan keeps."""
        return self.space.sets[k].count - len(self.removed[k])

    def _overlap(self, k: int) -> int:
        """Params shared by one group of set k and one group of its partner (one query head)."""
        gs = self.space.sets[k]
        q = gs if gs.kind == "query_head" else self.space.sets[self._partner[k]]
        return q.params_per_group // q.attention.num_kv_heads

    def layer_gone(self, layer: int) -> bool:
        """Whether this plan removes the whole decoder layer (its layer group, or both of its blocks)."""
        k = self._whole.get(layer)
        if k is None:
            return False
        if self.removed[k]:
            return True
        a, m = self._blocks.get((layer, "attention")), self._blocks.get((layer, "mlp"))
        return (self.space.sets[k].prunable and a is not None and m is not None
                and bool(self.removed[a]) and bool(self.removed[m]))

    def block_gone(self, layer: int, block: str) -> bool:
        """Whether this plan removes the whole attention or MLP block of ``layer``."""
        k = self._blocks.get((layer, block))
        return k is not None and bool(self.removed[k])

    def expert_gone(self, k: int) -> bool:
        """Whether set k holds the channels of an expert this plan removes whole."""
        outer = self._outer.get(k)
        return outer is not None and outer[1] in self.removed[outer[0]]

    def gain(self, k: int, chunk: Sequence[int]) -> int:
        """Params removed by taking the groups ``chunk`` of set k now."""
        gs, count = self.space.sets[k], len(chunk)
        if gs.kind in WHOLE_KINDS:
            if not count or self.removed[k] or self.layer_gone(gs.layer):
                return 0
            before = self._layer_pruned(gs.layer)
            self.removed[k].update(chunk)
            after = self._layer_pruned(gs.layer)
            self.removed[k].difference_update(chunk)
            return after - before
        if self.layer_gone(gs.layer) or self.block_gone(gs.layer, gs.block) or self.expert_gone(k):
            return 0
        if gs.kind == "expert":
            inner = self._inner.get(k, {})
            return sum(gs.params_per_group - self._channels_pruned(inner.get(e)) for e in chunk)
        total = count * gs.params_per_group
        if k in self._partner:
            total -= count * len(self.removed[self._partner[k]]) * self._overlap(k)
        return total

    def _channels_pruned(self, c: int | None) -> int:
        return 0 if c is None else len(self.removed[c]) * self.space.sets[c].params_per_group

    def _width_pruned(self, layer: int, block: str) -> int:
        total = 0
        for k in self._in_layer.get(layer, ()):
            gs = self.space.sets[k]
            if gs.block != block or self.expert_gone(k):
                continue  # another block's, or counted whole with the expert
            total += len(self.removed[k]) * gs.params_per_group
            if gs.kind == "kv_group" and k in self._partner:
                total -= len(self.removed[k]) * len(self.removed[self._partner[k]]) * self._overlap(k)
        return total

    def _layer_pruned(self, layer: int) -> int:
        if self.layer_gone(layer):
            return self.space.sets[self._whole[layer]].params_per_group
        total = 0
        for block in ("attention", "mlp"):
            k = self._blocks.get((layer, block))
            total += (self.space.sets[k].params_per_group if k is not None and self.removed[k]
                      else self._width_pruned(layer, block))
        return total

    def pruned_params(self) -> int:
        layers = set(self._in_layer) | set(self._whole) | {layer for layer, _ in self._blocks}
        return sum(self._layer_pruned(layer) for layer in layers)


def _min_keep(gs: GroupSet, min_keep: int, multiple: int) -> int:
    if isinstance(gs.info, ExpertInfo):  # every token goes to top-k experts
        return min(gs.count, max(min_keep, gs.info.top_k))
    if gs.kind in FFN_KINDS:
        keep = max(min_keep, multiple)
        return min(gs.count, -(-keep // gs.align) * gs.align)
    return min(gs.count, min_keep)


def _blocks(gs: GroupSet, alive: list[int], removable: int, values: list[float], off: int) -> list[list[int]]:
    """Whole aligned blocks of ``gs.align`` alive channels, lowest mean score first, at most ``removable``."""
    a, live = gs.align, set(alive)
    blocks = [list(range(b * a, (b + 1) * a)) for b in range(gs.count // a)
              if all(j in live for j in range(b * a, (b + 1) * a))]
    blocks.sort(key=lambda c: (sum(values[off + j] for j in c), c[0]))
    return blocks[:max(removable, 0) // a]


def _block_steps(gs: GroupSet, alive: list[int], keep: int) -> list[list[int]]:
    """Experts under group-limited routing leave one from every block at a time (lowest score first in
    each block, ``alive`` in that order), each block keeping at least ``keep``."""
    size = gs.count // gs.info.blocks
    per_block = [[j for j in alive if j // size == b] for b in range(gs.info.blocks)]
    steps = min(len(b) for b in per_block) - keep
    return [[b[i] for b in per_block] for i in range(max(steps, 0))]


def _chunks(order: list[int], remaining: int, multiple: int, kind: str) -> list[list[int]]:
    """Split groups (lowest score first) into removal steps that keep FFN widths on the multiple."""
    if kind not in FFN_KINDS or multiple <= 1:
        return [[j] for j in order]
    out, pos, size = [], 0, remaining % multiple or multiple
    while pos + size <= len(order):
        out.append(order[pos:pos + size])
        pos, size = pos + size, multiple
    return out


def _head_steps(plan: Plan, k: int, order: list[int]) -> list[list[int]]:
    """Split attention groups (lowest score first) into removals that each end on a head count the
    config accepts (Llama refuses 7 of 8 heads when ``hidden_size % heads != 0``): one item takes
    8 -> 4 heads at once instead of a head the repair would have to re-admit."""
    gs = plan.space.sets[k]
    valid = gs.attention.valid_counts if gs.info is not None else None
    if not valid:
        return [[j] for j in order]
    kept = plan.kept(k)
    partner = plan._partner.get(k)
    pos = 1 if gs.kind == "query_head" else 0
    if gs.kind == "attention_head":
        other = 1
    elif partner is not None:
        other = plan.kept(partner)
    else:
        info = gs.attention
        other = info.num_heads // info.num_kv_heads if pos == 0 else info.num_kv_heads
    counts = sorted({v[pos] for v in valid if v[1 - pos] == other and v[pos] < kept}, reverse=True)
    out, i = [], 0
    for c in counts:
        n = kept - c
        if i + n > len(order):
            break
        out.append(order[i:i + n])
        i, kept = i + n, c
    return out


def build_items(space: PruningSpace, scores: torch.Tensor, plan: Plan, rules: BudgetRules) -> list[Item]:
    """Candidate removal steps, lowest saliency first within each chain, ranked by ``rules.selection``."""
    layout, multiple, min_keep = rules.layout, rules.ffn_multiple, rules.min_keep
    values = scores.tolist()  # Python floats: indexing a tensor element by element is ~100x slower
    ties, steps = _ties(space, layout, multiple)
    per_set: list[list[list[int]]] = []
    for k, gs in enumerate(space.sets):
        if not gs.prunable:
            per_set.append([])
            continue
        off = space.set_offset(k)
        alive = [j for j in range(gs.count) if j not in plan.removed[k]]
        alive.sort(key=lambda j: (values[off + j], j))
        if gs.kind in WHOLE_KINDS:
            per_set.append([alive] if alive else [])  # one group: the whole layer or block, if not taken yet
            continue
        if isinstance(gs.info, ExpertInfo) and gs.info.blocks > 1:
            per_set.append(_block_steps(gs, alive, max(min_keep, gs.info.top_k)))
            continue
        step = steps.get(k, multiple)
        removable = len(alive) - _min_keep(gs, min_keep, step)
        if gs.align > 1 and gs.kind in FFN_KINDS:
            per_set.append(_blocks(gs, alive, removable, values, off))
            continue
        alive = alive[:max(removable, 0)]
        if gs.block == "attention":
            per_set.append(_head_steps(plan, k, alive))
        else:
            per_set.append(_chunks(alive, plan.kept(k), step, gs.kind))

    _keep_one_layer(space, plan, per_set, values)
    per_param = rules.selection == "per_param"

    def chunk_score(k: int, chunk: list[int]) -> float:
        off = space.set_offset(k)
        total = sum(values[off + j] for j in chunk)
        return total / (len(chunk) * (space.sets[k].params_per_group if per_param else 1))

    items: list[Item] = []
    families: dict[tuple[str, str], list[int]] = defaultdict(list)
    for k, gs in enumerate(space.sets):
        if not gs.prunable:
            continue
        if k in ties:
            families[("tied",) + ties[k]].append(k)
        elif kept_uniform(layout, gs.block, gs.kind):
            families[(gs.kind, layer_relative(gs.prefix))].append(k)
        else:
            for i, c in enumerate(per_set[k]):
                items.append(Item(chunk_score(k, c), [(k, c)], ("set", k), i))
    for fam, ks in families.items():
        steps = min(len(per_set[k]) for k in ks)
        for i in range(steps):
            members = [(k, per_set[k][i]) for k in ks]
            if len({len(c) / _per_field(space.sets[k]) for k, c in members}) != 1:
                break  # layers disagree on the chunk size: uniform counts cannot be kept past here
            score = sum(chunk_score(k, c) for k, c in members) / len(members)  # members free equal params
            items.append(Item(score, members, ("family",) + fam, i))
    return items


def _per_field(gs: GroupSet) -> int:
    return gs.info.per_field if isinstance(gs.info, FFNInfo) else 1


def _ties(space: PruningSpace, layout: Layout, multiple: int) -> tuple[dict[int, tuple], dict[int, int]]:
    """FFN sets that one config field sizes together (a layer's experts, and DeepSeek's shared expert at
    ``n_shared_experts`` channels per unit of the field), in every layer under a uniform layout: set index
    -> its tie, and set index -> its removal step (channels per item: whole units of the field, experts
    in multiples of :data:`EXPERT_MULTIPLE` as the sub-network keeps them). They leave together, as one
    chain, so the planned count is the exported one."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for k, gs in enumerate(space.sets):
        tie = field_tie(gs) if gs.prunable else None
        if tie:
            # uniform: every layer at once
            groups[tie[1:] if kept_uniform(layout, gs.block, gs.kind) else tie].append(k)
    ties, steps = {}, {}
    for key, ks in groups.items():
        sets = [space.sets[k] for k in ks]
        experts = any(gs.kind == "expert_channel" for gs in sets)
        if not experts and all(gs.ffn.per_field == 1 for gs in sets):
            continue  # dense FFNs: the families below (uniform) or one chain per set already do this
        unit = math.lcm(multiple, EXPERT_MULTIPLE) if experts else multiple
        for k, gs in zip(ks, sets, strict=True):
            ties[k], steps[k] = key, unit * gs.ffn.per_field
    return ties, steps


def _keep_one_layer(space: PruningSpace, plan: Plan, per_set: list[list[list[int]]], values: list[float]) -> None:
    """A model keeps at least one decoder layer: when every layer still there is offered, the most
    salient one is not."""
    whole = space.layer_sets()
    for k in whole.values():
        if per_set[k] and not per_set[k][0]:
            per_set[k] = []  # removed already
    offered = [k for k in whole.values() if per_set[k]]
    standing = [k for k in whole.values() if not plan.removed[k]]
    if offered and len(offered) == len(standing):
        per_set[max(offered, key=lambda k: (values[space.set_offset(k)], k))] = []


def _warn_short(plan: Plan, target: int, tolerance: float) -> None:
    """One warning line: ``plan`` stops more than half of the finest step under the target, because the
    counts closer to it pass it by more than the tolerance (SmolLM2 at 20%, uniform: FFN steps of 32
    channels in 30 layers land at 18.75% or 20.31%)."""
    got, total = plan.pruned_params(), plan.space.prunable_params
    logging.getLogger(__name__).warning(
        f"hf-oto: warning: the plan removes {got / total:.2%} of the prunable parameters, not the {target / total:.2%}"
        f" targeted: no count the groups' sizes allow is within {tolerance:.0%} of the target without passing it;"
        " finer groups (a smaller ffn_multiple) land closer")


def select(plan: Plan, items: list[Item], target: int, tolerance: float, cap: int | None = None, *,
           warn: bool = False) -> int:
    """Take items (lowest score first, chains in order) until ``target`` pruned params; returns count.

    No item is taken that would pass ``target * (1 + tolerance)``, or ``cap`` when given (an
    intermediate target may then be overshot by a coarse item, such as half of the heads).

    Head counts the config refuses (``valid_counts`` in the attention sets' meta, e.g. Llama needs
    ``hidden_size % num_attention_heads == 0``) are repaired by re-admitting groups taken in this
    call, and the rest of the budget is then filled without touching those attention sets.

    When the fill stops short of the tolerance because the next item would overshoot it, the count
    stays where it is if it lies within half of this call's finest step below ``target`` (the closest
    the finest groups can land); only a larger shortfall trades a coarse item in (:meth:`_Selection.exchange`).
    A coarse item taken to close a small gap decides the shape by granularity, not by cost: on
    SmolLM2 at 30% (uniform, FFN widths on multiples of 32) it forced one kv group out of every layer,
    which cost 16% in perplexity against the FFN-only plan that falls 1.04% short of the target.
    With ``warn``, a plan that stays short by more than that (no exchange fits either) says so in one
    warning line: the user's target, not the closest count, was what the group sizes could not meet.
    """
    run = _Selection(plan, items)
    lo = target * (1 - tolerance)
    hi = target * (1 + tolerance) if cap is None else max(cap, target)
    run.fill(lo, hi, frozenset())
    repaired = repair_head_counts(plan, run.locked, run.taken)
    if repaired:
        run.fill(lo, hi, repaired)
    if plan.pruned_params() < lo and target - plan.pruned_params() > run.finest / 2:
        run.exchange(lo, hi, repaired)
        if warn and plan.pruned_params() < lo:
            _warn_short(plan, target, tolerance)
    return plan.pruned_params()


class _Selection:
    """One call of :func:`select`: the plan, the items not taken yet, how far each chain has been
    taken, and what this call took (with each group's item score, which the head-count repair reads)."""

    def __init__(self, plan: Plan, items: list[Item]):
        self.plan = plan
        self.locked = [set(r) for r in plan.removed]  # removed before this call: never given back
        self.pending = sorted(items, key=lambda it: (it.score, it.order))
        self.done: dict[tuple, int] = defaultdict(int)
        self.taken: dict[tuple[int, int], float] = {}
        self.took: list[Item] = []
        # the fewest parameters one item frees: how close the finest groups can land to a target
        gains = (sum(plan.gain(k, c) for k, c in it.members) for it in items)
        self.finest = min((g for g in gains if g > 0), default=0)

    def _next(self, it: Item, skip: frozenset[int]) -> bool:
        """Whether ``it`` is its chain's next item and touches no skipped set."""
        return it.order == self.done[it.chain] and not any(k in skip for k, _ in it.members)

    def take(self, it: Item, record: bool = True) -> None:
        for k, c in it.members:
            self.plan.removed[k].update(c)
            if record:
                self.taken.update({(k, j): it.score for j in c})
        self.done[it.chain] += 1
        self.took.append(it)

    def fill(self, lo: float, hi: float, skip: frozenset[int]) -> None:
        """Take the cheapest next items that keep the count at most ``hi`` until it reaches ``lo``."""
        plan, progress = self.plan, True
        while progress and plan.pruned_params() < lo:
            progress = False
            for it in list(self.pending):
                if not self._next(it, skip):
                    continue
                gain = sum(plan.gain(k, c) for k, c in it.members)
                if plan.pruned_params() + gain > hi:
                    continue
                self.take(it)
                self.pending.remove(it)
                progress = True
                if plan.pruned_params() >= lo:
                    break

    def exchange(self, lo: float, hi: float, skip: frozenset[int]) -> None:
        """The fill stalled short of the budget because every item left overshoots it (e.g. FFN widths
        are at their minimum and the next head count is half of the heads). Take the cheapest such item
        and give back items this call took, highest score first (each the last of its chain, so every
        chain stays a lowest-first prefix and head counts stay accepted ones), until the count is within
        [lo, hi]. Tries the coarse items in score order; leaves the plan as it was if none fits."""
        plan = self.plan
        for it in [p for p in self.pending if self._next(p, skip)]:
            removed_before, done_before, took_before = [set(r) for r in plan.removed], dict(self.done), list(self.took)
            self.take(it, record=False)
            for back in sorted(self.took[:-1], key=lambda t: -t.score):
                if plan.pruned_params() <= hi:
                    break
                if back.order != self.done[back.chain] - 1 or any(k in skip for k, _ in back.members):
                    continue
                for k, c in back.members:
                    plan.removed[k].difference_update(c)
                if plan.pruned_params() < lo:  # giving this one back would fall short: keep it
                    for k, c in back.members:
                        plan.removed[k].update(c)
                    continue
                self.done[back.chain] -= 1
                self.took.remove(back)
            if lo <= plan.pruned_params() <= hi:
                return
            plan.removed[:], self.took[:] = removed_before, took_before
            self.done.clear()
            self.done.update(done_before)


def repair_head_counts(plan: Plan, locked: list[set[int]], taken: dict[tuple[int, int], float]) -> frozenset[int]:
    """Move every attention block whose (kv, query-per-kv) counts the config refuses to the nearest
    accepted counts above, by re-admitting the highest-scoring groups not in ``locked``.

    Returns the set indices of the repaired blocks' sets (empty if nothing needed repair).
    """
    by_prefix: dict[str, dict[str, int]] = defaultdict(dict)
    for k, gs in enumerate(plan.space.sets):
        if (gs.block == "attention" and gs.prunable and gs.kind not in WHOLE_KINDS
                and gs.attention.valid_counts is not None
                and not plan.layer_gone(gs.layer) and not plan.block_gone(gs.layer, "attention")):
            # a removed layer or attention block has no head count to keep
            by_prefix[gs.prefix][gs.kind] = k
    repaired: set[int] = set()
    sets = plan.space.sets

    def kept(k: int | None, removed: list[set[int]]) -> int:
        return 1 if k is None else sets[k].count - len(removed[k])

    for kinds in by_prefix.values():
        first = plan.space.sets[next(iter(kinds.values()))]
        valid = set(map(tuple, first.attention.valid_counts))
        if "kv_group" in kinds:
            a, b = kinds["kv_group"], kinds.get("query_head")
        else:
            a, b = kinds.get("attention_head"), None
        if a is None:
            continue
        state = (kept(a, plan.removed), kept(b, plan.removed))
        if state in valid:
            continue
        top = (kept(a, locked), kept(b, locked))
        options = [v for v in valid if state[0] <= v[0] <= top[0] and state[1] <= v[1] <= top[1]]
        if not options:
            raise ConfigError(f"{first.prefix}: no head count the config accepts is reachable from {state}")
        goal = min(options, key=lambda v: (v[0] * v[1], v))
        for k, want in ((a, goal[0]), (b, goal[1])):
            if k is None:
                continue
            free = sorted((j for j in plan.removed[k] if j not in locked[k]),
                          key=lambda j, k=k: -taken.get((k, j), 0.0))
            for j in free[:want - kept(k, plan.removed)]:
                plan.removed[k].discard(j)
            repaired.add(k)
    return frozenset(repaired)


def take_all(plan: Plan, items: list[Item]) -> int:
    """Take every item on top of ``plan``, repair head counts to accepted ones, and return the pruned
    count: the most these items can remove."""
    locked = [set(r) for r in plan.removed]
    for it in items:
        for k, c in it.members:
            plan.removed[k].update(c)
    repair_head_counts(plan, locked, {})
    return plan.pruned_params()


def max_prunable(space: PruningSpace, rules: BudgetRules) -> int:
    """The most parameters the constraints allow to remove (to reject unreachable targets early)."""
    plan = Plan(space)
    return take_all(plan, build_items(space, torch.zeros(len(space)), plan, rules))


def resolve_target(space: PruningSpace, target_sparsity: float | None, target_params: int | None,
                   rules: BudgetRules) -> int:
    """The pruned-parameter target (from a fraction or a count), checked against the constraints."""
    if target_params is None:
        if target_sparsity is None or not 0.0 < target_sparsity < 1.0:
            raise ConfigError(f"target_sparsity must be in (0, 1), got {target_sparsity}")
        target_params = int(round(space.prunable_params * target_sparsity))
    reachable = max_prunable(space, rules)
    if not 0 < target_params <= reachable:
        raise ConfigError(
            f"target of {target_params:,} pruned parameters cannot be reached: the constraints "
            f"(layout={rules.layout!r}, ffn_multiple={rules.ffn_multiple}, min_keep={rules.min_keep}) allow at most "
            f"{reachable:,} of {space.prunable_params:,} prunable parameters"
        )
    return int(target_params)
