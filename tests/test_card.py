"""The model card: metadata carried from the source, FLOPs, evaluation, per-layer table and plot."""

from __future__ import annotations

import json

from tiny import tiny_model

from hf_oto import construct_subnet, discover_groups, save_pruned, zero_groups


def _small(source_dir, card_meta="license: apache-2.0\n"):
    model = tiny_model("llama", intermediate_size=64)
    model.save_pretrained(source_dir)
    (source_dir / "README.md").write_text(f"---\n{card_meta}---\n# a source model\n")
    model.config._name_or_path = str(source_dir)
    space = discover_groups(model)
    zero_groups(model, space, [g.name for g in space if g.kind == "ffn_channel" and int(g.name.rsplit(".", 1)[1]) < 32])
    return construct_subnet(model, space, layout="uniform")


def test_card_states_source_license_flops_eval_and_plot(tmp_path):
    small = _small(tmp_path / "source")
    out = save_pruned(small, tmp_path / "out", extra_manifest={"eval": {"eval_perplexity": 12.5}})
    card = (out / "README.md").read_text()
    head = card.split("---")[1]
    assert "license: apache-2.0" in head
    assert "base_model" not in head  # a local path is no Hub id (the Hub refuses it), and its card names none
    m = json.loads((out / "pruning_manifest.json").read_text())
    assert m["flops_per_token_after"] < m["flops_per_token_before"]
    # 32 of 64 FFN channels gone in 2 layers: 3 matrices of 32 x hidden each -> 2 FLOPs per weight
    assert m["flops_per_token_before"] - m["flops_per_token_after"] == 2 * 2 * 3 * 32 * small.model.config.hidden_size
    from hf_oto.export.card import format_flops

    assert f"| {format_flops(m['flops_per_token_before'])} | {format_flops(m['flops_per_token_after'])} |" in card
    assert format_flops(2.5e6) == "2.5 M" and format_flops(1.234e10) == "12.3 G"
    assert "| eval_perplexity | 12.5 |" in card
    assert "pruning_plot.png" in card
    png = (out / "pruning_plot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert "| 0 | `model.layers.0.mlp` | ffn_channel | 32 / 64 |" in card


def test_card_without_eval_or_license_says_so(tmp_path):
    model = tiny_model("llama")
    space = discover_groups(model)
    out = save_pruned(construct_subnet(model, space), tmp_path / "out")
    card = (out / "README.md").read_text()
    assert "No evaluation set was given" in card and "license:" not in card


def test_card_base_model_is_a_hub_id_never_a_local_path(tmp_path):
    """A local source's own card names its Hub base model: that id, not the folder, goes into the card."""
    small = _small(tmp_path / "source", card_meta="license: mit\nbase_model: org/original-model\n")
    out = save_pruned(small, tmp_path / "out")
    head = (out / "README.md").read_text().split("---")[1]
    assert "base_model: org/original-model" in head and str(tmp_path) not in head
    from hf_oto.export.save import hub_base_model

    assert hub_base_model("meta-llama/Llama-3.1-8B") == "meta-llama/Llama-3.1-8B"
    assert hub_base_model(str(tmp_path / "source")) == "org/original-model"
    (tmp_path / "no-card").mkdir()
    assert hub_base_model(str(tmp_path / "no-card")) is None  # a local folder whose card names no Hub base
    assert hub_base_model("./not/a hub id") is None


def test_template_values_with_braces_are_printed_as_they_are():
    from hf_oto.export.card import render_card
    from hf_oto.manifest import Manifest

    sets = [{"layer": 0, "module": "m.{x}", "kind": "ffn_channel", "kept": [0], "groups": 2}]
    manifest = Manifest.from_dict({"params_before": 10, "params_after": 5, "model_type": "llama", "layout": "uniform",
                                   "source": "org/{weird}-{{ model_type }}", "sets": sets,
                                   "eval": {"eval_loss_{a}": 1.5}, "license": "mit"})
    card = render_card(manifest)
    assert "**org/{weird}-{{ model_type }}**" in card  # not formatted, not re-rendered
    assert "| 0 | `m.{x}` | ffn_channel | 1 / 2 |" in card and "| eval_loss_{a} | 1.5 |" in card


def test_eval_results_reach_the_hub_metadata(tmp_path):
    from huggingface_hub import ModelCard

    small = _small(tmp_path / "source")
    out = save_pruned(small, tmp_path / "out", extra_manifest={"eval": {"eval_perplexity": 12.5,
                                                                        "eval_token_accuracy": 0.25}})
    data = ModelCard.load(out / "README.md").data
    metrics = {r.metric_type: r.metric_value for r in data.eval_results}
    assert metrics == {"perplexity": 12.5, "token_accuracy": 0.25}


def test_card_metadata_reads_back_with_the_hub_fields_users_filter_on(tmp_path):
    from huggingface_hub import ModelCard

    small = _small(tmp_path / "source", card_meta="license: mit\nbase_model: org/original-model\n")
    out = save_pruned(small, tmp_path / "out", extra_manifest={"datasets": ["org/some-dataset"]})
    data = ModelCard.load(out / "README.md").data.to_dict()
    assert data["pipeline_tag"] == "text-generation" and data["datasets"] == ["org/some-dataset"]
    assert data["base_model"] == "org/original-model" and data["base_model_relation"] == "finetune"
    bare = ModelCard.load(save_pruned(construct_subnet(tiny_model("llama"), discover_groups(tiny_model("llama"))),
                                      tmp_path / "bare") / "README.md").data.to_dict()
    assert "base_model_relation" not in bare and "datasets" not in bare  # no base, no Hub dataset: none named


def test_the_plots_leave_the_users_matplotlib_backend_and_figures_alone(tmp_path):
    """A notebook user's backend (and open pyplot figures) survive an export: the plots draw on their own
    Figure objects and never call ``matplotlib.use``."""
    import matplotlib

    from hf_oto.export.plot import plot_kept
    from hf_oto.export.quantized import _plot_bits
    from hf_oto.manifest import Manifest

    small = _small(tmp_path / "source")
    manifest = Manifest.read(save_pruned(small, tmp_path / "out"))
    before = matplotlib.get_backend()
    matplotlib.use("svg")  # stands in for a notebook's backend
    import matplotlib.pyplot as plt

    mine = plt.figure()  # the user's open figure
    try:
        plot_kept(manifest, tmp_path / "kept.png")
        _plot_bits([2, 4, 3], tmp_path / "bits.png")
        assert matplotlib.get_backend() == "svg"
        assert plt.get_fignums() == [mine.number] and plt.gcf() is mine
        for name in ("kept.png", "bits.png"):
            assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        plt.close(mine)
        matplotlib.use(before)
