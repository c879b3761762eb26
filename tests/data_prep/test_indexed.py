"""The shard format: our writer/reader round trip, and megatron-core reading our shards."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from data_prep.indexed import HEADER, IndexedDataset, IndexedDatasetBuilder, optimal_dtype
from data_prep.manifest import split_prefixes
from tokenizer import Tokenizer


def _documents(rng: np.random.Generator, vocab: int) -> list[np.ndarray]:
    return [rng.integers(0, vocab, size=n) for n in (5, 1, 300, 77, 0, 1024)]


@pytest.mark.parametrize("vocab", [4000, 70_000])
def test_writer_reader_round_trip(tmp_path: Path, vocab: int) -> None:
    docs = _documents(np.random.default_rng(0), vocab)
    builder = IndexedDatasetBuilder(tmp_path / "shard", optimal_dtype(vocab))
    for doc in docs:
        builder.add_document(doc)
    builder.finalize()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard.bin", "shard.idx"]  # no temp files left
    data = IndexedDataset(tmp_path / "shard")
    assert data.dtype == (np.uint16 if vocab < 65500 else np.int32)
    assert len(data) == len(docs) and data.num_tokens == sum(map(len, docs))
    for i, doc in enumerate(docs):
        np.testing.assert_array_equal(data[i], doc)
    np.testing.assert_array_equal(data.get(2, offset=10, length=20), docs[2][10:30])
    np.testing.assert_array_equal(data.get(3, offset=70, length=20), docs[3][70:])


def test_megatron_indexed_dataset_reads_our_shards(synthetic_data: dict[str, Path]) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronIndexedDataset

    for prefix in split_prefixes(synthetic_data["data"], "train") + split_prefixes(synthetic_data["data"], "test"):
        ours, theirs = IndexedDataset(prefix), MegatronIndexedDataset(str(prefix))
        assert len(ours) == len(theirs) > 0
        np.testing.assert_array_equal(theirs.document_indices, np.arange(len(ours) + 1))
        for i in range(len(ours)):
            np.testing.assert_array_equal(theirs[i], ours[i])
        np.testing.assert_array_equal(theirs.get(1, offset=3, length=9), ours.get(1, offset=3, length=9))


def test_megatron_gpt_dataset_yields_samples(synthetic_data: dict[str, Path], tmp_path: Path) -> None:
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronIndexedDataset
    from megatron.core.datasets.utils import Split

    tok = Tokenizer(synthetic_data["tokenizer"])
    prefix = str(split_prefixes(synthetic_data["data"], "train")[0])
    indexed = MegatronIndexedDataset(prefix)
    config = GPTDatasetConfig(
        random_seed=1, sequence_length=256, blend=([prefix], None), split="100,0,0", path_to_cache=str(tmp_path),
        tokenizer=SimpleNamespace(vocab_size=tok.vocab_size, eod=tok.eod_id, pad=tok.pad_id,
                                  unique_identifiers={"class": "Tokenizer", "sha256": tok.sha256}),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False)
    dataset = GPTDataset(indexed, prefix, np.arange(len(indexed), dtype=np.int32), 64, Split.train, config)
    sample = dataset[0]
    assert sample["tokens"].shape == (256,) and sample["labels"].shape == (256,)
    assert int(sample["tokens"].max()) < tok.vocab_size
    # The sample is a real window of the token stream: labels are tokens shifted by one.
    np.testing.assert_array_equal(sample["tokens"][1:].numpy(), sample["labels"][:-1].numpy())
    stream = np.concatenate([indexed[i] for i in range(len(indexed))])
    window = sample["tokens"].numpy()
    hits = np.flatnonzero(np.lib.stride_tricks.sliding_window_view(stream, 256).__eq__(window).all(axis=1))
    assert len(hits) >= 1


def _write_shard(prefix: Path) -> None:
    builder = IndexedDatasetBuilder(prefix, np.uint16)
    builder.add_document(np.arange(100))
    builder.finalize()


def test_reader_rejects_bad_magic_and_truncation(tmp_path: Path) -> None:
    prefix = tmp_path / "s"
    _write_shard(prefix)
    idx = prefix.with_suffix(".idx")
    raw = bytearray(idx.read_bytes())
    raw[:4] = b"XXXX"
    idx.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"s\.idx: bad header: magic"):
        IndexedDataset(prefix)
    _write_shard(prefix)
    prefix.with_suffix(".bin").write_bytes(prefix.with_suffix(".bin").read_bytes()[:-6])
    with pytest.raises(ValueError, match=r"s\.bin: truncated or padded: 194 bytes, index says 200"):
        IndexedDataset(prefix)
    idx.write_bytes(idx.read_bytes()[:HEADER.size - 1])
    with pytest.raises(ValueError, match="shorter than the header"):
        IndexedDataset(prefix)
