"""Starting from a GGUF file (`gguf_file`): where it is found, and a job whose export is a plain checkpoint."""

from __future__ import annotations

import json

import pytest
from jobs import QUICKSTART, SMALL, hfoto, refused

from hf_oto.errors import ConfigError
from hf_oto.job.gguf_source import resolve_gguf


def test_a_gguf_file_is_found_by_path_in_the_model_folder_or_in_an_installed_package(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "fake_gguf_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('resolving must not import the package')\n")
    (pkg / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert resolve_gguf(str(pkg / "m.gguf")).path == pkg / "m.gguf"
    assert resolve_gguf("m.gguf", str(pkg)).path == pkg / "m.gguf"
    found = resolve_gguf("fake_gguf_pkg/m.gguf")
    assert found.path == (pkg / "m.gguf").resolve() and found.given == "fake_gguf_pkg/m.gguf"
    with pytest.raises(ConfigError, match="not found.*installed"):
        resolve_gguf("fake_gguf_pkg/other.gguf")
    (pkg / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="not a .gguf file"):
        resolve_gguf("fake_gguf_pkg/notes.txt")


def test_prune_from_a_gguf_file_exports_a_plain_checkpoint_that_names_its_source(tmp_path):
    """A real GGUF file (written by hf-oto's own exporter from a small trained Llama) goes through
    `hf-oto prune --gguf_file`: the export has no quantization_config, reloads, and its card names the file."""
    from hf_oto.cli import main

    # the source (in this process): a small Llama pruned by the quickstart, written as GGUF
    assert main([str(a) for a in ("prune", QUICKSTART, *SMALL, "--output_dir", tmp_path / "r0", "--pruned_output_dir",
                                  tmp_path / "m", "--target_sparsity", "0.25")]) == 0
    assert main(["export-gguf", str(tmp_path / "m"), "--out", str(tmp_path / "src" / "small.gguf")]) == 0
    run = hfoto("prune", QUICKSTART, *SMALL, "--init_config", "null", "--train_tokenizer_vocab", "0",
                "--gguf_file", tmp_path / "src" / "small.gguf", "--output_dir", tmp_path / "r1",
                "--pruned_output_dir", tmp_path / "out", "--verify_export", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "export reloaded without hf_oto" in run.stdout
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    manifest = json.loads((tmp_path / "out" / "pruning_manifest.json").read_text())
    assert manifest["gguf"]["file"] == str(tmp_path / "src" / "small.gguf")
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"the GGUF file **{tmp_path / 'src' / 'small.gguf'}**" in card
    assert manifest["params_after"] < manifest["params_before"]


def test_a_missing_gguf_file_is_one_line_before_anything_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    missing = refused(capsys, "prune", QUICKSTART, *SMALL, "--init_config", "null", "--train_tokenizer_vocab", "0",
                      "--gguf_file", "no_such_package_xyz/model.gguf", "--output_dir", tmp_path / "r")
    assert "gguf_file no_such_package_xyz/model.gguf not found" in missing
    assert not (tmp_path / "r").exists()
    both = refused(capsys, "prune", QUICKSTART, *SMALL, "--gguf_file", tmp_path / "x.gguf",
                   "--output_dir", tmp_path / "r")
    assert "init_config builds a new model" in both

