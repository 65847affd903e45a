"""Whole attention and MLP blocks (depth pruning in a per-layer layout): removed exactly, exported as
remote code or DeciLM ``no_op`` blocks, reloaded without hf_oto, decoded with a KV cache."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from safetensors import safe_open
from tiny import ARCHS, ENCODERS, export_layouts, logits, reload_cases, reload_logits, tiny_model

from hf_oto import construct_subnet, discover_groups, save_pruned, zero_groups
from hf_oto.groups.depth import with_granularity
from hf_oto.optim.budget import Plan
from hf_oto.subnet.remote_code import NoOpBlock

TOL = 1e-5
DECODERS = [a for a in ARCHS if a not in ENCODERS]
IDS = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(1))
# layer 0 loses its MLP, layer 1 its attention, layer 2 both (so it leaves whole), layer 3 neither (the first
# layer's attention is never offered: serving stacks need it)
GONE = [(0, "mlp"), (1, "attention"), (2, "attention"), (2, "mlp")]


def _model(arch: str, seed: int = 0, layers: int = 4):
    extra = {"n_layer": layers} if arch == "gpt2" else {}
    return tiny_model(arch, seed=seed, num_hidden_layers=layers, **extra)


def _block_names(space, gone) -> list[str]:
    return [gs.name(0) for gs in space.sets if gs.kind in ("attention_block", "mlp_block") and gs.prunable
            and (gs.layer, gs.block) in gone]


def _zeroed(i: int, arch: str, layout: str):
    """A 4-layer model with the blocks of GONE zeroed (where offered) and ~30% of the other heads and channels."""
    model = _model(arch, seed=i)
    space = with_granularity(model, discover_groups(model), "both", layout)
    rng = random.Random(i)
    width = [g.name for g in space if g.prunable and g.kind in ("kv_group", "query_head", "attention_head",
                                                                "ffn_channel") and rng.random() < 0.3]
    zero_groups(model, space, width + _block_names(space, GONE))
    return model, space


CASES = [(arch, "global") for arch in DECODERS] + [("llama", "per_layer_ffn")]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("blocks")
    out = {}
    for i, (arch, layout) in enumerate(CASES):
        out.update(export_layouts(*_zeroed(i, arch, layout), root, arch, IDS, [layout]))
    return out


@pytest.fixture(scope="module")
def reloaded(exports, tmp_path_factory):
    return reload_cases(exports, IDS, tmp_path_factory.mktemp("reload"))


@pytest.mark.parametrize("arch, layout", CASES)
def test_removed_blocks_leave_exactly_and_the_export_reloads_without_hf_oto(exports, reloaded, arch, layout):
    case = exports[f"{arch}-{layout}"]
    space_sets = case["subnet"].manifest.sets
    offered = {(s.layer, s.kind.split("_")[0]) for s in space_sets if s.kind.endswith("_block")}
    assert {(1, "attention"), (0, "mlp")} <= offered or arch == "opt"  # OPT's FFN is not a child module
    sub = case["sub"]
    assert (logits(sub, IDS) - case["full"]).abs().max().item() <= TOL
    assert (reloaded[f"{arch}-{layout}"] - case["full"]).abs().max().item() <= TOL
    assert case["manifest"].params_after == sum(p.numel() for p in sub.parameters())
    no_ops = [name for name, m in sub.named_modules() if isinstance(m, NoOpBlock)]
    assert no_ops, "the removed blocks are no-op modules in the sub-network"
    assert not any(p for name in no_ops for p in sub.get_submodule(name).parameters())
    layer2_leaves = any(s.kind == "layer" and s.layer == 2 and not s.kept for s in space_sets)
    n_layers = sub.config.get_text_config().num_hidden_layers
    assert n_layers == (3 if layer2_leaves else 4)


def test_a_decilm_export_marks_removed_blocks_no_op_and_holds_no_weights_for_them(exports):
    case = exports["llama-per_layer_ffn"]
    cfg = json.loads((case["dir"] / "config.json").read_text())
    assert cfg["model_type"] == "nemotron-nas" and cfg["architectures"] == ["DeciLMForCausalLM"]
    blocks = cfg["block_configs"]
    assert len(blocks) == cfg["num_hidden_layers"] == 3  # source layer 2 lost both blocks and left
    assert blocks[1]["attention"] == {"n_heads_in_group": None, "no_op": True, "replace_with_linear": False}
    assert blocks[0]["ffn"]["no_op"] and blocks[0]["ffn"]["intermediate_size"] is None
    assert not blocks[2]["attention"]["no_op"] and not blocks[2]["ffn"]["no_op"]
    live = case["sub"].model.layers[0].self_attn
    assert cfg["num_attention_heads"] == live.q_proj.out_features // cfg["head_dim"]
    with safe_open(case["dir"] / "model.safetensors", "pt") as f:
        names = set(f.keys())
    # vLLM's DeciLM builds no norm or projection for a no_op block: the checkpoint must not have them
    assert not any(n.startswith(("model.layers.1.self_attn.", "model.layers.1.input_layernorm.")) for n in names)
    assert not any(n.startswith(("model.layers.0.mlp.", "model.layers.0.post_attention_layernorm.")) for n in names)
    assert "model.layers.0.self_attn.q_proj.weight" in names


def test_cached_decoding_is_exact_without_attention_blocks():
    """A removed attention block still records the sequence length in its layer's cache (transformers reads
    positions from the cache), so cached decoding equals a full recompute."""
    model = _model("llama", layers=3)
    space = with_granularity(model, discover_groups(model), "depth", "global")
    zero_groups(model, space, _block_names(space, [(1, "attention"), (2, "attention")]))
    sub = construct_subnet(model, space, layout="global").model.eval()
    assert isinstance(sub.model.layers[1].self_attn, NoOpBlock)
    ids = torch.tensor([[5, 9, 13, 2, 7]])
    with torch.no_grad():
        out = sub(input_ids=ids, use_cache=True)
        cache, seq = out.past_key_values, ids
        for step in range(6):
            nxt = out.logits[:, -1:].argmax(-1)
            seq = torch.cat([seq, nxt], 1)
            out = sub(input_ids=nxt, past_key_values=cache, use_cache=True)
            full = sub(input_ids=seq, use_cache=False).logits[:, -1]
            assert (out.logits[:, -1] - full).abs().max().item() <= TOL, step
        generated = sub.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(generated, seq[:, :generated.shape[1]])


def test_blocks_are_offered_only_where_the_layout_lets_layers_differ():
    model = _model("llama")
    width = discover_groups(model)
    kinds = {layout: {gs.kind for gs in with_granularity(model, width, "both", layout).sets}
             for layout in ("uniform", "per_layer_ffn", "global")}
    assert "layer" in kinds["uniform"] and not {"attention_block", "mlp_block"} & kinds["uniform"]
    assert {"attention_block", "mlp_block"} <= kinds["per_layer_ffn"] <= kinds["global"]


def test_the_planner_counts_a_block_once_and_a_layer_without_both_blocks_as_removed():
    model = _model("llama")
    space = with_granularity(model, discover_groups(model), "both", "global")
    k = {(gs.layer, gs.kind): i for i, gs in enumerate(space.sets)}
    attn, mlp, layer = k[(0, "attention_block")], k[(0, "mlp_block")], k[(0, "layer")]
    heads = k[(0, "kv_group")]
    sets = space.sets
    assert sets[attn].params_per_group + sets[mlp].params_per_group == sets[layer].params_per_group  # Llama: no shared
    assert space.prunable_params == sum(p.numel() for p in model.model.layers.parameters())
    plan = Plan(space)
    assert plan.gain(heads, [0]) > 0
    plan.removed[heads].add(0)
    assert plan.gain(attn, [0]) == sets[attn].params_per_group - plan.pruned_params()  # heads counted once
    plan.removed[attn].add(0)
    assert plan.pruned_params() == sets[attn].params_per_group
    assert plan.gain(heads, [1]) == 0 and plan.block_gone(0, "attention") and not plan.layer_gone(0)
    assert plan.gain(mlp, [0]) == sets[mlp].params_per_group
    plan.removed[mlp].add(0)
    assert plan.layer_gone(0) and plan.pruned_params() == sets[layer].params_per_group
    assert plan.gain(layer, [0]) == 0


def test_a_block_that_does_not_vanish_with_its_weights_is_not_offered():
    model = _model("llama")
    # a constant added to the attention's output: zeroing its weights no longer zeroes what it adds
    model.model.layers[0].self_attn.register_forward_hook(lambda _m, _a, out: (out[0] + 1.0, *out[1:]))
    space = with_granularity(model, discover_groups(model), "both", "global")
    attn = [gs for gs in space.sets if gs.kind == "attention_block"]
    assert attn and not any(gs.prunable for gs in attn)  # layers of one structure share the probe
    assert "does not compute what it computes without it" in attn[0].reason
    assert all(gs.prunable for gs in space.sets if gs.kind == "mlp_block")


def test_hesso_block_influence_measures_each_block_on_the_residual_stream():
    from hf_oto.optim.influence import LayerTurn

    model = _model("llama")
    with torch.no_grad():  # layer 1's attention adds almost nothing; its MLP stays as it is
        model.model.layers[1].self_attn.o_proj.weight.mul_(1e-4)
    space = with_granularity(model, discover_groups(model), "depth", "global")
    turn = LayerTurn(model, space).attach()
    with torch.no_grad():
        model(input_ids=IDS)
    turn.detach()
    means = dict(zip(turn.whole, turn.means().tolist(), strict=True))
    attention = {key[0]: v for key, v in means.items() if isinstance(key, tuple) and key[1] == "attention"}
    assert min(attention, key=attention.get) == 1 and attention[1] < 1e-3 * max(attention.values())
    assert means[(1, "mlp")] > 100 * attention[1]


def test_the_trainer_removes_blocks_and_the_export_reloads_equal(tmp_path):
    from hf_oto import HFOTOTrainer, HFOTOTrainingArguments

    model = _model("llama", seed=5)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(3, 64, (32, 12)).tolist()]
    args = HFOTOTrainingArguments(output_dir=str(tmp_path / "run"), max_steps=12, per_device_train_batch_size=4,
                                  learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True,
                                  target_sparsity=0.4, pruning_granularity="depth", pruning_layout="global",
                                  start_pruning_step=0.2, pruning_steps=0.5, pruning_periods=2, seed=0)
    trainer = HFOTOTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    kinds = {gs.kind for gs in trainer.hesso.space.sets if gs.prunable}
    assert {"layer", "attention_block", "mlp_block"} <= kinds
    out = trainer.save_pruned_model(tmp_path / "pruned")
    manifest = json.loads((out / "pruning_manifest.json").read_text())
    removed = [s for s in manifest["sets"] if s["kind"] in ("layer", "attention_block", "mlp_block") and not s["kept"]]
    assert removed
    sub_logits = reload_logits({"m": {"dir": str(out), "remote": "auto_map" in json.loads(
        (out / "config.json").read_text())}}, IDS, tmp_path)["m"]
    trained = trainer.model.eval()
    assert (sub_logits - logits(trained, IDS)).abs().max().item() <= TOL


def test_gguf_writes_removed_blocks_as_skipped_or_zero_stub_blocks(tmp_path):
    gguf = pytest.importorskip("gguf")
    from hf_oto.data import train_tokenizer
    from hf_oto.export.gguf import STUB_FFN, export_gguf

    tok = train_tokenizer(["the quick brown fox jumps over the lazy dog"] * 20, vocab=300)
    model = tiny_model("llama", seed=3, vocab_size=320, num_hidden_layers=4, intermediate_size=48)
    space = with_granularity(model, discover_groups(model), "depth", "per_layer_ffn")
    zero_groups(model, space, _block_names(space, [(0, "mlp"), (1, "attention"), (3, "mlp")]))
    sub = construct_subnet(model, space, layout="per_layer_ffn")
    folder = save_pruned(sub, tmp_path / "m", tokenizer=tok, source="tiny-llama")
    reader = gguf.GGUFReader(export_gguf(folder, tmp_path / "m.gguf"))
    fields = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {t.name: t for t in reader.tensors}
    heads, kv = model.config.num_attention_heads, model.config.num_key_value_heads
    # llama.cpp skips 0-head attention; it drops an FFN-free layer's attention output, so a removed MLP is one
    # zero channel
    assert fields["deci.attention.head_count"] == [heads, 0, heads, heads]
    assert fields["deci.attention.head_count_kv"] == [kv, 0, kv, kv]
    assert fields["deci.feed_forward_length"] == [STUB_FFN, 48, 48, STUB_FFN]
    for name in ("blk.0.ffn_down.weight", "blk.0.ffn_gate.weight", "blk.3.ffn_up.weight"):
        assert not np.asarray(tensors[name].data).any(), name
    assert "blk.1.attn_q.weight" not in tensors and "blk.1.attn_norm.weight" not in tensors


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_a_masked_view_without_blocks_equals_the_zeroed_model(arch):
    import copy

    from hf_oto.groups.mask import MaskedView

    model = _model(arch, seed=2)
    space = with_granularity(model, discover_groups(model), "both", "global")
    names = _block_names(space, GONE) + [g.name for g in space if g.kind == "ffn_channel" and g.layer == 3][:4]
    flags = torch.zeros(len(space), dtype=torch.bool)
    flags[[space.index_of(n) for n in names]] = True
    zeroed = copy.deepcopy(model)
    zero_groups(zeroed, space, names)
    with MaskedView(model, space).removed(flags):
        masked = logits(model, IDS)
    assert (masked - logits(zeroed, IDS)).abs().max().item() <= TOL
    assert (logits(model, IDS) - logits(zeroed, IDS)).abs().max().item() > 1e-3  # the view is gone after the block


def test_inspect_lists_blocks_for_a_per_layer_layout_only(capsys):
    from hf_oto.cli import main

    assert main(["inspect", "--demo", "--pruning_granularity", "depth", "--pruning_layout", "global"]) == 0
    table = capsys.readouterr().out
    assert "attention_block" in table and "mlp_block" in table and "no: pruning_granularity 'depth'" in table
    assert main(["inspect", "--demo", "--pruning_granularity", "depth"]) == 0
    assert "attention_block" not in capsys.readouterr().out


def test_the_first_layer_that_stays_keeps_its_attention():
    """vLLM's DeciLM starts the residual stream in the first layer's attention and llama.cpp sizes heads from
    it: layer 0's attention block is not offered, and where layer 0 leaves whole, a zeroed attention in the
    next layer stays as zeros (exact) rather than leaving."""
    model = _model("llama")
    space = with_granularity(model, discover_groups(model), "both", "per_layer_ffn")
    first = next(gs for gs in space.sets if gs.kind == "attention_block" and gs.layer == 0)
    assert not first.prunable and "first layer keeps its attention" in first.reason
    zero_groups(model, space, [f"{space.layers_path}.0.layer.0"] + _block_names(space, [(1, "attention")]))
    sub = construct_subnet(model, space, layout="per_layer_ffn")
    assert sub.model.config.num_hidden_layers == 3
    assert not isinstance(sub.model.model.layers[0].self_attn, NoOpBlock)
    assert (logits(sub.model, IDS) - logits(model, IDS)).abs().max().item() <= TOL
