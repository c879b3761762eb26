"""SentencePiece tokenizers: `python -m tokenizer.train` makes one, `Tokenizer(dir)` loads it."""

from .tokenizer import SPECIAL_IDS, Tokenizer, piece_boundaries

__all__ = ["SPECIAL_IDS", "Tokenizer", "piece_boundaries"]
