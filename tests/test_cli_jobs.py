"""`hf-oto prune` as users run it: no data loss, real resume, every Trainer mode. In a subprocess where the
process matters (a SIGKILL and the resume after it, a refusal as the user's shell sees it); in this one where
it does not."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from jobs import QUICKSTART, SMALL, hfoto, no_pad_tokenizer, refused, user_error, word_corpus
from safetensors.torch import load_file

from hf_oto.job.prune_job import run


def test_existing_pruned_output_dir_is_refused_with_its_files_intact(tmp_path):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "notes.txt").write_text("precious")
    proc = hfoto("prune", QUICKSTART, *SMALL, "--output_dir", tmp_path / "run", "--pruned_output_dir", keep,
                 cwd=tmp_path)
    assert "is not empty" in user_error(proc) and "overwrite_pruned_output_dir" in proc.stderr
    assert [p.name for p in keep.iterdir()] == ["notes.txt"] and (keep / "notes.txt").read_text() == "precious"
    assert not (tmp_path / "run").exists()  # refused before anything was written


SAVE = ["--save_strategy", "steps", "--save_steps", "4"]


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """The output_dir of a run SIGKILLed right after checkpoint-4 was written (tests copy it)."""
    where = tmp_path_factory.mktemp("killed")
    proc = hfoto("prune", QUICKSTART, *SMALL, *SAVE, "--output_dir", where / "run", cwd=where, kill_at=4)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert (where / "run" / "checkpoint-4").is_dir() and not (where / "run" / "pruned").exists()
    return where / "run"


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, killed, capsys, monkeypatch):
    save = SAVE
    straight = hfoto("prune", QUICKSTART, *SMALL, *save, "--output_dir", tmp_path / "a", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]

    shutil.copytree(killed, tmp_path / "b")  # copy2: the files keep their times
    checkpoint = tmp_path / "b" / "checkpoint-4"
    written = {p.name: p.stat().st_mtime_ns for p in checkpoint.iterdir()}

    # A fresh run into the same output_dir would overwrite that checkpoint: refused.
    monkeypatch.chdir(tmp_path)
    again = refused(capsys, "prune", QUICKSTART, *SMALL, *save, "--output_dir", tmp_path / "b")
    assert "already holds checkpoints" in again
    resumed = hfoto("prune", QUICKSTART, *SMALL, *save, "--output_dir", tmp_path / "b",
                    "--resume_from_checkpoint", "true", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # It continued at step 5: checkpoint-4 was not written again, checkpoint-8 ends the run.
    assert {p.name: p.stat().st_mtime_ns for p in checkpoint.iterdir()} == written
    state = json.loads((tmp_path / "b" / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["global_step"] == 8
    a = load_file(tmp_path / "a" / "pruned" / "model.safetensors")
    b = load_file(tmp_path / "b" / "pruned" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("value, message", [
    ("does/not/exist", "checkpoint does/not/exist does not exist"),
    ("true", "holds no checkpoint-N folder"),
])
def test_resume_from_a_missing_checkpoint_is_refused(tmp_path, capsys, monkeypatch, value, message):
    monkeypatch.chdir(tmp_path)
    line = refused(capsys, "prune", QUICKSTART, *SMALL, "--output_dir", tmp_path / "run",
                   "--resume_from_checkpoint", value)
    assert message in line


def test_resume_with_changed_pruning_settings_is_refused_up_front(tmp_path, killed, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = refused(capsys, "prune", QUICKSTART, *SMALL, *SAVE, "--output_dir", killed, "--resume_from_checkpoint",
                   "true", "--target_sparsity", "0.3")
    assert "other pruning settings" in line and "target_sparsity: 0.5 -> 0.3" in line


def test_tokenizer_without_pad_token_trains_with_yaml_scientific_notation(tmp_path):
    tok = no_pad_tokenizer(tmp_path / "tok")
    corpus = word_corpus(tmp_path / "words.txt", 300)
    config = tmp_path / "job.yaml"
    # `1e-3` is a string to YAML 1.1 (no dot): the job must read it as the number it is.
    config.write_text(f"learning_rate: 1e-3\nweight_decay: 1e-2\n{open(QUICKSTART).read()}".replace(
        "learning_rate: 0.002\n", "").replace("weight_decay: 0.01\n", ""))
    summary = run(str(config), [str(a) for a in (*SMALL, "--train_tokenizer_vocab", "0", "--tokenizer_name", tok,
                                                 "--text_source", "null", "--train_files", corpus,
                                                 "--output_dir", tmp_path / "run")])
    assert math.isfinite(summary.ppl_trained_pruned)
    args = json.loads((tmp_path / "run" / "pruned" / "pruning_manifest.json").read_text())
    assert args["params_after"] < args["params_before"]


def test_training_by_epochs(tmp_path):
    corpus = word_corpus(tmp_path / "words.txt", 120)
    run(QUICKSTART, [str(a) for a in (*SMALL, "--max_steps", "-1", "--num_train_epochs", "2", "--train_tokenizer_vocab",
                                      "0", "--tokenizer_name", no_pad_tokenizer(tmp_path / "tok"), "--text_source",
                                      "null", "--train_files", f"[{corpus}]", "--output_dir", tmp_path / "run")])
    manifest = json.loads((tmp_path / "run" / "pruned" / "pruning_manifest.json").read_text())
    steps = manifest["hesso"]["start_pruning_step"] + manifest["hesso"]["pruning_steps"]
    assert 0 < steps and manifest["params_after"] < manifest["params_before"]
