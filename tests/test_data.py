"""The data module: documents keep their line breaks, are packed (not lines), and columns are configurable."""

from __future__ import annotations

import json

import pytest
import torch

from hf_oto.data import (
    DataArguments,
    calibration_batches,
    document_affixes,
    load_documents,
    split_blocks,
    tokenize_blocks,
    train_tokenizer,
)
from hf_oto.errors import DataError

CODE = "def f(x):\n    return x + 1\n\n\nclass A:\n    pass\n"
PROSE = "First paragraph, line one.\nLine two.\n\nSecond paragraph after a blank line.\n"


def _stream(docs, tokenizer) -> str:
    """Decode every token of every block back into text (nothing is dropped with block_size 1)."""
    blocks = tokenize_blocks(docs, tokenizer, block_size=1)
    return tokenizer.decode(blocks.flatten().tolist())


def test_text_files_keep_line_breaks_and_are_packed_as_documents(tmp_path):
    (tmp_path / "a.txt").write_text(CODE)
    (tmp_path / "b.txt").write_text(PROSE)
    docs = load_documents(DataArguments(train_files=[str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]))
    tok = train_tokenizer([CODE, PROSE], 300)
    eos = tok.eos_token
    # exactly the files' text, blank lines included, one EOS after each file (not after each line)
    assert _stream(docs, tok) == CODE + eos + PROSE + eos


def test_json_rows_are_documents_and_the_text_column_is_configurable(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"content": t, "id": i}) for i, t in enumerate([CODE, "", PROSE])))
    tok = train_tokenizer([CODE, PROSE], 300)
    docs = load_documents(DataArguments(train_files=[str(rows)], text_column="content"))
    assert _stream(docs, tok) == CODE + tok.eos_token + PROSE + tok.eos_token  # the empty row adds nothing
    with pytest.raises(DataError, match="no 'text' column"):
        load_documents(DataArguments(train_files=[str(rows)]))


def test_rows_that_are_lines_are_joined_as_they_are(tmp_path):
    rows = tmp_path / "lines.jsonl"
    lines = ["= Title =\n", "\n", "Some text here .\n", "More text .\n"]
    rows.write_text("\n".join(json.dumps({"text": t}) for t in lines))
    tok = train_tokenizer(lines, 300)
    docs = load_documents(DataArguments(train_files=[str(rows)], rows_are_documents=False))
    assert _stream(docs, tok) == "".join(lines) + tok.eos_token


def test_documents_get_the_tokenizers_own_leading_tokens():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, "[UNK]": 2, "a": 3, "b": 4}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="[UNK]")
    assert document_affixes(tok) == ([0], [1])  # BOS before each document, EOS after
    from datasets import Dataset

    docs = Dataset.from_dict({"text": ["a b", "b"], "first": [True, True], "last": [True, True]})
    assert tokenize_blocks(docs, tok, 1).flatten().tolist() == [0, 3, 4, 1, 0, 4, 1]


def test_too_little_text_is_one_clear_error():
    d = DataArguments(text_source="python-stdlib", block_size=64)
    with pytest.raises(DataError, match="at least 2 are needed"):
        split_blocks(torch.zeros(1, 64, dtype=torch.long), d, seed=0)
    train, held_out = split_blocks(torch.arange(40 * 64).view(40, 64), d, seed=0)
    assert len(train) == 38 and len(held_out) == 2


def test_stdlib_corpus_lists_modules_then_packages_and_never_site_packages(tmp_path):
    from hf_oto.data import stdlib_files

    for rel in ("b.py", "a.py", "pkg/z.py", "pkg/sub/y.py", "apkg/x.py", "site-packages/lib/w.py", "notes.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x = 1\n")
    names = [f.relative_to(tmp_path).as_posix() for f in stdlib_files(tmp_path)]
    assert names == ["a.py", "b.py", "apkg/x.py", "pkg/sub/y.py", "pkg/z.py"]


def test_a_larger_stdlib_corpus_extends_the_smaller_one():
    from hf_oto.data import stdlib_text

    small, large = stdlib_text(0.5), stdlib_text(6.0)
    assert len(large) > len(small) and large[:len(small)] == small
    assert sum(map(len, large)) >= 6.0 * 2**20  # more than the top-level modules alone hold


def _word_docs(n_docs: int, words: int = 60):
    """Documents whose words are unique to them (``d3w17``), so every token says which document it came from."""
    from datasets import Dataset

    texts = [" ".join(f"d{i}w{j}" for j in range(words)) for i in range(n_docs)]
    return Dataset.from_dict({"text": texts, "first": [True] * n_docs, "last": [True] * n_docs}), texts


def _doc_ids(blocks, tok) -> set[int]:
    import re

    return {int(m) for m in re.findall(r"\bd(\d+)w\d+\b", tok.decode(blocks.flatten().tolist()))}


def test_evaluation_holds_out_whole_documents_never_blocks_beside_training_ones():
    from hf_oto.data import train_eval_blocks

    docs, texts = _word_docs(20)
    tok = train_tokenizer(texts, 2000)
    d = DataArguments(text_source="python-stdlib", block_size=16, eval_fraction=0.2)
    train, held = train_eval_blocks(docs, tok, d, seed=0)
    train_docs, held_docs = _doc_ids(train, tok), _doc_ids(held, tok)
    assert held_docs and not (train_docs & held_docs)  # no document is split between the two
    assert 0.1 <= len(held) / (len(train) + len(held)) <= 0.35
    assert _doc_ids(train_eval_blocks(docs, tok, d, seed=1)[1], tok) != held_docs  # the seed draws them
    d.max_eval_blocks = 2
    assert len(train_eval_blocks(docs, tok, d, seed=0)[1]) == 2


def test_one_document_gives_its_last_tokens_as_one_span():
    from hf_oto.data import tokenize_rows, train_eval_blocks

    docs, texts = _word_docs(1, words=400)
    tok = train_tokenizer(texts, 2000)
    d = DataArguments(text_source="python-stdlib", block_size=8, eval_fraction=0.1)
    train, held = train_eval_blocks(docs, tok, d, seed=0)
    flat = torch.from_numpy(tokenize_rows(docs, tok)[0])
    start = len(flat) - max(int(len(flat) * 0.1), 8)
    assert torch.equal(held.flatten(), flat[start:start + held.numel()])  # contiguous, from the end
    assert torch.equal(train.flatten(), flat[:train.numel()])


def test_eval_files_evaluate_and_all_training_text_trains(tmp_path):
    from hf_oto.data import check_data_args, load_eval_documents, train_eval_blocks
    from hf_oto.errors import ConfigError

    docs, texts = _word_docs(6)
    tok = train_tokenizer(texts + ["other words here"], 2000)
    (tmp_path / "eval.txt").write_text("other words here " * 40)
    d = DataArguments(text_source="python-stdlib", block_size=8, eval_files=[str(tmp_path / "eval.txt")])
    check_data_args(d)
    train, held = train_eval_blocks(docs, tok, d, seed=0, eval_docs=load_eval_documents(d))
    assert _doc_ids(train, tok) == set(range(6)) and "other words here" in tok.decode(held[0].tolist())
    with pytest.raises(ConfigError, match="eval_split names a split of dataset_name"):
        check_data_args(DataArguments(text_source="python-stdlib", eval_split="validation"))
    with pytest.raises(ConfigError, match="eval file|train file"):
        check_data_args(DataArguments(text_source="python-stdlib", eval_files=[str(tmp_path / "missing.txt")]))
    with pytest.raises(DataError, match="at least one of each"):
        train_eval_blocks(_word_docs(2, words=2)[0], tok, DataArguments(text_source="python-stdlib", block_size=64),
                          seed=0)


def test_calibration_batches_are_seeded_draws_or_the_first_blocks():
    blocks = torch.arange(40).reshape(40, 1)  # block i holds the token i
    first = calibration_batches(blocks, 3, 4)
    assert [b["input_ids"].flatten().tolist() for b in first] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    drawn = calibration_batches(blocks, 3, 4, seed=5)
    ids = torch.cat([b["input_ids"] for b in drawn]).flatten().tolist()
    assert len(set(ids)) == 12 and ids != list(range(12))  # distinct blocks, not the first ones
    assert max(ids) >= 20  # spread over the text, not its beginning
    again = calibration_batches(blocks, 3, 4, seed=5)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(drawn, again, strict=True))
    other = torch.cat([b["input_ids"] for b in calibration_batches(blocks, 3, 4, seed=6)]).flatten().tolist()
    assert other != ids
    assert len(calibration_batches(blocks, 50, 4, seed=0)) == 10  # no more batches than the blocks fill
    few = calibration_batches(blocks[:3], 8, 4, seed=0)  # fewer blocks than one batch: one smaller batch
    assert len(few) == 1 and sorted(few[0]["input_ids"].flatten().tolist()) == [0, 1, 2]
