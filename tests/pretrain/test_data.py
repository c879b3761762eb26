"""The training loader over real shards: every token once per epoch, exact resume, DP slices, determinism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data_prep.indexed import IndexedDatasetBuilder
from data_prep.manifest import split_prefixes
from pretrain.data import TokenStream, TrainLoader, validation_batch

EOD = 1


@pytest.fixture
def shards(tmp_path: Path) -> tuple[list[Path], list[np.ndarray]]:
    """Two shards of 7 documents of varied length; token values encode (document, position)."""
    rng = np.random.default_rng(0)
    docs = [np.append(np.arange(rng.integers(5, 60)) + 1000 * (d + 2), EOD).astype(np.int32) for d in range(7)]
    prefixes = []
    for i, part in enumerate((docs[:4], docs[4:])):
        builder = IndexedDatasetBuilder(tmp_path / f"shard_{i}", np.int32)
        for doc in part:
            builder.add_document(doc)
        builder.finalize()
        prefixes.append(tmp_path / f"shard_{i}")
    return prefixes, docs


def test_epoch_stream_is_a_permutation_of_whole_documents(shards):
    prefixes, docs = shards
    stream = TokenStream(prefixes, seed=3)
    tokens = stream.read(0, 0, stream.total_tokens)
    assert stream.total_tokens == sum(len(d) for d in docs)
    pieces = np.split(tokens, np.flatnonzero(tokens == EOD)[:-1] + 1)
    assert sorted(map(tuple, pieces)) == sorted(map(tuple, docs))
    assert not np.array_equal(stream.read(1, 0, stream.total_tokens), tokens)  # a new order per epoch
    assert np.array_equal(TokenStream(prefixes, seed=3).read(1, 0, 50), stream.read(1, 0, 50))
    assert not np.array_equal(TokenStream(prefixes, seed=4).read(0, 0, 50), tokens[:50])


def test_samples_are_consecutive_and_overlap_by_one_token(shards):
    prefixes, _ = shards
    loader = TrainLoader([prefixes], seed=1)
    stream = TokenStream(prefixes, seed=1).read(0, 0, loader.sources[0].stream.total_tokens)
    batch = loader.next_batch(seq_len=16, global_batch=4, dp_rank=0, dp_size=1)
    assert batch.shape == (4, 17) and batch.dtype == np.int64
    for i, sample in enumerate(batch):
        assert np.array_equal(sample, stream[16 * i:16 * i + 17])
    assert loader.state_dict() == {"seed": 1, "sources": [{"epoch": 0, "cursor": 64, "samples": 4, "tokens": 64}]}


def test_data_parallel_ranks_split_the_same_global_batch(shards):
    prefixes, _ = shards
    whole = TrainLoader([prefixes], seed=5).next_batch(seq_len=8, global_batch=6, dp_rank=0, dp_size=1)
    parts = []
    for rank in range(3):
        loader = TrainLoader([prefixes], seed=5)
        parts.append(loader.next_batch(seq_len=8, global_batch=6, dp_rank=rank, dp_size=3))
        assert loader.state_dict()["sources"][0]["cursor"] == 48  # every rank advances past the whole global batch
    assert np.array_equal(np.concatenate(parts), whole)


def test_resume_continues_at_the_next_token_across_a_length_change(shards):
    """Read N batches, save, rebuild, load: the next batches equal an uninterrupted loader's, in every epoch."""
    prefixes, _ = shards
    plan = [16, 16, 32, 32, 32, 64, 64, 64, 64, 64]  # seq_len per step, with two curriculum changes
    reference = TrainLoader([prefixes], seed=2)
    expected = [reference.next_batch(n, 2, 0, 1) for n in plan]
    assert reference.sources[0].epoch >= 1  # the plan crosses an epoch boundary

    first = TrainLoader([prefixes], seed=2)
    for n in plan[:4]:
        first.next_batch(n, 2, 0, 1)
    resumed = TrainLoader([prefixes], seed=2)
    resumed.load_state_dict(first.state_dict())
    for n, batch in zip(plan[4:], expected[4:]):
        assert np.array_equal(resumed.next_batch(n, 2, 0, 1), batch)

    # No token skipped or repeated within an epoch: sample starts step by seq_len.
    walker = TrainLoader([prefixes], seed=2)
    starts = []
    for n in plan:
        for _ in range(2):
            starts.append(walker.sources[0].next_start(n))
    within_epoch0 = [cursor for epoch, cursor in starts if epoch == 0]
    lengths = [n for n in plan for _ in range(2)]
    assert within_epoch0 == list(np.cumsum([0] + lengths)[:len(within_epoch0)])


def test_loader_state_from_another_seed_is_refused(shards):
    prefixes, _ = shards
    with pytest.raises(ValueError, match="data.seed 1, the config says 2"):
        TrainLoader([prefixes], seed=2).load_state_dict({"seed": 1, "sources": [{}]})


def test_validation_batches_are_fixed_and_split_over_ranks(shards):
    prefixes, docs = shards
    plain = np.concatenate(docs)  # unshuffled: the documents in shard order
    stream = TokenStream(prefixes, seed=0, shuffle=False)
    whole = validation_batch(stream, 16, 4, 0, 1)
    for i in range(4):
        assert np.array_equal(whole[i], plain[16 * i:16 * i + 17])
    halves = [validation_batch(stream, 16, 4, rank, 2) for rank in range(2)]
    assert np.array_equal(np.concatenate(halves), whole)
    with pytest.raises(ValueError, match="validation split holds"):
        validation_batch(stream, 64, 100, 0, 1)


def test_loader_reads_prepared_shards(synthetic_data):
    prefixes = split_prefixes(synthetic_data["data"], "train")
    loader = TrainLoader([prefixes], seed=0)
    batch = loader.next_batch(seq_len=64, global_batch=4, dp_rank=0, dp_size=1)
    assert batch.shape == (4, 65) and batch.min() >= 0 and batch.max() < 512


def blend_sources(tmp_path: Path, count: int) -> list[list[Path]]:
    """``count`` one-shard sources whose token values name the source (10_000 * (source + 1) + position)."""
    sources = []
    for s in range(count):
        builder = IndexedDatasetBuilder(tmp_path / f"source_{s}", np.int32)
        for d in range(5):
            builder.add_document(np.arange(100 + 17 * d, dtype=np.int32) % 9_000 + 10_000 * (s + 1))
        builder.finalize()
        sources.append([tmp_path / f"source_{s}"])
    return sources


def test_blend_follows_the_weights_over_any_window(tmp_path):
    weights = [0.5, 0.3, 0.2]
    loader = TrainLoader(blend_sources(tmp_path, 3), seed=1, weights=[5, 3, 2])  # normalised
    picks = []
    for _ in range(10_000 // 8):
        batch = loader.next_batch(seq_len=16, global_batch=8, dp_rank=0, dp_size=1)
        picks += [int(sample[0]) // 10_000 - 1 for sample in batch]  # the source each sample came from
    counts = np.bincount(picks, minlength=3) / len(picks)
    assert np.allclose(counts, weights, atol=0.01), counts
    for start in range(0, len(picks) - 500, 250):  # any window of 500 samples: within 2 samples per source
        window = np.bincount(picks[start:start + 500], minlength=3)
        assert np.all(np.abs(window - 500 * np.array(weights)) <= 2), (start, window)
    assert loader.tokens_by_source() == [int(round(16 * len(picks) * w)) for w in weights]


def test_blend_resumes_exactly_and_keeps_every_source_cursor(tmp_path):
    sources = blend_sources(tmp_path, 2)
    plan = [16, 32, 32, 64, 64, 64, 16]
    reference = TrainLoader(sources, seed=3, weights=[0.7, 0.3])
    expected = [reference.next_batch(n, 4, 0, 1) for n in plan]
    first = TrainLoader(sources, seed=3, weights=[0.7, 0.3])
    for n in plan[:3]:
        first.next_batch(n, 4, 0, 1)
    state = first.state_dict()
    assert [s["samples"] for s in state["sources"]] == [8, 4]  # 12 samples at 0.7 / 0.3: 8.4 / 3.6, each within 1
    resumed = TrainLoader(sources, seed=3, weights=[0.7, 0.3])
    resumed.load_state_dict(state)
    for n, batch in zip(plan[3:], expected[3:]):
        assert np.array_equal(resumed.next_batch(n, 4, 0, 1), batch)
    with pytest.raises(ValueError, match="loader state holds 2 source"):
        TrainLoader(sources[:1], seed=3).load_state_dict(state)
