"""export_gguf: per-layer arrays and tensor shapes match the export; bad input is refused before writing."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from tiny import tiny_model

from hf_oto import construct_subnet, discover_groups, save_pruned, zero_groups
from hf_oto.cli import main
from hf_oto.data import train_tokenizer
from hf_oto.errors import ExportError
from hf_oto.export.gguf import export_gguf

gguf = pytest.importorskip("gguf")  # a core dependency; the skip only guards broken installs


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A tiny GQA Llama with a byte-level BPE tokenizer, pruned per layer (heads and FFN) and uniformly."""
    root = tmp_path_factory.mktemp("gguf")
    tok = train_tokenizer(["the quick brown fox jumps over the lazy dog"] * 20, vocab=300)
    model = tiny_model("llama", seed=3, vocab_size=320, num_hidden_layers=3, intermediate_size=48)
    space = discover_groups(model)
    names = [g.name for g in space if g.prunable and (
        (g.kind == "ffn_channel" and int(g.name.rsplit(".", 1)[1]) % (g.layer + 2) == 0)
        or (g.kind == "query_head" and g.layer == 1 and g.name.endswith(".0")))]
    zero_groups(model, space, names)
    out = {}
    for layout in ("global", "uniform"):
        sub = construct_subnet(model, space, layout=layout)
        out[layout] = (sub.model, save_pruned(sub, root / layout, tokenizer=tok, source="tiny-llama"))
    return out


def _read(path):
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    return fields, {t.name: t for t in reader.tensors}


def _layer_dims(sub):
    hd = sub.config.head_dim
    return [(layer.self_attn.q_proj.out_features // hd, layer.self_attn.k_proj.out_features // hd,
             layer.mlp.gate_proj.out_features) for layer in sub.model.layers]


@pytest.mark.parametrize("layout,arch", [("global", "deci"), ("uniform", "llama")])
def test_gguf_layers_match_the_export(exports, tmp_path, layout, arch):
    sub, folder = exports[layout]
    path = export_gguf(folder, tmp_path / f"{layout}.gguf")
    fields, tensors = _read(path)
    assert fields["general.architecture"] == arch
    dims = _layer_dims(sub)
    if arch == "deci":
        assert len(set(dims)) > 1  # the case really is non-uniform
        assert fields["deci.attention.head_count"] == [d[0] for d in dims]
        assert fields["deci.attention.head_count_kv"] == [d[1] for d in dims]
        assert fields["deci.feed_forward_length"] == [d[2] for d in dims]
    else:
        assert (fields["llama.attention.head_count"], fields["llama.attention.head_count_kv"],
                fields["llama.feed_forward_length"]) == dims[0]
    hd, hidden = sub.config.head_dim, sub.config.hidden_size
    for i, (q, kv, ff) in enumerate(dims):
        # GGUF lists dimensions innermost first: [in, out] for a Hugging Face [out, in] weight.
        assert list(tensors[f"blk.{i}.attn_q.weight"].shape) == [hidden, q * hd]
        assert list(tensors[f"blk.{i}.attn_k.weight"].shape) == [hidden, kv * hd]
        assert list(tensors[f"blk.{i}.ffn_down.weight"].shape) == [ff, hidden]


def test_gguf_interleaves_each_heads_rotary_halves(exports, tmp_path):
    """llama.cpp's rope pairs neighbouring rows; Hugging Face pairs row j with row j + head_dim/2."""
    sub, folder = exports["global"]
    _, tensors = _read(export_gguf(folder, tmp_path / "g.gguf"))
    hd = sub.config.head_dim
    for i, layer in enumerate(sub.model.layers):
        for proj, key in ((layer.self_attn.q_proj, "attn_q"), (layer.self_attn.k_proj, "attn_k")):
            w = proj.weight.detach().numpy()
            g = np.asarray(tensors[f"blk.{i}.{key}.weight"].data).reshape(w.shape)
            for h in range(w.shape[0] // hd):
                for j in range(hd // 2):
                    assert np.array_equal(g[h * hd + 2 * j], w[h * hd + j])
                    assert np.array_equal(g[h * hd + 2 * j + 1], w[h * hd + hd // 2 + j])


def test_gguf_carries_the_tokenizer(exports, tmp_path):
    from transformers import AutoTokenizer

    _, folder = exports["uniform"]
    fields, _ = _read(export_gguf(folder, tmp_path / "u.gguf"))
    tok = AutoTokenizer.from_pretrained(folder)
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == 320
    for text, idx in tok.get_vocab().items():
        assert tokens[idx] == text
    assert fields["tokenizer.ggml.eos_token_id"] == tok.eos_token_id


def test_gguf_refuses_weights_that_disagree_with_the_config(exports, tmp_path):
    _, folder = exports["global"]
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["hf_oto_layers"]["layers"][1]["intermediate_size"] += 8
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match="mlp.gate_proj.weight is"):
        export_gguf(bad, tmp_path / "bad.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*partial*"))


def test_gguf_cli_errors_are_one_line_and_files_are_not_replaced(exports, tmp_path, capsys):
    _, folder = exports["uniform"]
    target = tmp_path / "m.gguf"
    assert main(["export-gguf", str(folder), "--out", str(target)]) == 0
    before = target.read_bytes()
    assert main(["export-gguf", str(folder), "--out", str(target)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exists" in err[0]
    assert target.read_bytes() == before
    gpt2 = tmp_path / "gpt2"
    small = tiny_model("gpt2")
    save_pruned(construct_subnet(small, discover_groups(small), layout="uniform"), gpt2)
    assert main(["export-gguf", str(gpt2)]) == 2
    assert "Llama-family" in capsys.readouterr().err
    assert not (tmp_path / "gpt2-f32.gguf").exists()


def test_decilm_export_converts(tmp_path):
    """The DeciLM form (attention uniform, FFN per layer) converts with per-layer FFN arrays."""
    tok = train_tokenizer(["a b c d e f g"] * 10, vocab=280)
    model = tiny_model("llama", seed=1, vocab_size=300, intermediate_size=48)
    space = discover_groups(model)
    zero_groups(model, space, [g.name for g in space if g.kind == "ffn_channel" and g.layer == 0
                               and int(g.name.rsplit(".", 1)[1]) < 16])
    sub = construct_subnet(model, space, layout="per_layer_ffn")
    folder = save_pruned(sub, tmp_path / "d", tokenizer=tok)
    assert json.loads((folder / "config.json").read_text())["model_type"] == "nemotron-nas"
    fields, _ = _read(export_gguf(folder))
    assert fields["deci.feed_forward_length"] == [d[2] for d in _layer_dims(sub.model)] == [32, 48]
    assert torch.is_tensor(sub.model.model.layers[0].mlp.gate_proj.weight)


@pytest.mark.parametrize("dtype, qtype, tol", [("bf16", "BF16", 1e-2), ("q8_0", "Q8_0", 2e-2)])
def test_gguf_bf16_and_q8_0_hold_the_weights_within_their_precision(exports, tmp_path, dtype, qtype, tol):
    sub, folder = exports["uniform"]
    _, tensors = _read(export_gguf(folder, tmp_path / f"{dtype}.gguf", dtype=dtype))
    fields, _ = _read(tmp_path / f"{dtype}.gguf")
    assert fields["general.file_type"] == getattr(gguf.LlamaFileType, f"MOSTLY_{qtype}")
    w = sub.model.layers[0].mlp.down_proj.weight.detach().numpy()  # rows of ffn width: not rotated
    t = tensors["blk.0.ffn_down.weight"]
    blocks_fit = dtype == "bf16" or w.shape[1] % 32 == 0
    assert t.tensor_type == (getattr(gguf.GGMLQuantizationType, qtype) if blocks_fit else gguf.GGMLQuantizationType.F16)
    got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
    assert np.abs(got - w).max() <= tol * np.abs(w).max()
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32  # vectors stay f32
    emb = tensors["token_embd.weight"]
    assert emb.tensor_type == getattr(gguf.GGMLQuantizationType, qtype)  # 32 columns: Q8_0 blocks fit


def test_gguf_carries_chat_template_license_and_base_model(tmp_path):
    from transformers import AutoTokenizer

    model = tiny_model("llama", vocab_size=320, intermediate_size=64)
    source = tmp_path / "source"
    model.save_pretrained(source)
    (source / "README.md").write_text("---\nlicense: apache-2.0\nbase_model: org/base-model\n---\n")
    tok = train_tokenizer(["the quick brown fox jumps over the lazy dog"] * 20, vocab=300)
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    out = save_pruned(construct_subnet(model, discover_groups(model)), tmp_path / "export", tokenizer=tok,
                      source=str(source))
    assert AutoTokenizer.from_pretrained(out).chat_template == tok.chat_template
    fields, _ = _read(export_gguf(out, tmp_path / "m.gguf"))
    assert fields["tokenizer.chat_template"] == tok.chat_template
    assert fields["general.license"] == "apache-2.0"
    assert fields["general.base_model.count"] == 1 and fields["general.base_model.0.name"] == "base-model"
    assert fields["general.base_model.0.organization"] == "org"
    assert fields["general.base_model.0.repo_url"] == "https://huggingface.co/org/base-model"
