"""One-shot baselines (magnitude, Taylor, Wanda-sp) on planted problems, and their exact budget."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_model

from hf_oto import construct_subnet, discover_groups
from hf_oto.groups import group_is_zero
from hf_oto.optim.budget import BudgetRules
from hf_oto.optim.oneshot import oneshot_prune, oneshot_scores

PLANTED = list(range(8, 16))  # FFN channels 8..15 of every layer
BATCHES = [{"input_ids": torch.randint(3, 64, (4, 12), generator=torch.Generator().manual_seed(i))}
           for i in range(3)]


def _ffn_target(space) -> int:
    return sum(len(PLANTED) * gs.params_per_group for gs in space.sets if gs.kind == "ffn_channel")


def _pruned_ffn(space, model) -> dict[int, list[int]]:
    zero = group_is_zero(model, space)
    out = {}
    for k, gs in enumerate(space.sets):
        if gs.kind == "ffn_channel":
            off = space.set_offset(k)
            out[gs.layer] = torch.nonzero(zero[off:off + gs.count]).flatten().tolist()
    return out


def _plant(model, how: str) -> None:
    with torch.no_grad():
        for layer in model.model.layers:
            mlp = layer.mlp
            if how == "small":  # tiny weights everywhere in the channel
                for w in (mlp.gate_proj.weight, mlp.up_proj.weight):
                    w[PLANTED] *= 1e-3
                mlp.down_proj.weight[:, PLANTED] *= 1e-3
            elif how == "dead_input":  # no activation reaches down_proj, but its columns are large
                mlp.gate_proj.weight[PLANTED] = 0.0
                mlp.down_proj.weight[:, PLANTED] *= 50.0
            elif how == "dead_output":  # down_proj ignores the channel: no effect on the loss
                mlp.down_proj.weight[:, PLANTED] = 0.0
                mlp.gate_proj.weight[PLANTED] *= 50.0


@pytest.mark.parametrize("criterion, how", [("magnitude", "small"), ("wanda_sp", "dead_input"),
                                            ("taylor", "dead_output")])
def test_criterion_finds_planted_channels(criterion, how):
    torch.manual_seed(0)
    model = tiny_model("llama").eval()
    _plant(model, how)
    space = discover_groups(model)
    scores = oneshot_scores(model, space, criterion, BATCHES)
    oneshot_prune(model, space, scores, target_params=_ffn_target(space), rules=BudgetRules(tolerance=0.0))
    assert _pruned_ffn(space, model) == {0: PLANTED, 1: PLANTED}


def test_magnitude_is_fooled_where_activations_decide():
    """The planted channels of 'dead_input' have large weights: magnitude keeps them, Wanda-sp does not."""
    torch.manual_seed(0)
    model = tiny_model("llama").eval()
    _plant(model, "dead_input")
    space = discover_groups(model)
    scores = oneshot_scores(model, space, "magnitude")
    oneshot_prune(model, space, scores, target_params=_ffn_target(space), rules=BudgetRules(tolerance=0.0))
    assert _pruned_ffn(space, model)[0] != PLANTED


@pytest.mark.parametrize("criterion", ["magnitude", "taylor", "wanda_sp"])
@pytest.mark.parametrize("sparsity", [0.3, 0.5])
def test_budget_is_met_and_subnet_is_exact(criterion, sparsity):
    torch.manual_seed(1)
    model = tiny_model("llama", intermediate_size=96).eval()
    space = discover_groups(model)
    plan = oneshot_prune(model, space, oneshot_scores(model, space, criterion, BATCHES),
                         target_sparsity=sparsity, rules=BudgetRules(layout="global", ffn_multiple=1))
    target = space.prunable_params * sparsity
    assert abs(plan.pruned_params() - target) <= 0.01 * target
    small = construct_subnet(model, space).model
    removed = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in small.parameters())
    assert removed == plan.pruned_params()
    ids = BATCHES[0]["input_ids"]
    assert (model(ids).logits - small(ids).logits).abs().max() <= 1e-5


def test_bad_input():
    model = tiny_model("llama")
    space = discover_groups(model)
    with pytest.raises(ValueError, match="calibration batches"):
        oneshot_scores(model, space, "taylor")
    with pytest.raises(ValueError, match="criterion"):
        oneshot_scores(model, space, "random")
    with pytest.raises(ValueError, match="cannot be reached"):
        oneshot_prune(model, space, torch.zeros(len(space)), target_sparsity=0.999)


def test_head_counts_the_config_refuses_are_never_chosen(tmp_path):
    """Llama's config requires hidden_size % num_attention_heads == 0: 3 or 6 heads of 8 cannot be saved."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=8, num_key_value_heads=4, head_dim=8,
                                         vocab_size=64)).eval()
    space = discover_groups(model)
    valid = set(space.sets[0].attention.valid_counts)
    assert (3, 2) not in valid and (4, 2) in valid and (2, 2) in valid
    seen = set()
    for seed in range(6):
        for sparsity in (0.2, 0.45, 0.7):
            m = __import__("copy").deepcopy(model)
            scores = torch.rand(len(space), generator=torch.Generator().manual_seed(seed))
            oneshot_prune(m, space, scores, target_sparsity=sparsity)
            small = construct_subnet(m, space, layout="uniform").model
            c = small.config
            state = (c.num_key_value_heads, c.num_attention_heads // c.num_key_value_heads)
            assert state in valid, state
            seen.add(state)
            small.config.validate()  # what save_pretrained and from_pretrained check
    assert len(seen) > 1  # heads were really pruned in some runs


def test_any_importance_plugs_into_the_one_shot_planner():
    """HESSO's saliency and a user's own criterion use the same protocol as the built-in criteria."""
    from dataclasses import dataclass
    from typing import ClassVar

    from hf_oto.optim.importance import HESSOSaliency

    model = tiny_model("llama", intermediate_size=64)
    space = discover_groups(model)
    assert oneshot_scores(model, space, HESSOSaliency()).shape == (len(space),)

    @dataclass(frozen=True)
    class LastChannelsFirst:  # a planted criterion: later FFN channels are worth less
        needs_batches: ClassVar[bool] = False

        def __call__(self, space, evidence):
            return torch.cat([torch.arange(gs.count, 0, -1).float() for gs in space.sets])

    oneshot_prune(model, space, oneshot_scores(model, space, LastChannelsFirst()), target_params=_ffn_target(space),
                  rules=BudgetRules(layout="uniform", ffn_multiple=8, min_keep=1))
    zero = group_is_zero(model, space)
    ffn = [g.name for g, z in zip(space, zero.tolist(), strict=True) if z and g.kind == "ffn_channel"]
    assert ffn and all(int(n.rsplit(".", 1)[1]) >= 32 for n in ffn)
