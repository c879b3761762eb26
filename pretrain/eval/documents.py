"""Evaluation text: tokenized documents of one split, from prepared shards or any text source.

``--data`` is either a directory made by ``python -m data_prep.prepare`` (its ``manifest.json``
lists the split's shards; no tokenizer needed) or a source spec of ``data_prep.sources``
(``pg19:PATH``, ``jsonl:PATH``, ``hf:NAME``, ``synthetic:...``), whose documents are tokenized
with the model's tokenizer. Either way a document is an int64 array ending in the EOD id, as
in the training shards.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from data_prep.indexed import IndexedDataset
from data_prep.manifest import MANIFEST, split_prefixes
from data_prep.sources import open_source


def documents(data: str | Path, split: str, tokenizer=None) -> Iterator[np.ndarray]:
    """Documents of ``split`` in their stored order, each (n,) int64 with the trailing EOD id."""
    path = Path(data)
    if (path / MANIFEST).is_file():
        for prefix in split_prefixes(path, split):
            shard = IndexedDataset(prefix)
            for i in range(len(shard)):
                yield np.asarray(shard[i], dtype=np.int64)
        return
    if path.is_dir():
        raise ValueError(f"--data {data}: no {MANIFEST} (expected a directory made by `python -m data_prep.prepare`, "
                         f"or a source spec such as pg19:PATH)")
    source = open_source(str(data))
    source.require_split(split)
    if tokenizer is None:
        raise ValueError(f"--data {data}: a text source needs the model's tokenizer (give --tokenizer DIR)")
    encode = getattr(tokenizer, "encode_long", tokenizer.encode)  # ours encodes books piecewise, faster
    for text in source.documents(split):
        yield np.append(np.asarray(encode(text), dtype=np.int64), tokenizer.eod_id)


def long_documents(docs: Iterator[np.ndarray], min_tokens: int, count: int) -> list[np.ndarray]:
    """The first ``count`` documents holding at least ``min_tokens`` tokens (fewer if the split runs out)."""
    chosen = []
    for doc in docs:
        if len(doc) >= min_tokens:
            chosen.append(doc)
            if len(chosen) == count:
                break
    return chosen


def document_windows(docs: Iterator[np.ndarray], length: int, count: int) -> list[np.ndarray]:
    """The first ``length`` tokens of each of the first ``count`` documents holding at least
    ``length`` tokens before their EOD (fewer windows if the split runs out).

    One window per document and never across a document boundary: a perturbation measured at a
    window's last position then lies in the same text, and the windows are independent samples
    (for the intervals of fidelity.py). The trailing EOD is never part of a window.
    """
    return [doc[:length] for doc in long_documents(docs, length + 1, count)]
