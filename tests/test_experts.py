"""Whole routed experts as groups: router rows with them, routing around zeroed ones, exact exports."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import logits, reload_logits, tiny_model

from hf_oto import construct_subnet, discover_groups, save_pruned, zero_groups
from hf_oto.errors import ConfigError, ConstructionError
from hf_oto.groups.experts import route_around_removed_experts, with_experts
from hf_oto.optim.budget import BudgetRules
from hf_oto.optim.oneshot import batch_loss, oneshot_prune, oneshot_scores

TOL = 1e-5
IDS = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(5))
MOE = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "deepseek_v3_q", "deepseek_v2", "deepseek_v2_lora"]
COUNT_FIELD = {"mixtral": "num_local_experts", "qwen2_moe": "num_experts", "qwen3_moe": "num_local_experts",
               "olmoe": "num_experts"}


def _space(model):
    return with_experts(model, discover_groups(model))


def _expert_sets(space):
    return [gs for gs in space.sets if gs.kind == "expert"]


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_an_expert_owns_its_router_row_and_its_slice_of_every_expert_weight(arch):
    model = tiny_model(arch)
    sets = _expert_sets(_space(model))
    assert sets and all(gs.prunable for gs in sets)
    gs = sets[0]
    params = dict(model.named_parameters())
    owned = {s.param: s for s in gs.slices}
    router = f"{gs.prefix}.gate.weight"
    assert set(owned) == {router, f"{gs.prefix}.experts.gate_up_proj", f"{gs.prefix}.experts.down_proj"}
    assert all(s.dim == 0 and s.index[:, 0].tolist() == list(range(4)) for s in gs.slices)
    expert_numel = sum(params[n][0].numel() for n in owned)
    assert gs.params_per_group == expert_numel
    assert gs.info.top_k == model.config.num_experts_per_tok
    assert gs.info.field == COUNT_FIELD.get(arch, "n_routed_experts")
    # DeepSeek-V3's score correction has one entry per expert and goes with it
    assert bool(gs.info.buffers) == (arch == "deepseek_v3")


def _zero(model, space, per_layer: int, heads: bool = False) -> None:
    """Zero the experts ``layer % 4 ...`` (``per_layer`` of them) of every MoE layer and half of the
    channels of the experts that stay (and, with ``heads``, one head or kv group of every layer)."""
    names = []
    if heads:
        names += [gs.name(j) for gs in space.sets if gs.kind in ("attention_head", "kv_group") and gs.prunable
                  for j in ((1, 3) if gs.kind == "attention_head" else (1,))]  # a count every config accepts
    for gs in _expert_sets(space):
        gone = [(gs.layer + i) % gs.count for i in range(per_layer)]
        names += [gs.name(e) for e in gone]
    for gs in space.sets:
        if gs.kind == "expert_channel":
            names += [gs.name(j) for j in range(gs.count // 2, gs.count)]
        elif gs.kind == "ffn_channel" and "shared_expert" in gs.prefix and gs.prunable:
            per = gs.ffn.per_field
            width = gs.count // per
            names += [gs.name(j) for j in range(width // 2 * per, gs.count)]
    zero_groups(model, space, names)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Every MoE architecture with one of four experts zeroed per layer (another one in each layer), half
    of every expert's channels and heads (or a kv group) in every layer where heads are prunable, exported
    in the uniform layout and reloaded in a fresh interpreter that cannot import hf_oto."""
    root = tmp_path_factory.mktemp("experts")
    cases = {}
    for arch in MOE:
        model = tiny_model(arch)
        space = _space(model)
        _zero(model, space, per_layer=1, heads=True)
        unrouted = logits(model, IDS)
        handle = route_around_removed_experts(model, space)
        full = logits(model, IDS)
        sub = construct_subnet(model, space, layout="uniform")
        handle.remove()
        heads = any(gs.kind in ("attention_head", "kv_group") and gs.prunable for gs in space.sets)
        cases[arch] = dict(model=model, sub=sub.model, full=full, unrouted=unrouted, heads=heads,
                           dir=save_pruned(sub, root / arch, source=f"tiny-{arch}"))
    reloaded = reload_logits({a: {"dir": str(c["dir"])} for a, c in cases.items()}, IDS, root)
    return {a: dict(c, reloaded=reloaded[a]) for a, c in cases.items()}


@pytest.mark.parametrize("arch", MOE)
def test_zeroed_experts_leave_the_stock_config_and_the_export_routes_as_the_zeroed_model(exports, arch):
    case = exports[arch]
    cfg = json.loads((case["dir"] / "config.json").read_text())
    assert "auto_map" not in cfg
    assert cfg[COUNT_FIELD.get(arch, "n_routed_experts")] == 3
    assert cfg["num_experts_per_tok"] == 2
    assert case["heads"] == (arch != "olmoe")  # OLMoE's q/k norms span all heads
    assert cfg["num_attention_heads"] < 4 or not case["heads"]
    assert (logits(case["sub"], IDS) - case["full"]).abs().max().item() <= TOL
    assert (case["reloaded"] - case["full"]).abs().max().item() <= TOL
    # without the routing change the zeroed model still sends tokens to the zeroed experts
    assert (case["unrouted"] - case["full"]).abs().max().item() > 1e-3


def test_group_limited_routing_loses_one_expert_from_every_group():
    """DeepSeek-V3 with eight experts in two routing groups: the probe finds that the config routes the
    same with one expert fewer in each group (not with one fewer overall); plans take experts in pairs,
    one per group, and the export (six experts, still two groups) computes the routed zeroed model."""
    model = tiny_model("deepseek_v3", n_routed_experts=8, n_group=2, topk_group=1)
    space = _space(model)
    sets = _expert_sets(space)
    assert sets and all(gs.prunable and gs.info.blocks == 2 for gs in sets)
    calib = [{"input_ids": torch.randint(3, 64, (2, 16), generator=torch.Generator().manual_seed(0))}]
    plan = oneshot_prune(model, space, oneshot_scores(model, space, "routing", calib), target_sparsity=0.4)
    gone = [sorted(plan.removed[k]) for k, gs in enumerate(space.sets) if gs.kind == "expert"]
    assert gone and all(len(g) >= 2 and sum(j < 4 for j in g) == sum(j >= 4 for j in g) for g in gone)
    with torch.no_grad():
        handle = route_around_removed_experts(model, space)
        full = logits(model, IDS)
        sub = construct_subnet(model, space, layout="uniform")
        handle.remove()
    assert sub.model.config.n_routed_experts == 8 - len(gone[0]) and sub.model.config.n_group == 2
    assert sub.manifest.params_before - sub.manifest.params_after == plan.pruned_params()
    assert (logits(sub.model, IDS) - full).abs().max().item() <= TOL


def test_experts_zeroed_unevenly_across_routing_groups_are_refused():
    model = tiny_model("deepseek_v3", n_routed_experts=8, n_group=2, topk_group=1)
    space = _space(model)
    zero_groups(model, space, [gs.name(e) for gs in _expert_sets(space) for e in (0, 1)])  # both in group 0
    with pytest.raises(ConstructionError, match="must lose equally many"):
        construct_subnet(model, space, layout="uniform")


def test_a_router_that_picks_every_expert_keeps_them_and_says_why():
    sets = _expert_sets(_space(tiny_model("mixtral", num_experts_per_tok=4)))
    assert sets and not any(gs.prunable for gs in sets)
    assert "routed to all 4 experts" in sets[0].reason


def test_an_moe_block_keeps_top_k_experts_and_the_live_model_agrees():
    """Every expert zeroed: the lowest-numbered top_k (2) stay in the export and in the live routing."""
    model = tiny_model("qwen3_moe")
    space = _space(model)
    _zero(model, space, per_layer=4)
    with torch.no_grad():
        handle = route_around_removed_experts(model, space)
        full = logits(model, IDS)
        sub = construct_subnet(model, space, layout="uniform")
        handle.remove()
    assert sub.model.config.num_experts == 2
    assert all(entry.kept == (0, 1) for entry in sub.manifest.sets if entry.kind == "expert")
    assert (logits(sub.model, IDS) - full).abs().max().item() <= TOL


def test_different_expert_counts_per_layer_are_refused():
    model = tiny_model("mixtral")
    space = _space(model)
    zero_groups(model, space, [_expert_sets(space)[0].name(0)])
    with pytest.raises(ConstructionError, match="same number of whole experts"):
        construct_subnet(model, space, layout="global")


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "deepseek_v2"])
@pytest.mark.parametrize("measured", [False, True])
def test_expert_plans_remove_exactly_what_the_export_removes(arch, measured):
    """Experts compete with heads and channels in one budget: a removed expert frees its channels not
    yet counted, so the planner's count is the sub-network's, and the export computes the zeroed model."""
    model = tiny_model(arch, num_hidden_layers=3)
    space = _space(model)
    calib = [{"input_ids": torch.randint(3, 64, (2, 16), generator=torch.Generator().manual_seed(i))}
             for i in range(2)]
    scores = oneshot_scores(model, space, "routing", calib)
    plan = oneshot_prune(model, space, scores, target_sparsity=0.4, rules=BudgetRules(layout="uniform"),
                         probe=batch_loss(model, calib) if measured else None)
    with torch.no_grad():
        handle = route_around_removed_experts(model, space)
        full = logits(model, IDS)
        sub = construct_subnet(model, space, layout="uniform")
        handle.remove()
    assert abs(plan.pruned_params() - 0.4 * space.prunable_params) <= 0.05 * space.prunable_params
    assert sub.manifest.params_before - sub.manifest.params_after == plan.pruned_params()
    assert (logits(sub.model, IDS) - full).abs().max().item() <= TOL


def test_routing_scores_are_the_gate_weight_each_expert_receives():
    """Mixtral normalises its top-k weights: per layer the experts' mean gate weights sum to one token's."""
    from hf_oto.optim.oneshot import _routing

    model = tiny_model("mixtral")
    space = _space(model)
    calib = [{"input_ids": torch.randint(3, 64, (2, 16), generator=torch.Generator().manual_seed(0))}]
    scores = _routing(model, space, calib)
    for k, gs in enumerate(space.sets):
        if gs.kind == "expert":
            mass = scores[space.set_offset(k):space.set_offset(k) + gs.count]
            assert (mass >= 0).all() and abs(float(mass.sum()) - 1.0) < 1e-5


def test_the_trainer_removes_whole_experts_and_exports_what_hesso_counted(tmp_path):
    from test_trainer import Tokens, _args
    from transformers import AutoModelForCausalLM

    from hf_oto.trainer import HFOTOTrainer

    model = tiny_model("deepseek_v3", n_routed_experts=8, intermediate_size=64, moe_intermediate_size=32)
    trainer = HFOTOTrainer(model=model, args=_args(tmp_path, target_sparsity=0.5, max_steps=16, prune_experts=True),
                           train_dataset=Tokens())
    trainer.train()
    pruned = trainer.hesso.metrics()["pruned_params"]
    out = trainer.save_pruned_model(str(tmp_path / "pruned"))
    cfg = json.loads((out / "config.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    before, after = (sum(p.numel() for p in m.parameters()) for m in (model, reloaded))
    assert cfg["n_routed_experts"] < 8 and "auto_map" not in cfg
    assert before - after == pruned
    assert json.loads((out / "pruning_manifest.json").read_text())["hesso"]["experts"] is True
    model.eval()
    assert (logits(reloaded, IDS) - logits(model, IDS)).abs().max().item() <= TOL


def test_prune_experts_is_refused_where_it_cannot_apply(tmp_path):
    from test_trainer import Tokens, _args

    from hf_oto.trainer import HFOTOTrainer

    with pytest.raises(ConfigError, match="no routed experts"):
        HFOTOTrainer(model=tiny_model("llama"), args=_args(tmp_path, prune_experts=True), train_dataset=Tokens())
    with pytest.raises(ConfigError, match="'width' or 'both'"):
        HFOTOTrainer(model=tiny_model("mixtral"), args=_args(tmp_path, prune_experts=True,
                                                             pruning_granularity="depth"), train_dataset=Tokens())


def test_lora_on_attention_with_whole_experts_exports_the_merged_model(tmp_path):
    """LoRA adapts the attention; HESSO removes whole (frozen) experts too; the merged export computes
    what the trained peft model computes, routing included."""
    from peft import LoraConfig, get_peft_model
    from test_trainer import Tokens, _args
    from transformers import AutoModelForCausalLM

    from hf_oto.trainer import HFOTOTrainer

    base = tiny_model("mixtral", num_local_experts=8, intermediate_size=64)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    args = _args(tmp_path, target_sparsity=0.3, max_steps=16, prune_experts=True, pruning_exclude=["*.experts.*"])
    trainer = HFOTOTrainer(model=model, args=args, train_dataset=Tokens())
    trainer.train()
    out = trainer.save_pruned_model(str(tmp_path / "pruned"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_local_experts"] < 8  # the experts' channels are excluded: whole experts go
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    model.eval()
    assert (logits(reloaded, IDS) - logits(model, IDS)).abs().max().item() <= TOL
    # the pruned base and the pruned adapter, loaded by peft, compute the same
    from peft import PeftModel

    base_dir = trainer.save_pruned_model(str(tmp_path / "base"), merge_adapters=False)
    small = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    assert small.config.num_local_experts == cfg["num_local_experts"]
    adapted = PeftModel.from_pretrained(small, str(tmp_path / "base-adapter")).eval()
    assert (logits(adapted, IDS) - logits(model, IDS)).abs().max().item() <= TOL


def test_resume_with_whole_experts_is_bit_exact(tmp_path):
    """Also the guard for MoE resume in general: transformers 5.25's Trainer wrote the checkpoint in the
    per-expert layout and loaded it back without converting, leaving the experts as built (issue 48805)."""
    from test_trainer import Tokens, _args

    from hf_oto.trainer import HFOTOTrainer

    def run(where, **kw):
        model = tiny_model("qwen3_moe", num_experts=8)
        trainer = HFOTOTrainer(model=model, args=_args(where, prune_experts=True, **kw), train_dataset=Tokens())
        return model, trainer

    full, trainer = run(tmp_path / "a")
    trainer.train()
    assert int(sum(trainer.hesso.pruned[trainer.hesso.space.set_offset(k):][:gs.count].sum()
                   for k, gs in enumerate(trainer.hesso.space.sets) if gs.kind == "expert")) > 0
    _, first = run(tmp_path / "b", save_strategy="steps", save_steps=7)
    first.train()
    resumed, trainer = run(tmp_path / "c")
    trainer.train(resume_from_checkpoint=str(tmp_path / "b" / "run" / "checkpoint-7"))
    for (n, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_moe_resume_loads_the_experts_transformers_writes_per_expert(tmp_path, arch):
    """transformers 5.25 writes the checkpoint's experts per expert (the Hub layout), the model holds them
    fused: without the conversion the resumed run would train on from the experts it was built with."""
    from test_trainer import Tokens, _args

    from hf_oto.trainer import HFOTOTrainer

    def run(where, **kw):
        model = tiny_model(arch)
        return model, HFOTOTrainer(model=model, args=_args(where, **kw), train_dataset=Tokens())

    full, trainer = run(tmp_path / "a")
    trainer.train()
    _, first = run(tmp_path / "b", save_strategy="steps", save_steps=5)
    first.train()
    ckpt = tmp_path / "b" / "run" / "checkpoint-5"
    resumed, trainer = run(tmp_path / "c")
    trainer.train(resume_from_checkpoint=str(ckpt))
    for (n, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), n


def test_a_copy_of_the_model_routes_around_its_own_zeroed_experts_only():
    """A distillation teacher copied from the student keeps every expert while the student's are zeroed,
    and a copy of the zeroed student routes as the student does."""
    import copy

    model = tiny_model("mixtral")
    space = _space(model)
    handle = route_around_removed_experts(model, space)
    teacher = copy.deepcopy(model)
    before = logits(teacher, IDS)
    zero_groups(model, space, [gs.name(1) for gs in _expert_sets(space)])
    assert torch.equal(logits(teacher, IDS), before)
    student = logits(model, IDS)
    assert torch.equal(logits(copy.deepcopy(model), IDS), student)
    handle.remove()
    assert not torch.equal(logits(model, IDS), student)  # removed: the zeroed experts are routed to again
