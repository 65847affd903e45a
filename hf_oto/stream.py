"""``streaming: true``: read a Hub dataset (or JSON files) as a stream, tokenized and packed while training.

The stream's first documents are held out for evaluation (until they fill ``max_eval_blocks``
blocks), or ``eval_split`` is read instead; training never sees the held-out documents. Training
reads a shuffled stream (a buffer of ``stream_shuffle_buffer`` documents, seeded) and needs
``max_steps``, since a stream has no length to count epochs with. Every document ends with EOS and
starts with the tokenizer's own leading tokens, as in the map-style path.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from hf_oto.data import DataArguments, document_affixes
from hf_oto.errors import ConfigError, DataError


def open_stream(d: DataArguments, split: str | None = None):
    """The ``datasets`` IterableDataset of the training text (or of ``split``), rows with a ``text`` column."""
    from datasets import load_dataset

    if d.train_files:
        ds = load_dataset("json", data_files=list(d.train_files), split="train", streaming=True)
    else:
        ds = load_dataset(d.dataset_name, d.dataset_config, split=split or d.dataset_split, streaming=True)
    return ds


def _texts(rows, column: str) -> Iterator[str]:
    for row in rows:
        if column not in row:
            raise DataError(f"the stream has no {column!r} column (fields: {', '.join(row)}); set text_column")
        if row[column]:
            yield row[column]


def _documents(texts: Iterator[str], tokenizer) -> Iterator[list[int]]:
    """Each text as token ids, framed by the tokenizer's leading tokens and EOS as in the map-style path."""
    prefix, suffix = document_affixes(tokenizer)
    for text in texts:
        yield prefix + tokenizer(text, add_special_tokens=False)["input_ids"] + suffix


def _blocks(documents: Iterator[list[int]], block_size: int) -> Iterator[torch.Tensor]:
    buffer: list[int] = []
    for ids in documents:
        buffer.extend(ids)
        while len(buffer) >= block_size:
            yield torch.tensor(buffer[:block_size], dtype=torch.long)
            del buffer[:block_size]


class StreamBlocks(torch.utils.data.IterableDataset):
    """Training blocks from a stream: skip the held-out documents, shuffle in a buffer, tokenize and pack."""

    def __init__(self, d: DataArguments, tokenizer, skip_documents: int, seed: int):
        self.d, self.tokenizer, self.skip, self.seed = d, tokenizer, skip_documents, seed

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        rows = open_stream(self.d).skip(self.skip).shuffle(seed=self.seed, buffer_size=self.d.stream_shuffle_buffer)
        for block in _blocks(_documents(_texts(rows, self.d.text_column), self.tokenizer), self.d.block_size):
            yield {"input_ids": block, "labels": block}


def stream_train_eval(d: DataArguments, tokenizer, seed: int) -> tuple[StreamBlocks, torch.Tensor]:
    """(the training stream, the evaluation blocks): ``eval_split`` when given, else the stream's first
    documents until they fill ``max_eval_blocks`` blocks (they are then skipped by training)."""
    column, size = d.text_column, d.block_size
    if d.eval_split:
        rows, skip = open_stream(d, d.eval_split), 0
    else:
        rows, skip = open_stream(d), None
    held: list[int] = []
    used = 0
    for ids in _documents(_texts(rows, column), tokenizer):
        used += 1
        held.extend(ids)
        if len(held) >= d.max_eval_blocks * size:
            break
    n = min(len(held) // size, d.max_eval_blocks)
    if n < 1:
        raise DataError(f"the stream's evaluation text gives no block of {size} tokens; give more text or a smaller "
                        "block_size")
    eval_blocks = torch.tensor(held[: n * size], dtype=torch.long).view(n, size)
    return StreamBlocks(d, tokenizer, used if skip is None else 0, seed), eval_blocks


def check_streaming(d: DataArguments, max_steps: int) -> None:
    """Streaming settings that cannot work, refused before anything is read."""
    if not d.streaming:
        return
    if d.text_source or (d.train_files and any(not str(f).lower().endswith((".json", ".jsonl"))
                                                for f in d.train_files)):
        raise ConfigError("streaming reads a Hub dataset (dataset_name) or JSON files; text_source and text files "
                          "load in full")
    if d.eval_files:
        raise ConfigError("streaming takes its evaluation text from eval_split or the stream's first documents, "
                          "not eval_files")
    if not d.rows_are_documents:
        raise ConfigError("streaming needs rows_are_documents: true")
    if d.train_tokenizer_vocab:
        raise ConfigError("streaming cannot train a tokenizer (train_tokenizer_vocab reads all the text first)")
    if max_steps <= 0:
        raise ConfigError("streaming needs max_steps: a stream has no length to count epochs with")


