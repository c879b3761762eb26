"""Digit-copy drills: the warm-up that lets a small model tell digits apart (issue 13).

A document is ``lines`` lines like "Copy 7301948 again 7301948.": each number has 5 to 10
distinct digits, so once the copy has started every next digit is unambiguous. On the needles
corpus alone no model of the `repro_memory` size learned to copy a passkey: with tied, decayed
embeddings the ten digit embeddings collapse, and nothing in the text separates them before
copying works (README, "Passkey beyond the training length"). A short stretch of these lines
before (or blended with) the needles breaks that loop.

Source spec ``copies[:docs=N,seed=S,lines=L]``, defaults 2000, 1234 and 20 (CopiesConfig);
validation and test hold docs // 20 documents each (at least 2), seeded like synthetic.py's. The
lines never hold the needles' or the evaluation prompt's sentences.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from .synthetic import document_seeds
from .synthetic import split_sizes  # noqa: F401  (sized like synthetic ones; sources.py reads it here)

LINE = "Copy {number} again {number}."


@dataclass(frozen=True)
class CopiesConfig:
    """Parameters of `copies:docs=N,seed=S,lines=L` sources."""

    docs: int = 2000
    """Documents in the train split (validation and test get docs // 20, at least 2)."""
    seed: int = 1234
    """Corpus seed; each split and document derives its own seed from it."""
    lines: int = 20
    """Copy lines per document."""

    def problems(self) -> list[str]:
        """What is wrong with these parameters, one message each (empty when valid)."""
        out = []
        if self.docs < 1:
            out.append(f"docs must be >= 1, got {self.docs}")
        if not 1 <= self.lines <= 10_000:
            out.append(f"lines must be in 1..10000, got {self.lines}")
        return out


def document(seed: int, lines: int) -> str:
    """``lines`` copy lines, each of a number with 5 to 10 distinct digits."""
    rng = random.Random(seed)
    numbers = ["".join(rng.sample("0123456789", rng.randint(5, 10))) for _ in range(lines)]
    return "\n".join(LINE.format(number=number) for number in numbers) + "\n"


def documents(config: CopiesConfig, split: str, start: int = 0, stop: int | None = None) -> Iterator[str]:
    """Documents `start:stop` of one split."""
    for seed in document_seeds(config, split, start, stop):
        yield document(seed, config.lines)
