"""Bad input to `hf-oto prune` / `inspect`: one line, exit code 2, before any data is read or model loaded."""

from __future__ import annotations

import json

import pytest
from jobs import QUICKSTART, SMALL, refused
from transformers import LlamaConfig, LlamaForCausalLM

import hf_oto.job.prune_job as job
from hf_oto.cli import main
from hf_oto.errors import ConfigError
from hf_oto.job.args import parse


@pytest.fixture
def no_work(monkeypatch):
    """Fail loudly if the job reads data or loads a tokenizer or model."""
    def forbidden(*a, **k):
        raise AssertionError("data, a tokenizer or a model was loaded before the input was checked")

    for name in ("load_documents", "load_model", "load_tokenizer"):
        monkeypatch.setattr(job, name, forbidden)


def _refused(capsys, argv) -> str:
    return refused(capsys, *argv)


def _model_dir(path):
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(path)
    return path


def _prune(tmp_path, *extra):
    return ["prune", QUICKSTART, *SMALL, "--output_dir", str(tmp_path / "run"), *map(str, extra)]


def _source(tmp_path, folder):
    return _prune(tmp_path, "--init_config", "null", "--model_name_or_path", folder)


def _folder(path, files: dict[str, str]):
    path.mkdir()
    for name, text in files.items():
        (path / name).write_text(text)
    return path


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "no" / "such" / "model", "does not exist"),
    (lambda p: _folder(p / "empty", {}), "has no config.json"),
    (lambda p: _folder(p / "bad", {"config.json": '{"model_type": "llama",'}), "config.json is not valid JSON"),
    (lambda p: _folder(p / "untyped", {"config.json": "{}"}), "has no model_type"),
    (lambda p: _folder(p / "d", {"f.txt": "x"}) / "f.txt", "is a file, not a model folder"),
])
def test_bad_model_source(tmp_path, capsys, no_work, make, message):
    assert message in _refused(capsys, _source(tmp_path, make(tmp_path)))


def test_truncated_weights_are_refused_before_any_work(tmp_path, capsys, no_work):
    folder = _model_dir(tmp_path / "model")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    assert "not a whole safetensors file: truncated" in _refused(capsys, _source(tmp_path, folder))


@pytest.mark.parametrize("content, name, message", [
    ("", "empty.txt", "is empty or holds only whitespace"),
    ("\n\n   \n\t\n", "blank.txt", "is empty or holds only whitespace"),
    ('{"content": "hello"}\n{"content": "world"}\n', "rows.jsonl", "has no 'text' field (fields: content)"),
    ("some text", "notes.csv", "unknown type '.csv'"),
])
def test_bad_train_files(tmp_path, capsys, no_work, content, name, message):
    (tmp_path / name).write_text(content)
    argv = _prune(tmp_path, "--text_source", "null", "--train_files", f"[{tmp_path / name}]")
    assert message in _refused(capsys, argv)


def test_missing_train_file_and_two_sources(tmp_path, capsys, no_work):
    assert "not found" in _refused(capsys, _prune(tmp_path, "--text_source", "null", "--train_files", "nope.txt"))
    (tmp_path / "a.txt").write_text("text")
    both = _prune(tmp_path, "--train_files", tmp_path / "a.txt")  # quickstart also sets text_source
    assert "give one of dataset_name, train_files and text_source, not train_files and text_source" in \
        _refused(capsys, both)


@pytest.mark.parametrize("text, message", [
    ("max_steps: 10\nlearning_rate: [1e-3\n", ":3:1: invalid YAML"),
    ("- a\n- b\n", "the top level must be a mapping"),
    ("target_sparsity: half\n", "target_sparsity: expected a number, got 'half'"),
    ("learning_rte: 0.1\n", "unknown setting 'learning_rte' (did you mean 'learning_rate'?)"),
    ("lora_r: 4.5\n", "lora_r: expected an integer, got 4.5"),
    ("merge_adapters: maybe\n", "merge_adapters: expected true or false"),
])
def test_bad_yaml(tmp_path, capsys, no_work, text, message):
    config = tmp_path / "job.yaml"
    config.write_text(text)
    line = _refused(capsys, ["prune", str(config)])
    assert message in line
    if "invalid YAML" in message:
        assert str(config) in line


def test_bad_override_type(tmp_path, capsys, no_work):
    assert "max_steps: expected an integer, got 'forty'" in _refused(capsys, _prune(tmp_path, "--max_steps", "forty"))


@pytest.mark.parametrize("where, message", [
    ("file", "is a file; give a folder"),
    ("source", "would overwrite the source model"),
    ("inside-source", "would overwrite the source model"),
    ("output_dir", "would replace output_dir"),
    ("parent-of-output", "would replace output_dir"),  # output_dir is tmp/outer/run here
    ("checkpoint", "inside a checkpoint folder"),
])
def test_export_targets_that_would_destroy_something(tmp_path, capsys, no_work, where, message):
    source = _model_dir(tmp_path / "model")
    (tmp_path / "a-file").write_text("keep")
    target = {"file": tmp_path / "a-file", "source": source, "inside-source": source / "pruned",
              "output_dir": tmp_path / "run", "parent-of-output": tmp_path / "outer",
              "checkpoint": tmp_path / "run" / "checkpoint-10" / "pruned"}[where]
    argv = _source(tmp_path, source) + ["--pruned_output_dir", str(target), "--train_tokenizer_vocab", "64"]
    if where == "parent-of-output":
        argv += ["--output_dir", str(tmp_path / "outer" / "run")]
    assert message in _refused(capsys, argv)
    assert (tmp_path / "a-file").read_text() == "keep" and (source / "model.safetensors").is_file()


def test_overwrite_replaces_only_an_earlier_export(tmp_path, capsys, no_work):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "data.txt").write_text("mine")
    argv = _prune(tmp_path, "--pruned_output_dir", folder, "--overwrite_pruned_output_dir", "true")
    assert "holds no earlier hf-oto export" in _refused(capsys, argv)
    assert (folder / "data.txt").read_text() == "mine"


def test_output_dir_that_is_a_file(tmp_path, capsys, no_work):
    (tmp_path / "out").write_text("x")
    assert "is a file" in _refused(capsys, ["prune", QUICKSTART, *SMALL, "--output_dir", str(tmp_path / "out")])


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="max_steps"):
        main(["--debug", "prune", QUICKSTART, "--max_steps", "forty"])
    monkeypatch.setenv("HF_OTO_DEBUG", "1")
    with pytest.raises(ConfigError, match="max_steps"):
        main(["prune", QUICKSTART, "--max_steps", "forty"])


def test_prune_help_lists_every_setting(capsys):
    assert main(["prune", "--help"]) == 0
    out = capsys.readouterr().out
    for name in ("--model_name_or_path", "--train_files", "--text_column", "--learning_rate", "--target_sparsity",
                 "--overwrite_pruned_output_dir", "--resume_from_checkpoint"):
        assert name in out


@pytest.mark.parametrize("target, message", [
    ("folder", "has no config.json"),
    ("words.txt", "is not a model folder or a config.json"),
    ("missing", "does not exist"),
])
def test_inspect_on_things_that_are_not_models(tmp_path, capsys, target, message):
    (tmp_path / "folder").mkdir()
    (tmp_path / "words.txt").write_text("hello")
    assert message in _refused(capsys, ["inspect", str(tmp_path / target)])


def test_yaml_values_get_their_field_types(tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text("learning_rate: 1e-3\nwarmup_steps: '20'\nuse_cpu: 'true'\ntrain_files: data.txt\n"
                      "text_source: null\ntext_column: content\noutput_dir: somewhere\n")
    margs, dargs, targs = parse(str(config), ["--weight_decay", "1e-2", "--max_steps", "12"])
    assert targs.learning_rate == 1e-3 and isinstance(targs.learning_rate, float)
    assert targs.weight_decay == 0.01 and targs.warmup_steps == 20 and targs.use_cpu is True
    assert dargs.train_files == ["data.txt"] and dargs.text_column == "content" and targs.max_steps == 12
    # the export folder follows output_dir unless set
    assert targs.pruned_dir() == "somewhere/pruned"
    assert "pruned_output_dir" not in open(QUICKSTART).read()


def test_quickstart_settings_are_typed():
    margs, dargs, targs = parse(QUICKSTART, [])
    assert json.loads(json.dumps(targs.pruning_settings())) == targs.pruning_settings()
    assert isinstance(targs.learning_rate, float) and isinstance(dargs.block_size, int)


@pytest.mark.parametrize("extra, message", [
    (["--export_format", "decilm"], "export_format 'decilm' needs pruning_layout: per_layer_ffn (got 'uniform')"),
    (["--export_format", "decilm", "--pruning_layout", "global"], "needs pruning_layout: per_layer_ffn"),
    (["--export_format", "gguf"], "export_format: expected one of"),
    (["--pruning_layout", "ffn"], "pruning_layout: expected one of"),
])
def test_export_format_the_model_cannot_take_is_refused_up_front(tmp_path, capsys, no_work, extra, message):
    assert message in _refused(capsys, _prune(tmp_path, *extra))


def test_tensorboard_without_the_package_is_one_line_before_any_work(tmp_path, monkeypatch):
    import importlib.util

    from hf_oto.job.preflight import check_trackers
    from hf_oto.trainer import HFOTOTrainingArguments

    args = HFOTOTrainingArguments(output_dir=str(tmp_path), report_to="none")
    args.report_to = ["tensorboard"]  # set after construction: building the arguments imports nothing here
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("tensorboard", "tensorboardX") else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'hf-oto\[tracking\]'"):
        check_trackers(args)
    args.report_to = []
    check_trackers(args)
