"""Cost-aware selection: on a planted cost/benefit case the planner takes what an exact knapsack takes."""

from __future__ import annotations

import itertools

import pytest
import torch
from tiny import tiny_model

from hf_oto import discover_groups, oneshot_prune
from hf_oto.errors import ConfigError
from hf_oto.optim import HESSOConfig
from hf_oto.optim.budget import Plan

SCORES = {"kv_group": [5.0, 50.0], "query_head": [100.0, 100.0]}  # FFN channels score 1.0 each


def _planted():
    """One GQA layer: a kv group frees 1536 parameters, an 8-channel FFN chunk 768."""
    model = tiny_model("llama", num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    space = discover_groups(model)
    scores = torch.ones(len(space))
    for k, gs in enumerate(space.sets):
        if gs.kind in SCORES:
            off = space.set_offset(k)
            scores[off:off + gs.count] = torch.tensor(SCORES[gs.kind])
    return model, space, scores


def _knapsack(space, scores, target, tolerance):
    """The least total saliency that removes target +- tolerance parameters, over every mix of
    lowest-first prefixes of each set (FFN in chunks of 8), by exhaustive search."""
    best = None
    sets = list(enumerate(space.sets))
    steps = [range(0, gs.count + 1, 8 if gs.kind == "ffn_channel" else 1) for _, gs in sets]
    for counts in itertools.product(*steps):
        plan = Plan(space)
        cost = 0.0
        for (k, gs), n in zip(sets, counts, strict=True):
            off = space.set_offset(k)
            order = sorted(range(gs.count), key=lambda j, off=off: (float(scores[off + j]), j))[:n]
            plan.removed[k] = set(order)
            cost += sum(float(scores[off + j]) for j in order)
        if gs_left_ok(space, plan) and abs(plan.pruned_params() - target) <= tolerance * target:
            if best is None or cost < best[0]:
                best = (cost, [set(r) for r in plan.removed])
    return best


def gs_left_ok(space, plan):
    return all(gs.count - len(r) >= 1 for gs, r in zip(space.sets, plan.removed, strict=True))


@pytest.mark.parametrize("selection", ["saliency", "per_param"])
def test_planner_choice_on_a_planted_case(selection):
    model, space, scores = _planted()
    kv = next(gs for gs in space.sets if gs.kind == "kv_group")
    ffn = next(gs for gs in space.sets if gs.kind == "ffn_channel")
    assert kv.params_per_group == 2 * 8 * ffn.params_per_group  # one kv group frees two 8-channel chunks
    target = kv.params_per_group
    plan = oneshot_prune(model, space, scores, target_params=target, layout="global", ffn_multiple=8,
                         tolerance=0.01, selection=selection)
    cost = sum(float(scores[space.set_offset(k) + j]) for k, r in enumerate(plan.removed) for j in r)
    best_cost, best_removed = _knapsack(space, scores, target, 0.01)
    assert best_cost == 5.0  # the weak kv group, not 16 FFN channels scoring 1.0 each
    if selection == "per_param":
        assert plan.removed == best_removed and cost == best_cost
    else:  # lowest mean saliency first takes the cheap-looking channels, at three times the cost
        assert {space.sets[k].kind for k, r in enumerate(plan.removed) if r} == {"ffn_channel"} and cost == 16.0


def test_selection_is_validated():
    with pytest.raises(ConfigError, match="selection must be one of"):
        HESSOConfig(selection="knapsack")
