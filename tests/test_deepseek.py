"""DeepSeek-family models: MLA heads and fine-grained MoE expert channels (with the shared expert)."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import ARCHS, logits, reload_logits, tiny_model

from hf_oto import construct_subnet, discover_groups, save_pruned, zero_groups

TOL = 1e-5
IDS = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(3))
DEEPSEEK = [a for a in ARCHS if a.startswith("deepseek")]


@pytest.mark.parametrize("arch", DEEPSEEK)
def test_mla_heads_own_their_query_kv_and_output_slices(arch):
    """Each head owns qk_head_dim rows of the query projection, k_nope + v rows of kv_b_proj and v_head_dim
    columns of o_proj; the shared rotary key (kv_a_proj_with_mqa) and the low-rank q_a_proj stay whole."""
    model = tiny_model(arch)
    cfg = model.config
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    kv = cfg.qk_nope_head_dim + cfg.v_head_dim
    space = discover_groups(model)
    attn = [s for s in space.sets if s.block == "attention"]
    assert len(attn) == cfg.num_hidden_layers
    q_name = "q_b_proj" if cfg.q_lora_rank else "q_proj"
    for s in attn:
        assert s.prunable and s.kind == "attention_head" and s.count == cfg.num_attention_heads, s.reason
        by_module = {sl.param.split(".")[-2]: sl for sl in s.slices}
        assert set(by_module) == {q_name, "kv_b_proj", "o_proj"}
        for h in range(s.count):
            assert by_module[q_name].index[h].tolist() == list(range(h * qk, (h + 1) * qk))
            assert by_module["kv_b_proj"].index[h].tolist() == list(range(h * kv, (h + 1) * kv))
            assert by_module["o_proj"].index[h].tolist() == list(range(h * cfg.v_head_dim, (h + 1) * cfg.v_head_dim))
        assert s.attention.head_dim == cfg.v_head_dim


@pytest.mark.parametrize("arch", DEEPSEEK)
def test_expert_channels_and_the_shared_expert_are_set_by_moe_intermediate_size(arch):
    """Routed experts' width is moe_intermediate_size; the shared expert's is n_shared_experts times it
    (the probe finds both in a twin that holds an MoE layer); dense first layers use intermediate_size."""
    model = tiny_model(arch)
    cfg = model.config
    space = discover_groups(model)
    ffn = [s for s in space.sets if s.block == "mlp"]
    assert ffn and all(s.prunable for s in ffn), [s.reason for s in ffn if not s.prunable]
    for s in ffn:
        if s.layer < cfg.first_k_dense_replace:
            assert (s.kind, s.ffn.field, s.ffn.per_field) == ("ffn_channel", "intermediate_size", 1)
        elif s.kind == "expert_channel":
            assert (s.ffn.field, s.ffn.per_field, s.count) == ("moe_intermediate_size", 1, cfg.moe_intermediate_size)
        else:
            assert "shared_experts" in s.prefix
            assert (s.ffn.field, s.ffn.per_field) == ("moe_intermediate_size", cfg.n_shared_experts)
    experts = {s.layer for s in ffn if s.kind == "expert_channel"}
    assert experts == set(range(cfg.first_k_dense_replace, cfg.num_hidden_layers))


def _prune(model, space, heads: list[int], routed: range, shared: bool) -> None:
    """Zero ``heads`` in every layer, channels ``routed`` of every routed expert, and (if ``shared``) the
    matching channels of the shared expert (n_shared_experts per routed channel)."""
    names = []
    for s in space.sets:
        if s.kind == "attention_head":
            names += [f"{s.prefix}.attention_head.{h}" for h in heads]
        elif s.kind == "expert_channel":
            names += [f"{s.prefix}.expert_channel.{j}" for j in routed]
        elif s.kind == "ffn_channel" and "shared_experts" in s.prefix and shared:
            per = s.ffn.per_field
            names += [f"{s.prefix}.ffn_channel.{j}" for j in range(routed.start * per, routed.stop * per)]
    zero_groups(model, space, names)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Each DeepSeek variant with two of four heads and half of every expert's channels (the shared
    expert's with them) zeroed, exported in the uniform layout and reloaded in one fresh interpreter."""
    root = tmp_path_factory.mktemp("deepseek")
    cases = {}
    for arch in DEEPSEEK:
        model = tiny_model(arch)
        space = discover_groups(model)
        _prune(model, space, heads=[1, 3], routed=range(8, 16), shared=True)
        sub = construct_subnet(model, space, layout="uniform")
        cases[arch] = dict(model=model, sub=sub.model, full=logits(model, IDS),
                           dir=save_pruned(sub, root / arch, source=f"tiny-{arch}"))
    reloaded = reload_logits({a: {"dir": str(c["dir"])} for a, c in cases.items()}, IDS, root)
    return {a: dict(c, reloaded=reloaded[a]) for a, c in cases.items()}


@pytest.mark.parametrize("arch", DEEPSEEK)
def test_pruned_mla_and_experts_export_to_the_stock_config(exports, arch):
    """The stock config says two heads and half the expert width, and the export reloads without hf_oto
    with the zeroed model's logits."""
    case = exports[arch]
    model, sub = case["model"], case["sub"]
    cfg = json.loads((case["dir"] / "config.json").read_text())
    assert "auto_map" not in cfg
    assert cfg["num_attention_heads"] == 2 and cfg["moe_intermediate_size"] == 8
    assert cfg["head_dim"] == model.config.head_dim  # the rotary part's size, untouched
    shared = [p for n, p in sub.named_parameters() if n.endswith("shared_experts.down_proj.weight")]
    assert shared and all(p.shape[1] == 8 * model.config.n_shared_experts for p in shared)
    assert (logits(sub, IDS) - case["full"]).abs().max().item() <= TOL
    assert (case["reloaded"] - case["full"]).abs().max().item() <= TOL


def test_routed_experts_pruned_without_the_shared_expert_keep_the_field_they_share(tmp_path):
    """moe_intermediate_size sets both widths: when only the routed experts' channels are zero, the zero
    channels are kept (the export stays exact and loadable) instead of a config that cannot say it."""
    model = tiny_model("deepseek_v3")
    space = discover_groups(model)
    _prune(model, space, heads=[], routed=range(8, 16), shared=False)
    full = logits(model, IDS)
    sub = construct_subnet(model, space, layout="uniform")
    assert sub.model.config.moe_intermediate_size == 16
    assert (logits(sub.model, IDS) - full).abs().max().item() <= TOL


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "deepseek_v3", "deepseek_v2"])
@pytest.mark.parametrize("layout", ["uniform", "global"])
def test_moe_plans_remove_exactly_what_the_export_removes(arch, layout):
    """A layer's experts (and DeepSeek's shared expert) leave together in steps the config can say, so
    the planner's count is the sub-network's: no zero channels re-admitted behind the target's back."""
    from hf_oto.optim.budget import BudgetRules
    from hf_oto.optim.oneshot import oneshot_prune

    model = tiny_model(arch, intermediate_size=128, **({} if arch == "mixtral" else {"moe_intermediate_size": 64}))
    space = discover_groups(model)
    scores = torch.rand(len(space), generator=torch.Generator().manual_seed(0))
    plan = oneshot_prune(model, space, scores, target_sparsity=0.3, rules=BudgetRules(layout=layout))
    sub = construct_subnet(model, space, layout=layout)
    assert plan.pruned_params() > 0.2 * space.prunable_params
    assert sub.manifest.params_before - sub.manifest.params_after == plan.pruned_params()
    widths = {p.shape[-1] for n, p in sub.model.named_parameters() if n.endswith("experts.down_proj")}
    assert all(w % 8 == 0 for w in widths)


def test_the_trainer_prunes_mla_heads_and_expert_channels_and_exports_what_it_planned(tmp_path):
    """HESSO in the trainer on DeepSeek-V3 (dense first layer, MoE after it): the export removes exactly
    the parameters HESSO counted, loads without hf_oto's help as a stock config, and computes the same."""
    from test_trainer import Tokens, _args
    from transformers import AutoModelForCausalLM

    from hf_oto.trainer import HFOTOTrainer

    model = tiny_model("deepseek_v3", intermediate_size=64, moe_intermediate_size=32)
    trainer = HFOTOTrainer(model=model, args=_args(tmp_path, target_sparsity=0.3, max_steps=16),
                           train_dataset=Tokens())
    trainer.train()
    pruned = trainer.hesso.metrics()["pruned_params"]
    out = trainer.save_pruned_model(str(tmp_path / "pruned"))
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert "auto_map" not in json.loads((out / "config.json").read_text())
    before, after = (sum(p.numel() for p in m.parameters()) for m in (model, reloaded))
    assert pruned > 0 and before - after == pruned
    model.eval()
    assert (logits(reloaded, IDS) - logits(model, IDS)).abs().max().item() <= TOL


def test_experts_adapted_as_parameters_by_peft_stay_and_the_shared_expert_with_them():
    """peft adapts DeepSeek's fused expert weights as parameters (target_parameters, from the gate/up/down
    names): their channels stay, with the reason, and so does the shared expert, whose width the same
    field sets; heads and the dense FFN are still pruned."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("deepseek_v3"),
                           LoraConfig(r=4, target_modules=["q_b_proj", "kv_b_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"]))
    space = discover_groups(model)
    experts = [s for s in space.sets if s.kind == "expert_channel"]
    shared = [s for s in space.sets if "shared_experts" in s.prefix]
    assert experts and all(not s.prunable and "target_parameters" in s.reason for s in experts)
    assert shared and all(not s.prunable and "moe_intermediate_size also sets the width" in s.reason
                          for s in shared)
    assert all(s.prunable for s in space.sets if s.block == "attention" or s.prefix == "model.layers.0.mlp"), \
        [s.reason for s in space.sets if not s.prunable]


def test_excluding_the_experts_keeps_the_shared_expert_too():
    from hf_oto import exclude_groups

    space = exclude_groups(discover_groups(tiny_model("deepseek_v3_q")), ["*.mlp.experts.*"], "uniform")
    assert all(not s.prunable for s in space.sets if "experts" in s.prefix)
    assert all("moe_intermediate_size also sets the width" in s.reason
               for s in space.sets if "shared_experts" in s.prefix)


def test_inspect_shows_a_layers_experts_in_one_row(tmp_path, capsys):
    from hf_oto.cli import main

    tiny_model("deepseek_v3_q", num_hidden_layers=3).config.save_pretrained(tmp_path)
    capsys.readouterr()
    assert main(["inspect", str(tmp_path)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "expert_channel" in line]
    assert len(rows) == 3 and all("mlp.experts.* (4 experts)" in r and r.endswith("yes") for r in rows)


def test_measured_pricing_prices_the_experts_with_the_shared_expert_they_move_with():
    """The experts and DeepSeek's shared expert leave in one chain, so they are priced as one class
    (before, a trial per single kind found no expert item and left their scores unpriced)."""
    from hf_oto.optim.budget import BudgetRules
    from hf_oto.optim.pricing import price_kinds

    space = discover_groups(tiny_model("deepseek_v3", intermediate_size=64, moe_intermediate_size=32))
    scores = torch.rand(len(space), generator=torch.Generator().manual_seed(0)) + 0.1
    removed = torch.zeros(len(space), dtype=torch.bool)
    priced, trials = price_kinds(space, scores, removed, int(0.3 * space.prunable_params),
                                 lambda groups: float(groups.sum()), BudgetRules())
    by_class = {t.kind: t for t in trials}
    assert set(by_class) == {"attention_head", "ffn_channel", "expert_channel+ffn_channel"}
    factor = by_class["expert_channel+ffn_channel"].factor
    for k, gs in enumerate(space.sets):
        off = space.set_offset(k)
        if gs.kind == "expert_channel" or "shared_experts" in gs.prefix:
            assert torch.allclose(priced[off:off + gs.count], scores[off:off + gs.count] * factor)
