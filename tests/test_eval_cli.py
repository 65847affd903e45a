"""`hf-oto eval`: lm-evaluation-harness on a local task, strided perplexity, one-line errors; all offline."""

from __future__ import annotations

import json
import math

import pytest
import torch
from jobs import hfoto, user_error
from tiny import tiny_model

from hf_oto import construct_subnet, discover_groups, save_pruned
from hf_oto.data import train_tokenizer

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


def test_eval_cli_runs_a_local_lm_eval_task_and_perplexity_and_writes_json(export, tmp_path):
    pytest.importorskip("lm_eval")  # the eval extra, which setup.sh installs with the tests
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    rows = [{"question": f"the quick brown {w}", "choices": ["fox", "woods"], "answer": 0} for w in "abcd"]
    (tasks / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tasks / "hfoto_local.yaml").write_text(
        "task: hfoto_local\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tasks / 'data.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
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


@pytest.mark.parametrize("args, message", [
    ([], "give --tasks"),
    (["--perplexity", "not:a"], "NAME:CONFIG:SPLIT"),
    (["--tasks", "no_such_task_anywhere"], "unknown lm-eval task"),
    (["--perplexity", "python-stdlib", "--stride", "0"], "--stride must be in"),
])
def test_eval_bad_input_is_one_line(export, tmp_path, args, message):
    if "--tasks" in args:
        pytest.importorskip("lm_eval")
    assert message in user_error(hfoto("eval", export, *args, cwd=tmp_path))


def test_eval_of_a_folder_that_is_no_model_is_one_line(tmp_path):
    assert "not a model folder" in user_error(hfoto("eval", tmp_path, "--perplexity", "python-stdlib", cwd=tmp_path))
