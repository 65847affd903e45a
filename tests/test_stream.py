"""streaming: true: the stream's first documents evaluate and are never trained on; the job runs on a stream."""

from __future__ import annotations

import json
import math

import pytest
from jobs import ROOT, no_pad_tokenizer
from tiny import tiny_model

from hf_oto.data import DataArguments
from hf_oto.errors import ConfigError


def _stream_file(path, docs=30, words=40):
    # document i repeats the word w<i>: every token tells which document it came from
    path.write_text("\n".join(json.dumps({"text": " ".join([f"w{i}"] * words)}) for i in range(docs)))
    return path


def test_stream_holds_out_its_first_documents_and_trains_on_the_rest(tmp_path):
    from transformers import AutoTokenizer

    from hf_oto.stream import stream_train_eval

    no_pad_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    d = DataArguments(train_files=[str(_stream_file(tmp_path / "d.jsonl"))], streaming=True, block_size=16,
                      max_eval_blocks=5)
    train, held = stream_train_eval(d, tok, seed=0)
    assert held.shape == (5, 16)
    held_docs = {int(t) for t in held.flatten() if int(t) < 30}  # word ids are the document numbers
    trained = {int(t) for b in train for t in b["input_ids"] if int(t) < 30}
    assert held_docs and trained and not (held_docs & trained)
    assert held_docs | trained == set(range(30))


@pytest.mark.parametrize("settings, message", [
    (dict(text_source="python-stdlib", streaming=True), "streaming reads a Hub dataset"),
    (dict(dataset_name="x/y", streaming=True, train_tokenizer_vocab=512), "cannot train a tokenizer"),
])
def test_streaming_settings_that_cannot_work_are_refused(settings, message):
    from hf_oto.stream import check_streaming

    with pytest.raises(ConfigError, match=message):
        check_streaming(DataArguments(**settings), max_steps=10)
    with pytest.raises(ConfigError, match="needs max_steps"):
        check_streaming(DataArguments(dataset_name="x/y", streaming=True), max_steps=-1)


def test_main_job_trains_and_exports_from_a_stream(tmp_path):
    from hf_oto.job.prune_job import run

    base = tmp_path / "base"
    tiny_model("llama", num_hidden_layers=2, intermediate_size=64, vocab_size=64).save_pretrained(base)
    no_pad_tokenizer(base)
    summary = run(str(ROOT / "configs" / "quickstart.yaml"), [
        "--init_config", "null", "--text_source", "null", "--train_tokenizer_vocab", "0",
        "--model_name_or_path", str(base), "--train_files", str(_stream_file(tmp_path / "d.jsonl", docs=200)),
        "--streaming", "--max_steps", "6", "--block_size", "16", "--per_device_train_batch_size", "4",
        "--max_eval_blocks", "8", "--pruning_periods", "2", "--logging_steps", "3",
        "--output_dir", str(tmp_path / "run"), "--pruned_output_dir", str(tmp_path / "pruned"), "--no_verify_export"])
    assert summary.params_after < summary.params_before and math.isfinite(summary.ppl_trained_pruned)
