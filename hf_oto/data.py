"""Training text for the main job: load documents, tokenize with ``datasets``, pack into equal blocks.

Documents are packed, not lines: a text file is one document whose line breaks are kept (as
run_clm's ``keep_linebreaks``), a JSON/JSONL row or a Hub dataset row is one document unless
``rows_are_documents`` is false (datasets such as wikitext store one line per row). Every document
gets the tokenizer's own leading special tokens and ends with EOS; the token stream is cut into
blocks of ``block_size``.
"""

from __future__ import annotations

import dataclasses
import json
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hf_oto.errors import ConfigError, DataError

TEXT_SOURCES = ("python-stdlib",)
JSON_SUFFIXES = (".json", ".jsonl")
TEXT_SUFFIXES = (".txt", ".text", ".md")


@dataclass
class DataArguments:
    """Where the training text comes from and how it becomes blocks of tokens."""

    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset id (downloads; needs network)"})
    dataset_config: str | None = field(default=None, metadata={"help": "the Hub dataset's configuration name"})
    train_files: list[str] | None = field(
        default=None, metadata={"help": "local .txt/.md (one document per file) or .json/.jsonl files"}
    )
    text_column: str = field(default="text", metadata={"help": "column of JSON files and Hub datasets with the text"})
    rows_are_documents: bool = field(
        default=True,
        metadata={"help": "each JSON/dataset row is a document ending in EOS; false joins rows as they are "
                          "(datasets with one line per row, e.g. wikitext)"},
    )
    text_source: str | None = field(
        default=None, metadata={"help": "'python-stdlib': the interpreter's own library sources (offline)"}
    )
    max_text_mb: float = field(default=4.0, metadata={"help": "cap on raw text read from text_source"})
    train_tokenizer_vocab: int = field(default=0, metadata={"help": "train a BPE tokenizer of this size"})
    block_size: int = field(default=128, metadata={"help": "tokens per training block"})
    dataset_split: str = field(default="train", metadata={"help": "the Hub dataset's split to train on"})
    eval_split: str | None = field(
        default=None, metadata={"help": "the Hub dataset's split to evaluate on (default: held-out documents)"}
    )
    eval_files: list[str] | None = field(
        default=None, metadata={"help": "local files to evaluate on, of the kinds train_files takes "
                                        "(default: held-out documents of the training text)"}
    )
    streaming: bool = field(
        default=False, metadata={"help": "read dataset_name (or JSON train_files) as a stream while training; "
                                         "needs max_steps"})
    stream_shuffle_buffer: int = field(default=1000, metadata={"help": "streaming: documents in the shuffle buffer"})
    eval_fraction: float = field(
        default=0.05, metadata={"help": "share of the training text held out for evaluation, as whole documents"}
    )
    max_eval_blocks: int = field(default=200, metadata={"help": "cap on held-out blocks"})
    eval_tasks: list[str] | None = field(
        default=None, metadata={"help": "lm-evaluation-harness tasks run on the export at the end (e.g. [arc_easy, "
                                        "piqa]; needs pip install 'hf-oto[eval]' and, for Hub tasks, the network); "
                                        "results go to the summary and the card's model-index"})
    eval_tasks_limit: float | None = field(
        default=None, metadata={"help": "eval_tasks: examples per task (a count, or a fraction below 1)"})
    eval_tasks_include_path: str | None = field(
        default=None, metadata={"help": "eval_tasks: a folder of local lm-eval task YAML files"})
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "processes for tokenization (datasets.map num_proc)"}
    )
    replay_fraction: float = field(
        default=0.0, metadata={"help": "share of the training draws that are text the dense model samples itself "
                                       "before training (keeps general ability the training text does not "
                                       "exercise; 0: none)"})
    replay_samples: int | None = field(
        default=None, metadata={"help": "replay: sequences generated (default: the run's share of draws with "
                                        "max_steps, else 256; repeated to reach replay_fraction)"})


# Checks before any data is read ------------------------------------------------------------------
def check_data_args(d: DataArguments) -> None:
    """Refuse data settings that cannot work, reading at most the first record of each file."""
    sources = [s for s in ("dataset_name", "train_files", "text_source") if getattr(d, s)]
    if not sources:
        raise ConfigError("give dataset_name, train_files or text_source")
    if len(sources) > 1:
        raise ConfigError(f"give one of dataset_name, train_files and text_source, not {' and '.join(sources)}")
    if d.text_source is not None and d.text_source not in TEXT_SOURCES:
        raise ConfigError(f"unknown text_source {d.text_source!r} (known: {', '.join(TEXT_SOURCES)})")
    if d.block_size < 2:
        raise ConfigError(f"block_size must be at least 2, got {d.block_size}")
    if not 0.0 < d.eval_fraction < 1.0:
        raise ConfigError(f"eval_fraction must be in (0, 1), got {d.eval_fraction}")
    if not 0.0 <= d.replay_fraction < 1.0:
        raise ConfigError(f"replay_fraction must be in [0, 1), got {d.replay_fraction}")
    if d.replay_samples is not None and d.replay_samples < 1:
        raise ConfigError(f"replay_samples must be at least 1, got {d.replay_samples}")
    if d.replay_fraction and d.streaming:
        raise ConfigError("replay_fraction mixes generated blocks into a tokenized training set; it does not work "
                          "with streaming")
    suffixes = set()
    for name in d.train_files or []:
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"train file {name} not found" + (" (it is a folder)" if path.is_dir() else ""))
        suffix = path.suffix.lower()
        if suffix not in TEXT_SUFFIXES + JSON_SUFFIXES:
            raise ConfigError(f"train file {name}: unknown type {suffix or '(no suffix)'!r}; use .txt, .md, .json "
                              "or .jsonl")
        suffixes.add("json" if suffix in JSON_SUFFIXES else "text")
        if not _has_text(path):
            raise DataError(f"train file {name} is empty or holds only whitespace")
        if suffix in JSON_SUFFIXES:
            _check_json_column(path, d.text_column)
    if len(suffixes) > 1:
        raise ConfigError("train_files mixes text and JSON files; give one kind")
    if d.eval_split and not d.dataset_name:
        raise ConfigError("eval_split names a split of dataset_name; for local evaluation text give eval_files")
    if d.eval_split and d.eval_files:
        raise ConfigError("give eval_split or eval_files, not both")
    if d.eval_files:
        check_data_args(DataArguments(train_files=d.eval_files, text_column=d.text_column, block_size=d.block_size))


def _has_text(path: Path, chunk: int = 1 << 20) -> bool:
    with open(path, encoding="utf-8", errors="replace") as f:
        while block := f.read(chunk):
            if block.strip():
                return True
    return False


def _check_json_column(path: Path, column: str) -> None:
    """The first record of a JSON Lines file (or a one-line JSON array) must hold ``column``."""
    with open(path, encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), "")
    try:
        record = json.loads(first)
    except json.JSONDecodeError:
        return  # pretty-printed JSON: datasets reads it, and load_documents checks the column
    if isinstance(record, list):
        record = record[0] if record else {}
    if not isinstance(record, dict):
        raise DataError(f"{path}: expected JSON objects with a {column!r} field, got {type(record).__name__}")
    if column not in record:
        raise DataError(f"{path} has no {column!r} field (fields: {', '.join(sorted(record)) or 'none'}); "
                        "set text_column")


# Loading ---------------------------------------------------------------------------------------
def stdlib_files(root: Path) -> Iterator[Path]:
    """The standard library's ``.py`` files: the top-level modules (sorted), then the packages' files
    (sorted by path), never ``site-packages`` (not even walked). The order is fixed, so a larger
    ``max_text_mb`` extends a smaller one's corpus instead of changing it; lazily, so a small corpus
    walks no package."""
    yield from sorted(root.glob("*.py"))
    # by "name/": the same order as sorting every file's relative path at once
    packages = sorted((d for d in root.iterdir() if d.is_dir() and d.name != "site-packages"),
                      key=lambda d: d.name + "/")
    for d in packages:
        files = (f for f in d.rglob("*.py") if "site-packages" not in f.relative_to(root).parts)
        yield from sorted(files, key=lambda f: f.relative_to(root).as_posix())


def stdlib_text(max_mb: float) -> list[str]:
    """Python source files of the running interpreter's standard library (:func:`stdlib_files`), up to
    ``max_mb``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, size = [], 0
    for f in stdlib_files(root):
        try:
            t = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(t)
        size += len(t)
        if size >= max_mb * 2**20:
            break
    return texts


def load_eval_documents(d: DataArguments):
    """The evaluation text named by ``eval_split`` or ``eval_files`` (as :func:`load_documents`), or None."""
    if d.eval_split:
        return load_documents(dataclasses.replace(d, dataset_split=d.eval_split))
    if d.eval_files:
        return load_documents(dataclasses.replace(d, train_files=d.eval_files, dataset_name=None, text_source=None))
    return None


def load_documents(d: DataArguments):
    """A ``datasets.Dataset`` with ``text`` and the flags ``first``/``last`` (a document starts/ends here)."""
    from datasets import Dataset, concatenate_datasets, load_dataset

    if d.text_source == "python-stdlib":
        texts = stdlib_text(d.max_text_mb)
        return Dataset.from_dict({"text": texts, "first": [True] * len(texts), "last": [True] * len(texts)})
    files = list(d.train_files or [])
    if files and Path(files[0]).suffix.lower() in TEXT_SUFFIXES:
        parts = []
        for name in files:  # one document per file, its lines kept with their line breaks
            lines = load_dataset("text", data_files=[name], split="train", keep_linebreaks=True)
            n = len(lines)
            parts.append(lines.map(lambda _, i, n=n: {"first": i == 0, "last": i == n - 1}, with_indices=True))
        return concatenate_datasets(parts)
    if files:
        ds = load_dataset("json", data_files=files, split="train")
        where = ", ".join(files)
    else:
        ds = load_dataset(d.dataset_name, d.dataset_config, split=d.dataset_split)
        where = d.dataset_name
    if d.text_column not in ds.column_names:
        raise DataError(f"{where} has no {d.text_column!r} column (columns: {', '.join(ds.column_names)}); "
                        "set text_column")
    ds = ds.select_columns([d.text_column])
    if d.text_column != "text":
        ds = ds.rename_column(d.text_column, "text")
    if d.rows_are_documents:
        ds = ds.filter(lambda b: [bool(t) for t in b["text"]], batched=True)
        return ds.map(lambda b: {"first": [True] * len(b["text"]), "last": [True] * len(b["text"])}, batched=True)
    n = len(ds)
    return ds.map(lambda _, i: {"first": i == 0, "last": i == n - 1}, with_indices=True)


# Tokenizing and packing ------------------------------------------------------------------------
def train_tokenizer(texts, vocab: int):
    """A byte-level BPE tokenizer of ``vocab`` tokens trained on ``texts`` (EOS doubles as pad)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def document_affixes(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text (e.g. BOS), with EOS ending the suffix."""
    probe = "a"
    full = tokenizer(probe)["input_ids"]
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    start = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), len(full))
    prefix, suffix = list(full[:start]), list(full[start + len(plain):])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in suffix:
        suffix.append(tokenizer.eos_token_id)
    return prefix, suffix


def tokenize_rows(docs, tokenizer, num_proc: int | None = None):
    """Every row of ``docs`` as token ids (documents framed by the tokenizer's affixes and EOS):
    (all ids in order as one int64 array, each row's token count)."""
    import numpy as np
    import pyarrow.compute as pc

    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no eos token to end documents with; set tokenizer.eos_token")
    prefix, suffix = document_affixes(tokenizer)

    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None

    def token_ids(texts: list[str]) -> list[list[int]]:
        if backend is not None:  # the Rust tokenizer directly: the same ids without building BatchEncodings
            return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
        return tokenizer(texts, add_special_tokens=False)["input_ids"]

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[list[int]]]:
        ids = token_ids(batch["text"])
        return {"input_ids": [(prefix if first else []) + t + (suffix if last else [])
                              for t, first, last in zip(ids, batch["first"], batch["last"], strict=True)]}

    if len(docs) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    tokens = docs.map(encode, batched=True, num_proc=num_proc, remove_columns=docs.column_names,
                      desc="tokenizing")
    column = tokens.data.table.column("input_ids")  # map() wrote a fresh table: no indices mapping
    flat = pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)
    return flat, lengths


def pack(flat, block_size: int) -> torch.Tensor:
    """A token stream cut into ``(n, block_size)`` blocks (the tail that fills no block is dropped)."""
    n = len(flat) // block_size
    return torch.from_numpy(flat[: n * block_size].copy()).view(n, block_size)


def tokenize_blocks(docs, tokenizer, block_size: int, num_proc: int | None = None) -> torch.Tensor:
    """Tokenize ``docs`` (from :func:`load_documents`) in batches and cut the stream into blocks."""
    return pack(tokenize_rows(docs, tokenizer, num_proc)[0], block_size)


def train_eval_blocks(docs, tokenizer, d: DataArguments, seed: int, eval_docs=None,
                      num_proc: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(training blocks, evaluation blocks), never interleaved.

    With ``eval_docs`` (``eval_split``/``eval_files``), all of ``docs`` trains and ``eval_docs``
    evaluates. Otherwise whole documents, drawn with ``seed``, are held out until they hold
    ``eval_fraction`` of the tokens (at least one block, at most ``max_eval_blocks``); a text that is
    one document gives its last tokens instead, as one contiguous span. Evaluation blocks are capped
    at ``max_eval_blocks``.
    """
    import numpy as np

    flat, lengths = tokenize_rows(docs, tokenizer, num_proc)
    if eval_docs is not None:
        train, held = flat, tokenize_rows(eval_docs, tokenizer, num_proc)[0]
    else:
        total = len(flat)
        target = min(max(int(total * d.eval_fraction), d.block_size), d.max_eval_blocks * d.block_size)
        doc_of_row = np.cumsum(np.asarray(docs["first"], dtype=np.int64)) - 1
        n_docs = int(doc_of_row[-1]) + 1 if len(doc_of_row) else 0
        if n_docs >= 2:
            doc_tokens = np.bincount(doc_of_row, weights=lengths, minlength=n_docs)
            order = torch.randperm(n_docs, generator=torch.Generator().manual_seed(seed)).numpy()
            taken = np.cumsum(doc_tokens[order])
            count = min(int(np.searchsorted(taken, target)) + 1, n_docs - 1)  # at least one document trains
            held_docs = np.zeros(n_docs, dtype=bool)
            held_docs[order[:count]] = True
            token_held = np.repeat(held_docs[doc_of_row], lengths)
            train, held = flat[~token_held], flat[token_held]
        else:  # one document: its last tokens, one span (a single boundary with the training text)
            train, held = flat[: total - target], flat[total - target:]
    train_blocks, eval_blocks = pack(train, d.block_size), pack(held, d.block_size)[: d.max_eval_blocks]
    if len(train_blocks) < 1 or len(eval_blocks) < 1:
        raise DataError(f"the text gives {len(train_blocks)} training and {len(eval_blocks)} evaluation block(s) "
                        f"of {d.block_size} tokens; at least one of each is needed: give more text, a smaller "
                        "block_size" + ("" if eval_docs is not None else " or a larger eval_fraction"))
    return train_blocks, eval_blocks


def split_blocks(blocks: torch.Tensor, d: DataArguments, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle ``blocks`` with ``seed`` and hold out the evaluation share: (train, eval)."""
    if len(blocks) < 2:
        raise DataError(f"the training text gives {len(blocks)} block(s) of {d.block_size} tokens; at least 2 "
                        "are needed (one to train, one to evaluate): give more text or a smaller block_size")
    blocks = blocks[torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))]
    n_eval = min(max(1, int(len(blocks) * d.eval_fraction)), d.max_eval_blocks)
    return blocks[n_eval:], blocks[:n_eval]


def calibration_batches(blocks: torch.Tensor, batches: int, batch_size: int,
                        seed: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Up to ``batches`` batches of ``batch_size`` blocks for one-shot scoring or GPTQ: drawn at random with
    ``seed`` (blocks may be in document order), or the first blocks in order when ``seed`` is None. Never
    empty: fewer blocks than one batch give one smaller batch."""
    order = (torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed)) if seed is not None
             else torch.arange(len(blocks)))
    return [{"input_ids": blocks[order[i * batch_size:(i + 1) * batch_size]]}
            for i in range(min(batches, len(blocks) // batch_size or 1))]


class Blocks(torch.utils.data.Dataset):
    """Equal-length token blocks as causal-LM examples (labels = inputs)."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}
