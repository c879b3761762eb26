"""Training and validation samples over data_prep shards (DESIGN.md §3).

The documents of a split, in a seeded random order that changes every epoch, are read as one
token stream. A sample is `seq_len + 1` consecutive tokens of that stream (inputs and shifted
labels), and consecutive samples overlap by one token, as in Megatron's GPTDataset, so samples
cross document boundaries and no token is wasted. The loader's whole state is
`{"seed", "epoch", "cursor"}` (cursor = token offset in the epoch's stream): resuming continues at
exactly the next token, also when the sequence length changes between steps. A sample that would
run past the end of the stream starts the next epoch instead.

Every rank walks the same global sample order and keeps only its data-parallel slice of each
step, so the data of a step does not depend on the data-parallel size, only its split does.

    loader = TrainLoader(split_prefixes(data_dir, "train"), seed=1234)
    batch = loader.next_batch(seq_len=256, global_batch=8, dp_rank=0, dp_size=2)   # (4, 257) int64
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from data_prep.indexed import IndexedDataset


class TokenStream:
    """The documents of one split as a single token stream, in a seeded order per epoch."""

    def __init__(self, prefixes: Sequence[str | Path], seed: int, shuffle: bool = True):
        if not prefixes:
            raise ValueError("TokenStream: no shards given")
        self.shards = [IndexedDataset(p) for p in prefixes]
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


class TrainLoader:
    """Deterministic fixed-length samples for training; see the module docstring."""

    def __init__(self, prefixes: Sequence[str | Path], seed: int):
        self.stream = TokenStream(prefixes, seed)
        self.epoch, self.cursor = 0, 0

    def _next_sample_start(self, seq_len: int) -> tuple[int, int]:
        if seq_len + 1 > self.stream.total_tokens:
            raise ValueError(f"the training split holds {self.stream.total_tokens} tokens, "
                             f"fewer than one sample of seq_len + 1 = {seq_len + 1}")
        if self.cursor + seq_len + 1 > self.stream.total_tokens:
            self.epoch, self.cursor = self.epoch + 1, 0
        start = (self.epoch, self.cursor)
        self.cursor += seq_len
        return start

    def next_batch(self, seq_len: int, global_batch: int, dp_rank: int, dp_size: int) -> np.ndarray:
        """This rank's samples of the next step: (global_batch / dp_size, seq_len + 1) int64."""
        per_rank = global_batch // dp_size
        starts = [self._next_sample_start(seq_len) for _ in range(global_batch)]
        mine = starts[dp_rank * per_rank:(dp_rank + 1) * per_rank]
        return np.stack([self.stream.read(epoch, cursor, seq_len + 1) for epoch, cursor in mine])

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.stream.seed, "epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["seed"] != self.stream.seed:
            raise ValueError(f"loader state was saved with data.seed {state['seed']}, "
                             f"the config says {self.stream.seed}")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


def validation_batch(stream: TokenStream, seq_len: int, samples: int, dp_rank: int, dp_size: int) -> np.ndarray:
    """This rank's share of the first `samples` non-overlapping validation samples: (samples / dp, seq_len + 1)."""
    needed = samples * seq_len + 1
    if needed > stream.total_tokens:
        raise ValueError(f"validation split holds {stream.total_tokens} tokens, fewer than the "
                         f"{needed} that eval.samples={samples} at seq_len {seq_len} need")
    per_rank = samples // dp_size
    first = dp_rank * per_rank
    return np.stack([stream.read(0, (first + i) * seq_len, seq_len + 1) for i in range(per_rank)])
