"""Depth pruning: whole decoder layers as groups, removed exactly, exported with fewer layers."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from tiny import ARCHS, ENCODERS, export_layouts, logits, make_hesso, reload_cases, tiny_model

from hf_oto import construct_subnet, discover_groups, save_pruned, zero_groups
from hf_oto.errors import ConfigError
from hf_oto.groups.depth import with_granularity
from hf_oto.optim.budget import BudgetRules, Plan, build_items, max_prunable, select

TOL = 1e-5
DECODERS = [a for a in ARCHS if a not in ENCODERS]
LAYOUTS = ("global", "per_layer_ffn", "uniform")
IDS = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(1))


def _deep(arch: str, layers: int = 3, seed: int = 0):
    extra = {"n_layer": layers} if arch == "gpt2" else {}
    return tiny_model(arch, seed=seed, num_hidden_layers=layers, **extra)


def _middle_layer_zeroed(i: int, arch: str):
    """A 3-layer model with its middle layer and about 30% of the other heads and channels zeroed."""
    model = _deep(arch, seed=i)
    space = with_granularity(model, discover_groups(model), "both")
    rng = random.Random(i)
    names = [g.name for g in space if g.prunable and g.kind != "layer" and rng.random() < 0.3]
    zero_groups(model, space, names + [f"{space.layers_path}.1.layer.0"])
    return model, space


# Every decoder architecture in the uniform layout (the stock export); the per-layer forms (DeciLM, remote
# code) for one architecture of each family: rotary GQA, fused qkv with biases, MoE experts.
PER_LAYER = ("llama", "gpt2", "mixtral")
CASES = [(arch, layout) for arch in DECODERS for layout in LAYOUTS if layout == "uniform" or arch in PER_LAYER]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Every decoder architecture with its middle layer removed (see CASES for the layouts)."""
    root = tmp_path_factory.mktemp("depth")
    return {key: case for i, arch in enumerate(DECODERS)
            for key, case in export_layouts(*_middle_layer_zeroed(i, arch), root, arch, IDS,
                                            [lay for a, lay in CASES if a == arch]).items()}


@pytest.fixture(scope="module")
def reloaded(exports, tmp_path_factory):
    return reload_cases(exports, IDS, tmp_path_factory.mktemp("reload"))


@pytest.mark.parametrize("arch, layout", CASES)
def test_a_zeroed_layer_is_removed_and_the_export_reloads_without_hf_oto(exports, reloaded, arch, layout):
    case = exports[f"{arch}-{layout}"]
    sub = case["sub"]
    assert sub.config.num_hidden_layers == 2
    assert (logits(sub, IDS) - case["full"]).abs().max().item() <= TOL
    assert (reloaded[f"{arch}-{layout}"] - case["full"]).abs().max().item() <= TOL
    cfg = json.loads((case["dir"] / "config.json").read_text())
    source = case["model"].config
    for key, value in source.to_dict().items():  # per-layer lists lose the removed layer's entry
        if isinstance(value, list) and len(value) == 3 and key != "architectures":
            assert cfg[key] == [value[0], value[2]], key
    assert case["manifest"].params_after == sum(p.numel() for p in sub.parameters())


@pytest.mark.parametrize("arch", DECODERS)
def test_uniform_layer_removal_is_a_stock_config(exports, arch):
    cfg = json.loads((exports[f"{arch}-uniform"]["dir"] / "config.json").read_text())
    assert "auto_map" not in cfg and not cfg.get("hf_oto_layers")


def test_layer_types_follow_the_layers_that_stay():
    model = _deep("gemma2", layers=4)  # sliding and full attention alternate
    space = with_granularity(model, discover_groups(model), "depth")
    before = list(model.config.layer_types)
    assert len(set(before)) == 2
    zero_groups(model, space, [f"{space.layers_path}.0.layer.0"])
    full = logits(model, IDS)
    sub = construct_subnet(model, space, layout="uniform").model
    assert sub.config.layer_types == before[1:]
    assert (logits(sub, IDS) - full).abs().max().item() <= TOL


def test_a_post_norm_layer_is_not_offered():
    model = tiny_model("bert")
    with pytest.raises(ConfigError, match="does not pass its input through"):
        with_granularity(model, discover_groups(model), "depth")


def test_the_identity_probe_leaves_the_weights_bit_for_bit():
    model = _deep("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with_granularity(model, discover_groups(model), "both")
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_depth_alone_keeps_the_width_sets_for_the_record_but_unprunable():
    model = _deep("llama")
    width = discover_groups(model)
    space = with_granularity(model, width, "depth")
    prunable = [gs for gs in space.sets if gs.prunable]
    assert {gs.kind for gs in prunable} == {"layer"} and len(prunable) == 3
    assert len(space.sets) == len(width.sets) + 3
    layer_params = sum(p.numel() for p in model.model.layers[0].parameters())
    assert space.prunable_params == 3 * layer_params


def test_a_removed_layer_frees_all_of_its_parameters_once():
    model = _deep("llama")
    space = with_granularity(model, discover_groups(model), "both")
    plan = Plan(space)
    k_ffn = next(k for k, gs in enumerate(space.sets) if gs.kind == "ffn_channel" and gs.layer == 1)
    k_layer = space.layer_sets()[1]
    plan.removed[k_ffn].update(range(8))
    assert plan.pruned_params() == 8 * space.sets[k_ffn].params_per_group
    layer_params = space.sets[k_layer].params_per_group
    assert plan.gain(k_layer, [0]) == layer_params - 8 * space.sets[k_ffn].params_per_group
    plan.removed[k_layer].add(0)
    assert plan.pruned_params() == layer_params
    assert plan.gain(k_ffn, list(range(8))) == 0  # channels of a removed layer free nothing more


def test_the_planner_keeps_one_layer_and_prefers_the_cheapest_layers():
    model = _deep("llama", layers=4)
    space = with_granularity(model, discover_groups(model), "depth")
    rules = BudgetRules(layout="uniform")
    layer = space.sets[space.layer_sets()[0]].params_per_group
    assert max_prunable(space, rules) == 3 * layer  # one layer always stays
    scores = torch.ones(len(space))
    whole = space.layer_sets()
    for i, s in zip((0, 1, 2, 3), (4.0, 0.5, 3.0, 0.1), strict=True):
        scores[space.set_offset(whole[i])] = s
    plan = Plan(space)
    got = select(plan, build_items(space, scores, plan, rules), 2 * layer, 0.01)
    assert got == 2 * layer
    assert {i for i, k in whole.items() if plan.removed[k]} == {1, 3}


def _hesso_on_layers(steps: int, *, lr: float, layers: int, **settings):
    """HESSO with depth groups only on a 4-layer Llama, ``layers`` of them to go, after ``steps`` training
    steps on one batch: (model, space, optimizer, parameters per layer)."""
    torch.manual_seed(0)
    model = _deep("llama", layers=4).train()
    space = with_granularity(model, discover_groups(model), "depth")
    layer = space.sets[space.layer_sets()[0]].params_per_group
    opt = make_hesso(model, space, base_kwargs={"lr": lr}, target_params=layers * layer, layout="uniform",
                     **settings)
    ids = torch.randint(3, 64, (4, 12), generator=torch.Generator().manual_seed(2))
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model, space, opt, layer


def test_hesso_removes_whole_layers_to_the_exact_target():
    """HESSO with depth groups only: the target is met exactly, the zeroed layers leave the export and
    the sub-network computes what the zeroed model does."""
    model, space, opt, layer = _hesso_on_layers(8, lr=1e-2, layers=2, start_pruning_step=1, pruning_steps=4,
                                                pruning_periods=2)
    model.eval()
    sub = construct_subnet(model, space, layout="uniform")
    assert sub.model.config.num_hidden_layers == 2
    assert sub.manifest.params_before - sub.manifest.params_after == 2 * layer
    assert (logits(sub.model, IDS) - logits(model, IDS)).abs().max().item() <= TOL


def test_depth_with_peft_adapters_is_refused_in_one_line():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_deep("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="no peft adapters"):
        with_granularity(model, discover_groups(model), "both")


def test_an_unknown_granularity_is_refused():
    model = _deep("llama")
    with pytest.raises(ConfigError, match="pruning_granularity must be one of"):
        with_granularity(model, discover_groups(model), "layers")


def _trainer_args(out, **kw):
    from compat_setup import trainer_args

    return trainer_args(out, max_steps=16, pruning_periods=2, **kw)


@pytest.mark.parametrize("granularity", ["depth", "both"])
def test_the_trainer_prunes_layers_and_exports_a_stock_model_with_fewer_layers(tmp_path, granularity):
    from compat_setup import Tokens
    from transformers import AutoModelForCausalLM

    from hf_oto.trainer import HFOTOTrainer

    model = _deep("llama", layers=4)
    args = _trainer_args(tmp_path / "run", pruning_granularity=granularity, target_sparsity=0.5)
    trainer = HFOTOTrainer(model=model, args=args, train_dataset=Tokens())
    trainer.train()
    out = trainer.save_pruned_model(str(tmp_path / "pruned"))
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    model.eval()
    assert (logits(reloaded, IDS) - logits(model, IDS)).abs().max().item() <= TOL
    kept = reloaded.config.num_hidden_layers
    if granularity == "depth":
        assert kept == 2  # half of the prunable parameters: two whole layers of four
    else:
        assert kept < 4 or reloaded.config.intermediate_size < 48 or reloaded.config.num_key_value_heads < 2
    manifest = json.loads((tmp_path / "pruned" / "pruning_manifest.json").read_text())
    assert sum(1 for s in manifest["sets"] if s["kind"] == "layer" and not s["kept"]) == 4 - kept
    assert manifest["hesso"]["granularity"] == granularity
    card = (tmp_path / "pruned" / "README.md").read_text()
    assert {"depth": "Only whole decoder layers (and, in a per-layer layout, whole attention or MLP blocks) could go",
            "both": "competed with heads and channels"}[granularity] in card


@pytest.mark.parametrize("layout", ["uniform", "global"])  # global: whole attention and MLP blocks too
def test_a_depth_run_resumes_bit_exactly(tmp_path, layout):
    from compat_setup import Tokens

    from hf_oto.trainer import HFOTOTrainer

    kw = {"pruning_granularity": "both", "pruning_layout": layout}
    full = _deep("llama", layers=4)
    HFOTOTrainer(model=full, args=_trainer_args(tmp_path / "a", **kw), train_dataset=Tokens()).train()
    first = _deep("llama", layers=4)
    HFOTOTrainer(model=first, args=_trainer_args(tmp_path / "b", save_strategy="steps", save_steps=7, **kw),
                 train_dataset=Tokens()).train()
    resumed = _deep("llama", layers=4)
    trainer = HFOTOTrainer(model=resumed, args=_trainer_args(tmp_path / "c", **kw), train_dataset=Tokens())
    trainer.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-7"))
    for (n, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), n


def test_qfa_with_depth_is_refused_before_training(tmp_path):
    from compat_setup import Tokens

    from hf_oto.trainer import HFOTOTrainer

    args = _trainer_args(tmp_path / "run", pruning_granularity="depth", qfa=True, qfa_quantizer="rtn",
                          qfa_group_size=16)
    with pytest.raises(ConfigError, match="pruning_granularity: width"):
        HFOTOTrainer(model=_deep("llama"), args=args, train_dataset=Tokens())


def test_block_influence_ranks_the_layer_that_turns_the_hidden_states_least_lowest():
    from hf_oto.optim.oneshot import oneshot_scores

    model = _deep("llama", layers=4)
    with torch.no_grad():  # layer 2 nearly passes its input through: its output projections almost vanish
        model.model.layers[2].self_attn.o_proj.weight.mul_(1e-3)
        model.model.layers[2].mlp.down_proj.weight.mul_(1e-3)
    space = with_granularity(model, discover_groups(model), "depth")
    batches = [{"input_ids": torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(3))}]
    scores = oneshot_scores(model, space, "block_influence", batches)
    per_layer = {i: float(scores[space.set_offset(k)]) for i, k in space.layer_sets().items()}
    assert min(per_layer, key=per_layer.get) == 2
    assert per_layer[2] < 0.01 * sorted(per_layer.values())[1]


@pytest.mark.parametrize("layout, arch", [("uniform", "llama"), ("global", "deci")])
def test_gguf_of_a_model_with_a_removed_layer_has_fewer_blocks(tmp_path, layout, arch):
    gguf = pytest.importorskip("gguf")
    from hf_oto.data import train_tokenizer
    from hf_oto.export.gguf import export_gguf

    tok = train_tokenizer(["the quick brown fox jumps over the lazy dog"] * 20, vocab=300)
    model = tiny_model("llama", seed=3, vocab_size=320, num_hidden_layers=3, intermediate_size=48)
    space = with_granularity(model, discover_groups(model), "both")
    ffn = [g.name for g in space if g.kind == "ffn_channel" and g.layer == 2 and int(g.name.rsplit(".", 1)[1]) < 8]
    zero_groups(model, space, ffn + [f"{space.layers_path}.1.layer.0"])
    sub = construct_subnet(model, space, layout=layout)
    folder = save_pruned(sub, tmp_path / layout, tokenizer=tok, source="tiny-llama")
    reader = gguf.GGUFReader(export_gguf(folder, tmp_path / f"{layout}.gguf"))
    fields = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {t.name: t for t in reader.tensors}
    assert fields["general.architecture"] == arch and fields[f"{arch}.block_count"] == 2
    assert {n.split(".")[1] for n in tensors if n.startswith("blk.")} == {"0", "1"}
    down = sub.model.model.layers[1].mlp.down_proj.weight  # the source's layer 2, now layer 1
    assert np.array_equal(np.asarray(tensors["blk.1.ffn_down.weight"].data).reshape(down.shape),
                          down.detach().float().numpy() if tensors["blk.1.ffn_down.weight"].data.dtype != np.float16
                          else down.detach().half().numpy())


def test_the_card_names_the_removed_layers(exports):
    card = (exports["llama-uniform"]["dir"] / "README.md").read_text()
    assert "Decoder layers removed whole: 1 of 3 (1, numbered as in the source model" in card


@pytest.mark.parametrize("arch, fields, movable", [
    ("qwen2_moe", {"mlp_only_layers": [1]}, {2}),  # a dense MLP in layer 1 only: 1 cannot move to 0, 2 not to 1
    ("deepseek_v3", {"num_hidden_layers": 4}, {1, 2, 3}),  # first_k_dense_replace=1: MoE layers may leave
])
def test_layers_whose_kind_the_config_sets_by_index_are_offered_where_the_rest_still_fits(arch, fields, movable):
    """Fields that place layer kinds by index (Qwen2-MoE's mlp_only_layers, DeepSeek's dense first layers)
    stay as they are, so a layer is offered only where every layer that moves up is what the config
    builds at its new index; the others say why, before any training."""
    model = tiny_model(arch, **{"num_hidden_layers": 3, **fields})
    space = with_granularity(model, discover_groups(model), "depth")
    layers = {s.layer: s for s in space.sets if s.kind == "layer"}
    assert {i for i, s in layers.items() if s.prunable} == movable
    assert all("its layers' kinds follow their index" in s.reason for s in layers.values() if not s.prunable)


def test_a_model_where_no_layer_can_leave_is_refused_in_one_line():
    model = tiny_model("llama", num_hidden_layers=1)
    with pytest.raises(ConfigError, match="no decoder layer of this model can be removed .the model has a single"):
        with_granularity(model, discover_groups(model), "depth")


def test_layer_turn_counts_training_passes_of_this_model_only():
    """HESSO's block influence counts training forward passes with gradients, not evaluation, no-grad
    passes (pricing probes) or a copy of the model (a distillation teacher)."""
    import copy

    from hf_oto.optim.influence import LayerTurn

    model = _deep("llama", layers=3).train()
    space = with_granularity(model, discover_groups(model), "depth")
    turn = LayerTurn(model, space, training_only=True).attach()
    teacher = copy.deepcopy(model)
    model(input_ids=IDS)
    counted = turn.sums.clone()
    assert bool((counted[:, 1] == IDS.numel()).all()) and bool((counted[:, 0] > 0).all())
    with torch.no_grad():
        model(input_ids=IDS)
    teacher(input_ids=IDS)
    model.eval()
    model(input_ids=IDS)
    assert torch.equal(turn.sums, counted)
    turn.detach()
    model.train()
    model(input_ids=IDS)
    assert torch.equal(turn.sums, counted)


def test_placed_layers_keep_their_mean_score_and_follow_block_influence():
    from hf_oto.optim.influence import LayerTurn

    model = _deep("llama", layers=3)
    space = with_granularity(model, discover_groups(model), "both")
    turn = LayerTurn(model, space)
    score = torch.rand(len(space))
    assert torch.equal(turn.place(score, space), score)  # nothing counted yet: the criterion alone
    turn.sums = torch.tensor([[3.0, 1.0], [1.0, 1.0], [2.0, 1.0]], dtype=torch.float64)
    placed = turn.place(score, space)
    idx = [space.set_offset(k) for k in turn.whole.values()]
    others = [j for j in range(len(space)) if j not in idx]
    assert torch.equal(placed[others], score[others])
    assert placed[idx].mean().item() == pytest.approx(score[idx].mean().item(), rel=1e-6)
    assert placed[idx].argsort().tolist() == [1, 2, 0]


def test_hesso_marks_the_layer_that_turns_the_stream_least():
    """At a period start HESSO removes the whole layer with the lowest block influence on its training
    batches (depth groups only, one layer to go)."""
    model, space, opt, _ = _hesso_on_layers(4, lr=1e-3, layers=1, start_pruning_step=3, pruning_steps=2,
                                            pruning_periods=1, criterion="fisher", selection="per_param")
    marked = [i for i, k in space.layer_sets().items() if bool(opt.redundant[space.set_offset(k)])]
    assert marked == [int(opt._turn.means().argmin())]
    assert "layer_turn" in opt.state_dict()["hesso"]
