"""The tokenizer loader used by every other part of the project.

A tokenizer directory holds `tokenizer.model` (the SentencePiece proto) and
`tokenizer_config.json` (special ids, vocab size, the model's sha256, training options). The
SentencePiece settings (DESIGN.md §2) make `decode(encode(text)) == text` for any text: identity
normalisation, whitespace kept, byte fallback, no dummy prefix.

Because no vocabulary piece holds "▁" (a space) anywhere but at its start, and whitespace-only
pieces hold nothing else, every position where a run of spaces begins after a non-space
character is a piece boundary of the whole-text encoding. `encode_long` cuts long texts there
and encodes the pieces separately (SentencePiece is ~3x faster on 10k-character pieces than on
a whole book) with ids equal to the whole-text encoding; tests/tokenizer proves it on books.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import sentencepiece as spm

from fileio import read_json

SPECIAL_IDS = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3}
"""Fixed ids; the end-of-document id appended to every document is eos (Megatron's `eod`)."""

PIECE_CHARS = 10_000
"""Target length of the pieces `encode_long` hands to SentencePiece."""


def piece_boundaries(text: str, piece_chars: int = PIECE_CHARS) -> list[int]:
    """Cut points (exclusive ends) splitting `text` into pieces of about `piece_chars` characters.

    Each cut lies just before a space that follows a non-space character, a guaranteed piece
    boundary for our SentencePiece settings. A text without such a place is one piece.
    """
    ends = []
    start = 0
    while len(text) - start > piece_chars:
        cut = text.find(" ", start + piece_chars)
        while cut != -1 and text[cut - 1] == " ":
            cut = text.find(" ", cut + 1)
        if cut == -1:
            break
        ends.append(cut)
        start = cut
    ends.append(len(text))
    return ends


class Tokenizer:
    """A trained SentencePiece model plus its fixed special ids."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.model_path = self.directory / "tokenizer.model"
        config_path = self.directory / "tokenizer_config.json"
        for path in (self.model_path, config_path):
            if not path.is_file():
                raise ValueError(f"{path}: missing (train one with `python -m tokenizer.train`)")
        self.config = read_json(config_path)
        if not isinstance(self.config, dict) or not isinstance(self.config.get("vocab_size"), int):
            raise ValueError(f"{config_path}: expected a JSON object with an integer vocab_size")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.model_path))
        except RuntimeError:
            raise ValueError(f"{self.model_path}: not a SentencePiece model (truncated or corrupt?)") from None
        if self.sp.vocab_size() != self.config["vocab_size"]:
            raise ValueError(f"{config_path}: vocab_size {self.config['vocab_size']} != model's {self.sp.vocab_size()}")
        self.sha256 = hashlib.sha256(self.model_path.read_bytes()).hexdigest()

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self.sp.pad_id()

    @property
    def unk_id(self) -> int:
        return self.sp.unk_id()

    @property
    def eod_id(self) -> int:
        return self.eos_id

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str], num_threads: int = -1) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=num_threads)

    def encode_long(self, text: str, dtype: type = np.int32, num_threads: int = 1) -> np.ndarray:
        """Whole-text ids of a text of any length, encoded piecewise (see the module docstring)."""
        ends = piece_boundaries(text)
        starts = [0, *ends[:-1]]
        pieces = self.sp.encode([text[a:b] for a, b in zip(starts, ends)], num_threads=num_threads)
        return np.concatenate([np.asarray(piece, dtype=dtype) for piece in pieces])

    def decode(self, ids: list[int] | np.ndarray) -> str:
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        return self.sp.id_to_piece(token_id)
