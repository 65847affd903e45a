"""`hf-oto eval`: lm-evaluation-harness on a local task, strided perplexity, one-line errors; all offline."""

from __future__ import annotations

import json
import math

import pytest
import torch
from jobs import QUICKSTART, SMALL, hfoto, ran, refused
from tiny import tiny_model

from hf_oto import construct_subnet, discover_groups, save_pruned
from hf_oto.data import train_tokenizer
from hf_oto.errors import ConfigError

TEXT = "the quick brown fox jumps over the lazy dog and then runs far away into the woods . " * 30


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    tok = train_tokenizer([TEXT], vocab=300)
    model = tiny_model("llama", vocab_size=320, intermediate_size=64, max_position_embeddings=64)
    return save_pruned(construct_subnet(model, discover_groups(model)), root / "export", tokenizer=tok)


def test_strided_perplexity_scores_every_token_once_with_the_guides_windows(export, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_oto.job.evaluate_job import strided_perplexity

    model, tok = AutoModelForCausalLM.from_pretrained(export).eval(), AutoTokenizer.from_pretrained(export)
    ids = tok(TEXT, return_tensors="pt").input_ids
    got = strided_perplexity(model, tok, TEXT, max_length=32, stride=32)  # disjoint windows: checkable by hand
    nll, n = 0.0, 0
    with torch.no_grad():
        for b in range(0, ids.size(1), 32):
            w = ids[:, b:b + 32]
            if w.size(1) > 1:
                nll += float(model(input_ids=w, labels=w).loss) * (w.size(1) - 1)
                n += w.size(1) - 1
    assert got["tokens"] == n and got["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    overlapped = strided_perplexity(model, tok, TEXT, max_length=32, stride=8)
    assert overlapped["tokens"] == ids.size(1) - 1  # with overlap every token but the first is scored once


def local_task(folder):
    """A multiple-choice lm-eval task written as YAML + JSONL into ``folder`` (no Hub)."""
    tasks = folder / "tasks"
    tasks.mkdir()
    rows = [{"question": f"the quick brown {w}", "choices": ["fox", "woods"], "answer": 0} for w in "abcd"]
    (tasks / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tasks / "hfoto_local.yaml").write_text(
        "task: hfoto_local\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tasks / 'data.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
    return tasks


def test_eval_cli_runs_a_local_lm_eval_task_and_perplexity_and_writes_json(export, tmp_path):
    pytest.importorskip("lm_eval")  # the eval extra, which setup.sh installs with the tests
    tasks = local_task(tmp_path)
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    out = tmp_path / "results.json"
    proc = hfoto("eval", export, "--tasks", "hfoto_local", "--include_path", tasks, "--limit", "4",
                 "--perplexity", text, "--stride", "16", "--out", out, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "hfoto_local" in proc.stdout and "perplexity on" in proc.stdout
    report = json.loads(out.read_text())
    assert 0.0 <= report["lm_eval"]["results"]["hfoto_local"]["acc,none"] <= 1.0
    assert report["perplexity"]["perplexity"] > 1 and report["perplexity"]["stride"] == 16


def test_local_tasks_are_found_without_indexing_lm_evals_built_in_tasks(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    import lm_eval.tasks

    from hf_oto.job.evaluate_job import task_manager

    tasks = local_task(tmp_path)
    built: list[bool] = []
    real = lm_eval.tasks.TaskManager

    def spy(*a, include_defaults=True, **k):
        built.append(include_defaults)
        if include_defaults:  # the built-in index (16 s): its contents do not matter here
            return type("Index", (), {"all_tasks": ["hfoto_local", "arc_easy"], "all_subtasks": []})()
        return real(*a, include_defaults=False, **k)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", spy)
    local = task_manager(["hfoto_local"], str(tasks))
    assert built == [False] and local.all_tasks == ["hfoto_local"]
    assert "arc_easy" in task_manager(["hfoto_local", "arc_easy"], str(tasks)).all_tasks  # a built-in name too
    assert built == [False, False, True]
    with pytest.raises(ConfigError, match="unknown lm-eval task 'nope'"):
        task_manager(["nope"], str(tasks))


@pytest.mark.parametrize("args, message", [
    ([], "give --tasks"),
    (["--perplexity", "not:a"], "NAME:CONFIG:SPLIT"),
    (["--tasks", "no_such_task_anywhere"], "unknown lm-eval task"),
    (["--perplexity", "python-stdlib", "--stride", "0"], "--stride must be in"),
])
def test_eval_bad_input_is_one_line(export, tmp_path, capsys, args, message):
    if "--tasks" in args:
        pytest.importorskip("lm_eval")
    assert message in refused(capsys, "eval", export, *args)


def test_eval_of_a_folder_that_is_no_model_is_one_line(tmp_path, capsys):
    assert "not a model folder" in refused(capsys, "eval", tmp_path, "--perplexity", "python-stdlib")


def test_main_job_eval_tasks_land_in_the_summary_manifest_and_card_model_index(tmp_path, capsys, monkeypatch):
    pytest.importorskip("lm_eval")
    from huggingface_hub import ModelCard

    tasks, out = local_task(tmp_path), tmp_path / "pruned"
    monkeypatch.chdir(tmp_path)
    printed = ran(capsys, "prune", QUICKSTART, *SMALL, "--output_dir", tmp_path / "run", "--pruned_output_dir", out,
                  "--eval_tasks", "hfoto_local", "--eval_tasks_include_path", tasks, "--eval_tasks_limit", "4")
    assert "lm-eval hfoto_local acc" in printed  # the summary table
    scores = json.loads((out / "pruning_manifest.json").read_text())["lm_eval"]
    acc = scores["tasks"]["hfoto_local"]["acc"]
    assert 0.0 <= acc <= 1.0 and scores["limit"] == 4
    index = ModelCard.load(out / "README.md").data.eval_results
    ours = [r for r in index if r.dataset_type == "hfoto_local"]
    assert len(ours) == 1 and ours[0].metric_type == "acc" and ours[0].metric_value == pytest.approx(acc)
    assert any(r.metric_type == "perplexity" for r in index)  # the held-out perplexity stays beside it


@pytest.mark.parametrize("args, message", [
    (["--eval_tasks", "no_such_task_anywhere"], "unknown lm-eval task"),
    (["--eval_tasks_limit", "4"], "set eval_tasks too"),
    (["--eval_tasks", "hfoto_local", "--eval_tasks_include_path", "missing-folder"], "is not a folder"),
])
def test_main_job_bad_eval_tasks_are_one_line_before_training(tmp_path, capsys, monkeypatch, args, message):
    pytest.importorskip("lm_eval")
    monkeypatch.chdir(tmp_path)
    assert message in refused(capsys, "prune", QUICKSTART, *SMALL, "--output_dir", tmp_path / "run", *args)
    assert not (tmp_path / "run").exists()


def test_task_table_and_scores_read_lm_evals_metric_filter_keys():
    from hf_oto.job.evaluate_job import task_scores, task_table

    results = {"results": {"piqa": {"alias": "piqa", "sample_len": 8, "acc,none": 0.5, "acc_stderr,none": 0.1,
                                    "acc_norm,none": 0.25, "acc_norm_stderr,none": "N/A"}}, "n-shot": {"piqa": 0}}
    assert task_scores(results) == {"piqa": {"acc": 0.5, "acc_norm": 0.25}}  # no alias, sample_len or stderr
    table = task_table(results).splitlines()
    assert table[0] == "| task | n-shot | metric | value | stderr |"
    assert table[2:] == ["| piqa | 0 | acc | 0.5000 | 0.1000 |", "| piqa | 0 | acc_norm | 0.2500 | - |"]
