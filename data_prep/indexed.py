"""Megatron-compatible memory-mapped token shards: writer and reader side by side.

A shard is two files, `<prefix>.bin` (the token ids of all sequences, back to back, in the
shard's dtype) and `<prefix>.idx`, laid out exactly as megatron-core's `IndexedDataset`
expects (little-endian):

| offset          | size         | field                                                        |
|-----------------|--------------|--------------------------------------------------------------|
| 0               | 9            | magic `b"MMIDIDX\\x00\\x00"`                                   |
| 9               | 8 (uint64)   | version, always 1                                            |
| 17              | 1 (uint8)    | dtype code (`DType`): 8 = uint16, 4 = int32, ...             |
| 18              | 8 (uint64)   | S = number of sequences                                      |
| 26              | 8 (uint64)   | D = number of entries in the document index (documents + 1)  |
| 34              | 4·S (int32)  | length of each sequence in tokens                            |
| 34+4S           | 8·S (int64)  | byte offset of each sequence in the .bin                     |
| 34+12S          | 8·D (int64)  | document index: sequence number where each document starts, |
|                 |              | then S (Megatron's `document_indices`)                       |

We store one sequence per document (EOD id appended), so the document index is 0, 1, ..., S.
Files are written under temporary names and renamed when complete: a killed writer never
leaves a half shard under a real name. Reading a shard back:

    >>> IndexedDataset("out/train/shard_00000")[0]   # first document's token ids (np.uint16)
"""

from __future__ import annotations

import os
import struct
from enum import IntEnum
from pathlib import Path

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document-index length


class DType(IntEnum):
    """Megatron's dtype codes (megatron.core.datasets.indexed_dataset.DType)."""

    uint8 = 1
    int8 = 2
    int16 = 3
    int32 = 4
    int64 = 5
    float64 = 6
    float32 = 7
    uint16 = 8

    @classmethod
    def code_of(cls, dtype: type | np.dtype) -> int:
        return cls[np.dtype(dtype).name].value

    @classmethod
    def dtype_of(cls, code: int) -> np.dtype:
        return np.dtype(cls(code).name)


def optimal_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits with room to spare (vocab < 65500), else int32 (DESIGN.md §2)."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


class IndexedDatasetBuilder:
    """Appends documents to `<prefix>.bin` and writes `<prefix>.idx` on `finalize()`.

    Both files live under temporary names until `finalize()` renames them (.bin first, .idx
    last: a shard whose .idx exists is complete).
    """

    def __init__(self, prefix: str | Path, dtype: type | np.dtype):
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        self.sequence_lengths: list[int] = []
        self._bin_tmp = self.prefix.with_name(f".{self.prefix.name}.bin.tmp")
        self._bin = open(self._bin_tmp, "wb")

    def add_document(self, tokens: np.ndarray) -> None:
        self._bin.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self.sequence_lengths.append(len(tokens))

    def finalize(self) -> None:
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        lengths = np.array(self.sequence_lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        document_index = np.arange(len(lengths) + 1, dtype=np.int64)
        idx_tmp = self.prefix.with_name(f".{self.prefix.name}.idx.tmp")
        with open(idx_tmp, "wb") as f:
            f.write(HEADER.pack(MAGIC, VERSION, DType.code_of(self.dtype), len(lengths), len(document_index)))
            f.write(lengths.tobytes())          # sequence lengths, int32
            f.write(pointers.tobytes())         # sequence byte offsets, int64
            f.write(document_index.tobytes())   # document index, int64
            f.flush()
            os.fsync(f.fileno())
        os.replace(self._bin_tmp, self.prefix.with_suffix(".bin"))
        os.replace(idx_tmp, self.prefix.with_suffix(".idx"))


class IndexedDataset:
    """Memory-mapped reader of one shard: documents and token ranges without loading the file.

    Raises ValueError naming the file for a bad header or an .idx/.bin size mismatch.
    """

    def __init__(self, prefix: str | Path):
        self.prefix = Path(prefix)
        idx_path, bin_path = self.prefix.with_suffix(".idx"), self.prefix.with_suffix(".bin")
        for path in (idx_path, bin_path):
            if not path.is_file():
                raise ValueError(f"{path}: missing")
        idx_size = idx_path.stat().st_size
        with open(idx_path, "rb") as f:
            header = f.read(HEADER.size)
        if len(header) < HEADER.size:
            raise ValueError(f"{idx_path}: bad header: file is {idx_size} bytes, shorter than the header")
        magic, version, code, count, doc_index_len = HEADER.unpack(header)
        if magic != MAGIC:
            raise ValueError(f"{idx_path}: bad header: magic {magic!r}, expected {MAGIC!r}")
        if version != VERSION:
            raise ValueError(f"{idx_path}: bad header: version {version}, expected {VERSION}")
        try:
            self.dtype = DType.dtype_of(code)
        except ValueError:
            raise ValueError(f"{idx_path}: bad header: unknown dtype code {code}") from None
        expected = HEADER.size + 12 * count + 8 * doc_index_len
        if idx_size != expected:
            raise ValueError(f"{idx_path}: truncated or padded: {idx_size} bytes, header says {expected}")
        index = np.memmap(idx_path, mode="r", dtype=np.uint8)
        offset = HEADER.size
        self.sequence_lengths = index[offset:offset + 4 * count].view(np.int32)
        offset += 4 * count
        self.sequence_pointers = index[offset:offset + 8 * count].view(np.int64)
        offset += 8 * count
        self.document_indices = index[offset:].view(np.int64)
        bin_size = bin_path.stat().st_size
        expected_bin = int(self.sequence_lengths.sum(dtype=np.int64)) * self.dtype.itemsize
        if bin_size != expected_bin:
            raise ValueError(f"{bin_path}: truncated or padded: {bin_size} bytes, index says {expected_bin}")
        self.tokens = np.memmap(bin_path, mode="r", dtype=self.dtype) if bin_size else np.zeros(0, self.dtype)

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens `offset:offset+length` of sequence `i`, a view into the memory map."""
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize + offset
        available = int(self.sequence_lengths[i]) - offset
        return self.tokens[start:start + (available if length is None else min(length, available))]

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))
