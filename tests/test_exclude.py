"""pruning_exclude: chosen layers or modules stay whole, in the trainer, one-shot pruning and the export."""

from __future__ import annotations

import pytest
import torch
from test_trainer import Tokens, _args
from tiny import logits, tiny_model
from transformers import AutoModelForCausalLM

from hf_oto import construct_subnet, discover_groups, exclude_groups, oneshot_prune, oneshot_scores
from hf_oto.errors import ConfigError
from hf_oto.optim.budget import BudgetRules
from hf_oto.trainer import HFOTOTrainer


def test_rules_mark_layers_and_modules_unprunable_with_the_reason():
    space = discover_groups(tiny_model("llama", num_hidden_layers=4, intermediate_size=64))
    out = exclude_groups(space, ["layers:0,-1"], layout="global")
    assert {gs.layer for gs in out.sets if not gs.prunable} == {0, 3}
    assert all("pruning_exclude (layer" in gs.reason for gs in out.sets if gs.layer in (0, 3))
    assert all(gs.prunable for gs in space.sets)  # the given space is unchanged
    assert out.prunable_params == space.prunable_params // 2
    attn = exclude_groups(space, ["*.self_attn"], layout="uniform")  # a kind in every layer: uniform allows it
    assert {gs.kind for gs in attn.sets if gs.prunable} == {"ffn_channel"}
    assert {gs.layer for gs in exclude_groups(space, ["layers:1-2"], "global").sets if not gs.prunable} == {1, 2}


@pytest.mark.parametrize("rules, layout, message", [
    (["layers:0"], "uniform", "keeps every layer's"),
    (["layers:0"], "per_layer_ffn", "keeps every layer's"),
    (["model.layers.9.mlp"], "global", "matches no module"),
    (["layers:7"], "global", "not a layer range"),
    (["layers:a"], "global", "expected layers:I,J"),
    (["layers:0", "-1"], "global", "one quoted string"),  # YAML's [layers:0,-1], split at the comma
])
def test_bad_rules_are_refused_in_one_line(rules, layout, message):
    space = discover_groups(tiny_model("llama", num_hidden_layers=4, intermediate_size=64))
    with pytest.raises(ConfigError, match=message):
        exclude_groups(space, rules, layout)


def test_trainer_keeps_excluded_layers_whole_and_meets_the_target_on_the_rest(tmp_path):
    model = tiny_model("llama", num_hidden_layers=4, intermediate_size=64)
    # per_layer_ffn keeps attention equal in every layer: the first and last layers' FFNs stay whole, and
    # attention is kept everywhere (excluding it in two layers only is refused, see the test above)
    args = _args(tmp_path, pruning_layout="per_layer_ffn", pruning_exclude=["layers:0,-1", "*.self_attn"],
                 target_sparsity=0.3, ffn_multiple=1)
    trainer = HFOTOTrainer(model=model, args=args, train_dataset=Tokens())
    trainer.train()
    goal = trainer.hesso.target_params
    assert abs(trainer.hesso.metrics()["pruned_params"] - goal) <= 0.05 * goal
    reloaded = AutoModelForCausalLM.from_pretrained(trainer.save_pruned_model(str(tmp_path / "out")),
                                                    trust_remote_code=True)
    widths = [layer.mlp.gate_proj.out_features for layer in reloaded.model.layers]
    assert widths[0] == widths[3] == 64 and min(widths[1:3]) < 64
    ids = torch.randint(3, 64, (2, 9))
    assert (logits(reloaded.eval(), ids) - logits(model.eval(), ids)).abs().max() <= 1e-5  # DeciLM export, exact
    with pytest.raises(ConfigError, match="cannot be reached"):  # the rest cannot give 90%: refused up front
        HFOTOTrainer(model=tiny_model("llama", num_hidden_layers=4, intermediate_size=64),
                     args=_args(tmp_path, pruning_layout="global", pruning_exclude=["layers:0-2"],
                                target_sparsity=0.9), train_dataset=Tokens())


def test_oneshot_prune_on_an_excluded_space_leaves_those_layers_alone():
    model = tiny_model("llama", num_hidden_layers=4, intermediate_size=64)
    space = exclude_groups(discover_groups(model), ["layers:0"], layout="global")
    before = [p.detach().clone() for p in model.model.layers[0].parameters()]
    oneshot_prune(model, space, oneshot_scores(model, space, "magnitude"), target_sparsity=0.3,
                  rules=BudgetRules(layout="global"))
    assert all(torch.equal(a, b) for a, b in zip(before, model.model.layers[0].parameters(), strict=True))
    small = construct_subnet(model, space, layout="global").model
    assert small.model.layers[0].mlp.gate_proj.out_features == 64
