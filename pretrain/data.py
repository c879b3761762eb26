"""Training and validation samples over data_prep shards (DESIGN.md §3).

The documents of a split, in a seeded random order that changes every epoch, are read as one
token stream (one per source of a blend). A sample is `seq_len + 1` consecutive tokens of that
stream (inputs and shifted labels), and consecutive samples overlap by one token, as in
Megatron's GPTDataset, so samples cross document boundaries and no token is wasted. The loader's
whole state is `{"seed", "sources": [{"epoch", "cursor", "samples", "tokens"}, ...]}` (cursor =
token offset in the epoch's stream of that source; samples decide the blend's next source):
resuming continues at
exactly the next token, also when the sequence length changes between steps. A sample that would
run past the end of the stream starts the next epoch instead.

Every rank walks the same global sample order and keeps only its data-parallel slice of each
step, so the data of a step does not depend on the data-parallel size, only its split does.

    loader = TrainLoader([split_prefixes(data_dir, "train")], seed=1234)       # or several sources + weights
    batch = loader.next_batch(seq_len=256, global_batch=8, dp_rank=0, dp_size=2)   # (4, 257) int64

A run opens its shards once: `open_run_streams(cfg.data)` gives the training stream of every
source and the validation streams; pretrain/main.py checks them and hands them to the Trainer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.indexed import IndexedDataset
from data_prep.manifest import split_identity, split_prefixes

from .config import DataConfig


class TokenStream:
    """The documents of one split as a single token stream, in a seeded order per epoch."""

    def __init__(self, prefixes: Sequence[str | Path | IndexedDataset], seed: int, shuffle: bool = True):
        """``prefixes``: shard prefixes, or shards already open (another stream's, read again without reopening)."""
        if not prefixes:
            raise ValueError("TokenStream: no shards given")
        self.shards = [p if isinstance(p, IndexedDataset) else IndexedDataset(p) for p in prefixes]
        lengths = [shard.sequence_lengths.astype(np.int64) for shard in self.shards]
        self.doc_lengths = np.concatenate(lengths)  # (D,) over all shards, in shard order
        self.doc_shard = np.concatenate([np.full(len(n), i, np.int32) for i, n in enumerate(lengths)])
        self.doc_local = np.concatenate([np.arange(len(n), dtype=np.int64) for n in lengths])
        self.total_tokens = int(self.doc_lengths.sum())
        self.seed, self.shuffle = seed, shuffle
        self._epoch: int | None = None

    def _order(self, epoch: int) -> None:
        """Document order and cumulative starts of `epoch` (recomputed only when the epoch changes)."""
        if epoch == self._epoch:
            return
        if self.shuffle:
            self.order = np.random.default_rng([self.seed, epoch]).permutation(len(self.doc_lengths))
        else:
            self.order = np.arange(len(self.doc_lengths))
        self.starts = np.concatenate([[0], np.cumsum(self.doc_lengths[self.order])])  # (D + 1,)
        self._epoch = epoch

    def read(self, epoch: int, offset: int, count: int) -> np.ndarray:
        """Tokens `offset:offset+count` of the stream of `epoch`, as int64."""
        self._order(epoch)
        out = np.empty(count, dtype=np.int64)
        filled = 0
        position = int(np.searchsorted(self.starts, offset, side="right")) - 1
        while filled < count:
            doc = self.order[position]
            within = offset + filled - int(self.starts[position])
            piece = self.shards[self.doc_shard[doc]].get(int(self.doc_local[doc]), within, count - filled)
            out[filled:filled + len(piece)] = piece
            filled += len(piece)
            position += 1
        return out


class SourceCursor:
    """Where one source's stream has got to: the epoch and the token offset in it."""

    def __init__(self, stream: TokenStream):
        self.stream = stream
        self.epoch, self.cursor = 0, 0
        self.samples = self.tokens = 0
        """Samples and tokens drawn from this source so far (the blend schedule and the logs read them)."""

    def next_start(self, seq_len: int) -> tuple[int, int]:
        """(epoch, offset) of the next sample of ``seq_len + 1`` tokens, moving past it."""
        if seq_len + 1 > self.stream.total_tokens:
            raise ValueError(f"the training split holds {self.stream.total_tokens} tokens, "
                             f"fewer than one sample of seq_len + 1 = {seq_len + 1}")
        if self.cursor + seq_len + 1 > self.stream.total_tokens:
            self.epoch, self.cursor = self.epoch + 1, 0
        start = (self.epoch, self.cursor)
        self.cursor += seq_len
        self.samples += 1
        self.tokens += seq_len
        return start

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "samples": self.samples, "tokens": self.tokens}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self.samples, self.tokens = int(state["samples"]), int(state["tokens"])


def _training_stream(source: Sequence[str | Path] | TokenStream, seed: int) -> TokenStream:
    """A source's shuffled stream: opened from its prefixes, or the given one when it has that order."""
    if not isinstance(source, TokenStream):
        return TokenStream(source, seed)
    if (source.seed, source.shuffle) != (seed, True):
        raise ValueError(f"TrainLoader: a stream of seed {source.seed} (shuffle {source.shuffle}) given to a "
                         f"loader of seed {seed}: the loader state would not describe its order")
    return source


class TrainLoader:
    """Deterministic fixed-length samples for training from one or more weighted sources.

    Which source a sample comes from follows Megatron's BlendedDataset rule: sample n goes to the
    source furthest behind its share, ``argmax_i(w_i * (n + 1) - samples_i)`` (ties: the first), so
    every prefix of the schedule is within one sample of the weights per source, and so every
    window within two. Each source keeps its own stream and cursor (see the module docstring).
    """

    def __init__(self, sources: Sequence[Sequence[str | Path] | TokenStream], seed: int,
                 weights: Sequence[float] | None = None):
        """``sources``: per source its shard prefixes, or its training stream already open with ``seed``
        (``open_run_streams``: main.py checks the streams before training, the loader reuses them)."""
        weights = [1.0] * len(sources) if weights is None else list(weights)
        if not sources or len(weights) != len(sources) or min(weights) <= 0:
            raise ValueError(f"TrainLoader: expected one positive weight per source, got {weights} for "
                             f"{len(sources)} source(s)")
        self.seed = seed
        self.sources = [SourceCursor(_training_stream(source, seed)) for source in sources]
        self.shares = np.asarray(weights, dtype=np.float64) / sum(weights)

    def _pick(self) -> int:
        drawn = np.array([source.samples for source in self.sources], dtype=np.float64)
        return int(np.argmax(self.shares * (drawn.sum() + 1) - drawn))

    def next_batch(self, seq_len: int, global_batch: int, dp_rank: int, dp_size: int) -> np.ndarray:
        """This rank's samples of the next step: (global_batch / dp_size, seq_len + 1) int64."""
        per_rank = global_batch // dp_size
        starts = []
        for _ in range(global_batch):
            source = self.sources[self._pick()]
            starts.append((source, *source.next_start(seq_len)))
        mine = starts[dp_rank * per_rank:(dp_rank + 1) * per_rank]
        return np.stack([source.stream.read(epoch, cursor, seq_len + 1) for source, epoch, cursor in mine])

    def tokens_by_source(self) -> list[int]:
        return [source.tokens for source in self.sources]

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "sources": [source.state_dict() for source in self.sources]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"loader state was saved with data.seed {state['seed']}, the config says {self.seed}")
        if len(state["sources"]) != len(self.sources):
            raise ValueError(f"loader state holds {len(state['sources'])} source(s), the config's data has "
                             f"{len(self.sources)}")
        for source, saved in zip(self.sources, state["sources"]):
            source.load_state_dict(saved)


@dataclass
class RunStreams:
    """A run's token streams, each shard opened once: main.py checks them before any process group exists
    and the Trainer trains and validates on the same objects."""

    train: list[TokenStream]
    """One per source of ``data.sources()``, in that order, shuffled with ``data.seed``."""
    valid: list[TokenStream]
    """The validation split of each source, in stored order."""

    def validation_stream(self) -> TokenStream:
        """Every source's validation documents as one stream (the fixed validation samples read it)."""
        return TokenStream([shard for stream in self.valid for shard in stream.shards], seed=0, shuffle=False)


def open_run_streams(data: DataConfig) -> RunStreams:
    """Open the training and validation shards of every source of ``data``."""
    sources = data.sources()
    return RunStreams(
        train=[TokenStream(split_prefixes(s.path, data.train_split), seed=data.seed) for s in sources],
        valid=[TokenStream(split_prefixes(s.path, data.valid_split), seed=0, shuffle=False) for s in sources])


def source_names(data: DataConfig) -> list[str]:
    """One name per source for the logs (`data/tokens/<name>`): the directory's name, made unique by its index."""
    names = [Path(s.path).name for s in data.sources()]
    return [name if names.count(name) == 1 else f"{i}_{name}" for i, name in enumerate(names)]


def dataset_identity(data: DataConfig) -> str:
    """A hash of what the training samples are drawn from: each source's train shards and its weight."""
    parts = [f"{split_identity(s.path, data.train_split)}:{s.weight!r}" for s in data.sources()]
    return hashlib.sha256(" ".join(parts).encode()).hexdigest()


def validation_batch(stream: TokenStream, seq_len: int, samples: int, dp_rank: int, dp_size: int) -> np.ndarray:
    """This rank's share of the first `samples` non-overlapping validation samples: (samples / dp, seq_len + 1)."""
    needed = samples * seq_len + 1
    if needed > stream.total_tokens:
        raise ValueError(f"validation split holds {stream.total_tokens} tokens, fewer than the "
                         f"{needed} that eval.samples={samples} at seq_len {seq_len} need")
    per_rank = samples // dp_size
    first = dp_rank * per_rank
    return np.stack([stream.read(0, (first + i) * seq_len, seq_len + 1) for i in range(per_rank)])
