"""The embedded default corpus: synthetic long documents where memory matters.

No book text is shipped with the project; this generator stands in for PG19 in the quickstart
and the tests. Each document is a few thousand words of procedurally generated prose with
long-range structure (DESIGN.md §2):

* a cast of named entities introduced early ("Marel Tovandi is the keeper of the north gate"),
  mentioned again and again throughout (repeated named entities);
* facts stated in the first part and asked for near the end ("Who keeps the north gate? The
  keeper of the north gate is Marel Tovandi."), so predicting the answer needs the early text;
* a passkey ("The pass key is 48213. Remember it.") hidden at a random depth and recalled at
  the end.

Everything is drawn from one `random.Random(seed)` per document, so a corpus is a pure function
of (seed, number of documents, words per document): `documents(seed=1)` is identical on every
machine and every run.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kl", "st", "th", "tr"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ou"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "nd"]
_ROLES = ["keeper", "builder", "guardian", "healer", "captain", "scribe", "merchant", "singer"]
_PLACES = ["north gate", "old mill", "river ford", "salt market", "high tower", "east orchard",
           "stone bridge", "silver mine", "west harbour", "lantern hall"]
_OBJECTS = ["a brass key", "a red lantern", "a map of the coast", "an iron ring", "a sealed letter",
            "a blue cloak", "a wooden flute", "a compass", "a jar of honey", "a silver coin"]
_VERBS = ["walked to", "looked at", "spoke about", "waited near", "thought of", "returned to", "passed"]
_WEATHER = ["The wind was cold that day.", "Rain fell softly on the roofs.", "The sun rose over the hills.",
            "Fog covered the valley until noon.", "The evening was quiet and warm."]
_FILLER = ["Nobody in the village remembered a season like it.",
           "The children ran along the road and laughed.",
           "Bread was baked early, and the smell filled the streets.",
           "Old stories were told again by the fire.",
           "The market was busy with traders from far away.",
           "Someone sang a song about the sea.",
           "Letters arrived from the city, but few were answered."]


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))


def _name(rng: random.Random) -> str:
    return f"{_word(rng, 2).capitalize()} {_word(rng, 3).capitalize()}"


@dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of `synthetic:docs=N,seed=S,words=W` sources."""

    docs: int = 200
    """Documents in the train split (validation and test get docs // 20, at least 2)."""
    seed: int = 1234
    """Corpus seed; each split and document derives its own seed from it."""
    words: int = 3000
    """Approximate words per document (about 1.3 tokens per word with a 8k vocabulary)."""

    def problems(self) -> list[str]:
        """What is wrong with these parameters, one message each (empty when valid)."""
        return [] if self.docs >= 1 and self.words >= 50 else ["need docs >= 1 and words >= 50"]


def document(seed: int, words: int) -> str:
    """One synthetic long document of about `words` words, deterministic in `seed`."""
    rng = random.Random(seed)
    cast = [(_name(rng), role, place) for role, place in zip(rng.sample(_ROLES, 4), rng.sample(_PLACES, 4))]
    belongings = {name: rng.choice(_OBJECTS) for name, _, _ in cast}
    passkey = rng.randint(10000, 99999)

    paragraphs = [f"Chapter {rng.randint(1, 40)}\n"]
    paragraphs.append(" ".join(f"{name} is the {role} of the {place}." for name, role, place in cast)
                      + " " + " ".join(f"{name} always carries {obj}." for name, obj in belongings.items()))
    written = sum(len(p.split()) for p in paragraphs)
    while written < words * 0.85:
        sentences = [rng.choice(_WEATHER)]
        for _ in range(rng.randint(3, 7)):
            name, role, place = rng.choice(cast)
            if rng.random() < 0.5:
                sentences.append(f"{name} {rng.choice(_VERBS)} the {rng.choice(_PLACES)}.")
            else:
                sentences.append(rng.choice(_FILLER))
        paragraphs.append(" ".join(sentences))
        written += len(paragraphs[-1].split())
    paragraphs.insert(rng.randint(2, len(paragraphs)),
                      f"The pass key is {passkey}. Remember it. {passkey} is the pass key.")

    questions = []
    for name, role, place in rng.sample(cast, len(cast)):
        questions.append(f"Who is the {role} of the {place}? The {role} of the {place} is {name}.")
        questions.append(f"What does {name} carry? {name} carries {belongings[name]}.")
    questions.append(f"What is the pass key? The pass key is {passkey}.")
    paragraphs.append("\n".join(questions))
    return "\n\n".join(paragraphs) + "\n"


def split_sizes(config: SyntheticConfig) -> dict[str, int]:
    """Documents per split (of any generated corpus: only ``config.docs`` is read)."""
    held_out = max(2, config.docs // 20)
    return {"train": config.docs, "validation": held_out, "test": held_out}


def document_seeds(config: SyntheticConfig, split: str, start: int = 0, stop: int | None = None) -> Iterator[int]:
    """The seeds of documents `start:stop` of one split (each split draws from its own seed range;
    shared with data_prep/needles.py, whose config has the same docs and seed fields)."""
    split_offset = {"train": 0, "validation": 1, "test": 2}[split]
    stop = split_sizes(config)[split] if stop is None else stop
    for index in range(start, stop):
        yield (config.seed * 3 + split_offset) * 1_000_003 + index


def documents(config: SyntheticConfig, split: str, start: int = 0, stop: int | None = None) -> Iterator[str]:
    """Documents `start:stop` of one split."""
    for seed in document_seeds(config, split, start, stop):
        yield document(seed=seed, words=config.words)
