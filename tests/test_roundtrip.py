"""discover -> zero -> construct -> save -> reload without hf_oto -> same logits, for every architecture."""

from __future__ import annotations

import json
import random

import pytest
import torch
from tiny import ARCHS, ENCODERS, export_layouts, logits, reload_logits, tiny_model

from hf_oto import construct_subnet, discover_groups, save_pruned, zero_groups
from hf_oto.groups import group_is_zero

TOL = 1e-5
LAYOUTS = ("global", "per_layer_ffn", "uniform")
IDS = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(1))

def _zero_random(model, space, seed: int, p: float = 0.4) -> list[str]:
    """About ``p`` of the groups at random, and in MoE models the last 8 channels of every expert (with
    the FFNs whose width the same field sets): a layer's experts keep one width in blocks of 8, so
    scattered zero channels alone would never leave."""
    rng = random.Random(seed)
    names = [g.name for g in space if g.prunable and rng.random() < p]
    tied = {(s.layer, s.ffn.field) for s in space.sets if s.kind == "expert_channel" and s.prunable}
    for s in space.sets:
        if s.prunable and s.block == "mlp" and (s.layer, s.ffn.field) in tied:
            names += [f"{s.prefix}.{s.kind}.{j}" for j in range(s.count - 8 * s.ffn.per_field, s.count)]
    zero_groups(model, space, names)
    return names


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Build, zero, construct and export every architecture in every layout (done once)."""
    root = tmp_path_factory.mktemp("exports")
    cases = {}
    for i, arch in enumerate(ARCHS):
        model = tiny_model(arch, seed=i)
        space = discover_groups(model)
        _zero_random(model, space, seed=i)
        cases.update(export_layouts(model, space, root, arch, IDS, LAYOUTS))
    return cases


@pytest.fixture(scope="module")
def reloaded(exports, tmp_path_factory):
    """Load every export in one fresh interpreter that cannot import hf_oto."""
    dirs = {}
    for key, case in exports.items():
        cfg = json.loads((case["dir"] / "config.json").read_text())
        arch = key.rsplit("-", 1)[0]
        auto = "AutoModel" if arch in ENCODERS else "AutoModelForCausalLM"
        dirs[key] = {"dir": str(case["dir"]), "auto": auto, "remote": "auto_map" in cfg}
    return reload_logits(dirs, IDS, tmp_path_factory.mktemp("reload"))


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_subnet_matches_zeroed_model(exports, arch, layout):
    case = exports[f"{arch}-{layout}"]
    sub_logits = logits(case["sub"], IDS)
    assert sub_logits.shape == case["full"].shape
    assert (sub_logits - case["full"]).abs().max().item() <= TOL
    man = case["manifest"]
    assert man.params_after < man.params_before
    assert man.params_after == sum(p.numel() for p in case["sub"].parameters())


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_export_reloads_without_hf_oto(exports, reloaded, arch, layout):
    key = f"{arch}-{layout}"
    diff = (reloaded[key] - logits(exports[key]["sub"], IDS)).abs().max().item()
    assert diff <= TOL


@pytest.mark.parametrize("arch", list(ARCHS))
def test_uniform_export_is_stock_config(exports, arch):
    folder = exports[f"{arch}-uniform"]["dir"]
    cfg = json.loads((folder / "config.json").read_text())
    assert "auto_map" not in cfg and not cfg.get("hf_oto_layers")
    assert not (folder / "modeling_hfoto.py").exists()
    assert (folder / "model.safetensors").exists() and not list(folder.glob("*.bin"))
    manifest = json.loads((folder / "pruning_manifest.json").read_text())
    assert manifest["source"] == f"tiny-{arch}" and manifest["layout"] == "uniform"
    assert "How to load" in (folder / "README.md").read_text()


def test_per_layer_export_ships_remote_code(exports):
    """Random pruning gives layers of different sizes somewhere; those repos carry remote code and a
    config that names no stock architecture and lists every layer."""
    per_layer = [k for k, c in exports.items() if c["manifest"].layout == "per-layer"]
    assert per_layer
    for key in per_layer:
        folder = exports[key]["dir"]
        cfg = json.loads((folder / "config.json").read_text())
        form = json.loads((folder / "pruning_manifest.json").read_text())["export_format"]
        code = (folder / "modeling_hfoto.py").read_text()
        assert "import hf_oto" not in code and "from hf_oto" not in code
        stock = exports[key]["model"].config.architectures or [type(exports[key]["model"]).__name__]
        assert cfg["architectures"] != stock and cfg["auto_map"], key
        if form == "decilm":
            assert cfg["model_type"] == "nemotron-nas" and cfg["architectures"] == ["DeciLMForCausalLM"]
            assert len(cfg["block_configs"]) == cfg["num_hidden_layers"]
        else:
            assert form == "remote_code"
            layers = cfg["hf_oto_layers"]["layers"]
            assert layers and all(layers), key  # every layer listed, with every per-layer field
            assert len(cfg.get("per_layer_config", layers)) == len(layers)


def test_llama_layouts_pick_their_export_format(exports):
    """Llama with attention uniform and FFN per layer is DeciLM; with per-layer query heads it is not."""
    forms = {layout: json.loads((exports[f"llama-{layout}"]["dir"] / "pruning_manifest.json").read_text())
             ["export_format"] for layout in LAYOUTS}
    assert forms == {"uniform": "stock", "per_layer_ffn": "decilm", "global": "remote_code"}
    cfg = json.loads((exports["llama-per_layer_ffn"]["dir"] / "config.json").read_text())
    sub = exports["llama-per_layer_ffn"]["sub"]
    widths = [layer.mlp.gate_proj.out_features for layer in sub.model.layers]
    kv = [layer.self_attn.k_proj.out_features // cfg["head_dim"] for layer in sub.model.layers]
    assert len(set(widths)) > 1
    assert [b["ffn"]["intermediate_size"] for b in cfg["block_configs"]] == widths
    assert [cfg["num_attention_heads"] // b["attention"]["n_heads_in_group"] for b in cfg["block_configs"]] == kv
    assert cfg["intermediate_size"] == max(widths)


def test_per_layer_config_is_what_transformers_reads(exports):
    """Where transformers' own config class takes per_layer_config (FFN widths per layer), the export
    writes it and transformers' parser sees each layer's real widths."""
    from transformers import AutoConfig

    folder = exports["qwen2-per_layer_ffn"]["dir"]
    raw = json.loads((folder / "config.json").read_text())
    assert "per_layer_config" in raw
    cfg = AutoConfig.from_pretrained(folder)  # the stock Qwen2Config parses it itself
    assert cfg.is_heterogeneous
    for i, layer in enumerate(exports["qwen2-per_layer_ffn"]["sub"].model.layers):
        assert cfg.per_layer_config[i].intermediate_size == layer.mlp.gate_proj.out_features


def test_unexpressible_decilm_request_is_refused_before_writing(exports, tmp_path):
    from hf_oto.errors import ExportError

    with pytest.raises(ExportError, match="query heads differ"):
        save_pruned(exports["llama-global"]["subnet"], tmp_path / "x", export_format="decilm")
    with pytest.raises(ExportError, match="same sizes in every layer"):
        save_pruned(exports["llama-uniform"]["subnet"], tmp_path / "y", export_format="decilm")
    assert not list(tmp_path.iterdir())


def test_source_model_is_not_modified(tmp_path):
    model = tiny_model("llama")
    space = discover_groups(model)
    _zero_random(model, space, seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg_before = model.config.to_dict()
    sub = construct_subnet(model, space, layout="uniform")
    save_pruned(sub, tmp_path / "out")
    assert model.config.to_dict() == cfg_before
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert "auto_map" not in sub.model.config.to_dict()


def test_zero_groups_marks_exactly_those_groups():
    model = tiny_model("qwen2")
    space = discover_groups(model)
    names = _zero_random(model, space, seed=5)
    zero = group_is_zero(model, space)
    flagged = {space[i].name for i in torch.nonzero(zero).flatten().tolist()}
    assert set(names) <= flagged
    # Query-head slots overlap kv groups, so zeroing kv groups can zero a slot too; nothing else.
    extra = {n for n in flagged - set(names) if ".query_head." not in n}
    assert not extra


def test_exports_carry_the_fields_older_readers_need(exports, tmp_path):
    """transformers 4.x and converters read a top-level rope_theta and know PreTrainedTokenizerFast."""
    for key, case in exports.items():
        cfg = json.loads((case["dir"] / "config.json").read_text())
        rope = cfg.get("rope_parameters")
        if isinstance(rope, dict) and "rope_theta" in rope:
            assert cfg["rope_theta"] == rope["rope_theta"], key
    from test_inputs import _tiny_tokenizer

    model = tiny_model("llama", rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                 "original_max_position_embeddings": 64})
    space = discover_groups(model)
    out = save_pruned(construct_subnet(model, space, layout="uniform"), tmp_path / "out", tokenizer=_tiny_tokenizer())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_theta"] == 500000.0 and cfg["rope_scaling"]["rope_type"] == "llama3"
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.rope_parameters["rope_theta"] == 500000.0
    assert (logits(reloaded, IDS) - logits(model, IDS)).abs().max().item() <= TOL
    assert AutoTokenizer.from_pretrained(out)("w3 w5")["input_ids"] == _tiny_tokenizer()("w3 w5")["input_ids"]
