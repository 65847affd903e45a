"""`hf-oto oneshot`: one-shot pruning from the command line, with prune's checks, export, card and recipe."""

from __future__ import annotations

import json

import pytest
import torch
from jobs import hfoto, no_pad_tokenizer, ran, refused, word_corpus
from tiny import tiny_model

from hf_oto.manifest import Manifest


@pytest.fixture()
def base(tmp_path):
    folder = tmp_path / "base"
    tiny_model("llama", num_hidden_layers=2, intermediate_size=64, vocab_size=64).save_pretrained(folder)
    no_pad_tokenizer(folder)
    return folder


def test_oneshot_cli_exports_a_checked_model_with_card_and_recipe_and_reruns_it(tmp_path, base, capsys):
    from huggingface_hub import ModelCard
    from safetensors.torch import load_file

    corpus = word_corpus(tmp_path / "calib.txt", 400)
    out = tmp_path / "oneshot"
    proc = hfoto("oneshot", base, "--criterion", "wanda_sp", "--target_sparsity", "0.3", "--calibration", corpus,
                 "--out", out, "--block_size", "16", "--calibration_batches", "4", "--ffn_multiple", "1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "export reloaded without hf_oto" in proc.stdout and "calibration" in proc.stdout
    manifest = json.loads((out / "pruning_manifest.json").read_text())
    assert manifest["oneshot"]["criterion"] == "wanda_sp" and manifest["oneshot"]["calibration_batches"] == 4
    assert abs(manifest["oneshot"]["pruned_fraction"] - 0.3) <= 0.01  # the planner meets the target within 1%
    card = ModelCard.load(out / "README.md")
    assert "One-shot `wanda_sp` pruning on 4 calibration batches" in card.text
    again = tmp_path / "again"
    ran(capsys, "oneshot", "--recipe", out / "hf_oto_recipe.yaml", "--out", again, "--no_verify_export")
    a, b = load_file(out / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "rerun it with hf-oto oneshot --recipe" in refused(capsys, "prune", "--recipe", out / "hf_oto_recipe.yaml")


@pytest.mark.parametrize("args, message", [
    (["--criterion", "random", "--target_sparsity", "0.3"], "criterion must be one of"),
    (["--target_sparsity", "0.3"], "give --out DIR"),
    (["--target_sparsity", "0.999"], "cannot be reached"),
    (["--criterion", "block_influence", "--target_sparsity", "0.3"], "add --pruning_granularity depth"),
    ([], "give a model and a target"),
])
def test_oneshot_bad_input_is_one_line_before_any_work(tmp_path, base, capsys, monkeypatch, args, message):
    corpus = word_corpus(tmp_path / "calib.txt", 50)
    out = [] if message == "give --out DIR" else ["--out", tmp_path / "o"]
    monkeypatch.chdir(tmp_path)
    assert message in refused(capsys, "oneshot", base, *args, "--calibration", corpus, *out, "--block_size", "16")
    assert not (tmp_path / "o").exists()


def test_oneshot_layer_removal_by_block_influence_exports_fewer_layers(tmp_path, capsys, monkeypatch):
    """ShortGPT from the command line: whole layers ranked by block influence, a stock export with fewer layers."""
    folder = tmp_path / "deep"
    tiny_model("llama", num_hidden_layers=4, intermediate_size=64, vocab_size=64).save_pretrained(folder)
    no_pad_tokenizer(folder)
    corpus = word_corpus(tmp_path / "calib.txt", 200)
    out = tmp_path / "short"
    monkeypatch.chdir(tmp_path)
    ran(capsys, "oneshot", folder, "--criterion", "block_influence", "--pruning_granularity", "depth",
        "--target_sparsity", "0.5", "--calibration", corpus, "--out", out, "--block_size", "16",
        "--calibration_batches", "2", "--no_verify_export")
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and "auto_map" not in config
    manifest = json.loads((out / "pruning_manifest.json").read_text())
    assert manifest["oneshot"]["granularity"] == "depth"
    assert manifest["oneshot"]["pruned_fraction"] == 0.5


def test_oneshot_expert_removal_by_routing_exports_fewer_experts(tmp_path, capsys, monkeypatch):
    """Whole experts from the command line: ranked by the gate weight they receive, a stock export with
    fewer experts (tests/test_experts.py reloads such exports without hf_oto)."""
    folder = tmp_path / "moe"
    tiny_model("qwen3_moe", num_experts=8, vocab_size=64).save_pretrained(folder)
    no_pad_tokenizer(folder)
    corpus = word_corpus(tmp_path / "calib.txt", 200)
    out = tmp_path / "fewer"
    monkeypatch.chdir(tmp_path)
    printed = ran(capsys, "oneshot", folder, "--criterion", "routing", "--prune_experts", "--target_sparsity", "0.3",
                  "--calibration", corpus, "--out", out, "--block_size", "16", "--calibration_batches", "2",
                  "--no_verify_export")
    assert "prunable parameters removed" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["num_local_experts"] < 8 and "auto_map" not in config
    manifest = json.loads((out / "pruning_manifest.json").read_text())
    assert manifest["oneshot"]["criterion"] == "routing" and manifest["oneshot"]["experts"] is True
    wrong = refused(capsys, "oneshot", folder, "--criterion", "routing", "--target_sparsity", "0.3",
                    "--calibration", corpus, "--out", tmp_path / "no")
    assert "add --prune_experts" in wrong


def test_oneshot_calibration_draws_the_models_own_samples_at_the_replay_fraction(tmp_path, base, monkeypatch):
    import hf_oto.optim.oneshot
    import hf_oto.replay
    from hf_oto.job.oneshot_job import oneshot_settings, run_oneshot

    made, calib = [], []
    generate, scores = hf_oto.replay.generate_replay, hf_oto.optim.oneshot.oneshot_scores
    monkeypatch.setattr(hf_oto.replay, "generate_replay", lambda *a, **k: made.append(generate(*a, **k)) or made[-1])
    monkeypatch.setattr(hf_oto.optim.oneshot, "oneshot_scores",
                        lambda model, space, criterion, batches: calib.extend(batches) or scores(model, space,
                                                                                                  criterion, batches))
    corpus = word_corpus(tmp_path / "calib.txt", 400)
    out = tmp_path / "oneshot"
    run_oneshot(oneshot_settings(str(base), "wanda_sp", 0.3, str(corpus), str(out), {
        "block_size": 16, "calibration_batches": 4, "ffn_multiple": 1, "replay_fraction": 0.5, "verify_export": False}))
    assert len(made) == 1 and made[0].shape == (8, 16)  # 4 batches x 4 sequences x 0.5
    rows = torch.cat([b["input_ids"] for b in calib])
    replayed = (rows[:, None, :] == made[0][None]).all(-1).any(-1)
    assert 0 < int(replayed.sum()) < len(rows)  # calibration mixes both
    assert "replay_fraction: 0.5" in (out / "hf_oto_recipe.yaml").read_text()  # a rerun replays too
    assert Manifest.read(out).replay_fraction == 0.5
    assert "50% of the calibration blocks were text the source model sampled itself" in (out / "README.md").read_text()
