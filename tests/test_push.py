"""push_pruned: exactly which files and metadata an upload would send (recorded, no network)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from tiny import tiny_model

from hf_oto import ExportError, construct_subnet, discover_groups, save_pruned, zero_groups
from hf_oto.hub import push_pruned


class RecordingApi:
    """Stands in for huggingface_hub.HfApi: records what would go to the Hub."""

    def __init__(self):
        self.calls = []

    def create_repo(self, **kw):
        self.calls.append(("create_repo", kw))

    def upload_folder(self, **kw):
        files = sorted(p.name for p in Path(kw["folder_path"]).iterdir() if not p.name.startswith("."))
        self.calls.append(("upload_folder", dict(kw, files=files)))
        return type("Info", (), {"commit_url": f"https://hub.example/{kw['repo_id']}/commit/1"})()


@pytest.fixture
def export(tmp_path):
    model = tiny_model("llama")
    space = discover_groups(model)
    zero_groups(model, space, [g.name for g in space if g.kind == "ffn_channel" and g.name.endswith("3")])
    return save_pruned(construct_subnet(model, space, layout="uniform"), tmp_path / "out", source="org/base-model")


def test_push_sends_the_export_and_card_metadata(export):
    api = RecordingApi()
    url = push_pruned(export, "me/pruned-llama", private=True, api=api)
    assert url.endswith("/commit/1")
    (name1, create), (name2, upload) = api.calls
    assert name1 == "create_repo" and create == {"repo_id": "me/pruned-llama", "private": True, "exist_ok": True,
                                                 "repo_type": "model"}
    assert name2 == "upload_folder" and upload["repo_id"] == "me/pruned-llama"
    assert upload["files"] == ["README.md", "config.json", "generation_config.json", "model.safetensors",
                               "pruning_manifest.json", "pruning_plot.png"]
    assert "parameters" in upload["commit_message"]
    card = (export / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == "org/base-model" and "hf-oto" in meta["tags"]


def test_push_refuses_bad_input_before_any_call(export, tmp_path):
    api = RecordingApi()
    with pytest.raises(ExportError, match="invalid repo id"):
        push_pruned(export, "not a repo id!", api=api)
    with pytest.raises(ExportError, match="not an hf-oto export"):
        push_pruned(tmp_path, "me/x", api=api)
    (export / "extra.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ExportError, match="pickle"):
        push_pruned(export, "me/x", api=api)
    assert api.calls == []


def _copy(export, tmp_path, name):
    import shutil

    return Path(shutil.copytree(export, tmp_path / name))


def test_push_refuses_broken_exports_before_any_call(export, tmp_path, capsys):
    api = RecordingApi()
    cut = _copy(export, tmp_path, "cut")
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ExportError, match="not a whole safetensors file: truncated"):
        push_pruned(cut, "me/x", api=api)
    garbage = _copy(export, tmp_path, "garbage")
    (garbage / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ExportError, match="not a whole safetensors file"):
        push_pruned(garbage, "me/x", api=api)
    empty_config = _copy(export, tmp_path, "empty-config")
    (empty_config / "config.json").write_text("{}")
    with pytest.raises(ExportError, match="does not load with AutoConfig"):
        push_pruned(empty_config, "me/x", api=api)
    bad_manifest = _copy(export, tmp_path, "bad-manifest")
    (bad_manifest / "pruning_manifest.json").write_text('{"params_before": 1,')
    with pytest.raises(ExportError, match="pruning_manifest.json is corrupt"):
        push_pruned(bad_manifest, "me/x", api=api)
    assert api.calls == []
    # through the CLI: one line, exit code 2, no traceback
    from hf_oto.cli import main

    capsys.readouterr()
    assert main(["push", str(bad_manifest), "me/x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pruning_manifest.json is corrupt" in err[0]


def test_pushed_card_never_names_a_local_path(tmp_path):
    model = tiny_model("llama")
    space = discover_groups(model)
    zero_groups(model, space, [space[0].name])
    out = save_pruned(construct_subnet(model, space, layout="uniform"), tmp_path / "out", source=str(tmp_path))
    meta = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert "base_model" not in meta
    assert json.loads((out / "pruning_manifest.json").read_text())["source"] == str(tmp_path)  # kept, for provenance


def test_push_checks_a_decilm_export_without_running_its_code(tmp_path):
    """A DeciLM export's config class is its own remote code: push checks the file is there, never runs it."""
    model = tiny_model("llama")
    space = discover_groups(model)
    zero_groups(model, space, [g.name for g in space if g.kind == "ffn_channel" and g.layer == 0])
    out = save_pruned(construct_subnet(model, space, layout="per_layer_ffn"), tmp_path / "deci")
    assert json.loads((out / "config.json").read_text())["model_type"] == "nemotron-nas"
    api = RecordingApi()
    push_pruned(out, "me/deci", api=api)
    assert "modeling_hfoto.py" in api.calls[1][1]["files"]
    (out / "modeling_hfoto.py").unlink()
    with pytest.raises(ExportError, match="modeling_hfoto.py"):
        push_pruned(out, "me/deci", api=RecordingApi())
