"""Retrieval-dense synthetic documents: needles at controlled distances, varied filler, questions at the end.

The embedded long-document corpus (data_prep/synthetic.py) holds one passkey per document of
about 4k tokens: too rare for a small model to learn retrieval from. This generator makes
documents where retrieval is most of what there is to learn (issue 13):

* needles: one passkey ("The pass key is 48213. Remember it. 48213 is the pass key.", the wording
  of the passkey evaluation) and ``facts`` key -> value facts ("The code of Tovandi is 3817.") for
  multi-query associative recall;
* each needle sits at a distance drawn uniformly from [0, ``words``] filler words before the
  questions (rounded down to a sentence boundary, so the filler between a needle and the
  questions never exceeds the drawn distance), so the distances span the whole document, and so
  the whole training length when documents are about as long as a training sample;
* varied filler, one style per stretch of text: village prose like synthetic.py's, plain
  statements ("The lamp is red."), and a short group of sentences repeated over and over (the
  shape of the passkey prompt's filler, never its sentences);
* the questions at the end, in a random order, each followed by its answer, so that the loss on
  the answer tokens rewards retrieval.

A document (here ``words=40,facts=2``): an optional introduction, one paragraph of filler holding
the needles, then one question per line, each with its answer::

    Remember every code and every key you find.

    The field is empty. The code of Thaindpathklir is 1019. The horse is empty. The river is white.
    The pass key is 61589. Remember it. 61589 is the pass key. The bird is quiet. The field is cold.
    The code of Lomoth is 7081. The coat is empty. The well is red. The well is old. The stone is
    yellow. The garden is blue.

    What is the code of Lomoth? The code of Lomoth is 7081.
    What is the pass key? The pass key is 61589.
    What is the code of Thaindpathklir? The code of Thaindpathklir is 1019.

Source spec ``needles[:docs=N,seed=S,words=W,facts=F]``, defaults 2000, 1234, 600 and 3 (NeedlesConfig);
validation and test hold docs // 20 documents each (at least 2). Passkeys have 5 digits, fact
values 3 or 4, fact names are distinct single words.

The filler and the introductions hold no digits: in these documents digits only occur in needles
and answers. No sentence of the evaluation prompt's filler or task description is ever generated
(checked by a test). Like synthetic.py, a corpus is a pure function of its config: every document
draws from its own ``random.Random`` seeded from (seed, split, index).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass

from .synthetic import _FILLER, _PLACES, _VERBS, _WEATHER, _name, _word, document_seeds
from .synthetic import split_sizes  # noqa: F401  (needles splits are sized like synthetic ones; sources.py reads it here)

PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is {key}."
FACT_NEEDLE = "The code of {name} is {value}."
FACT_QUESTION = "What is the code of {name}? The code of {name} is {value}."

_INTROS = ["", "Read the text below and keep the numbers in mind.",
           "Some numbers are hidden in this story. You will be asked about them.",
           "A few codes are written somewhere in the following notes.",
           "Remember every code and every key you find."]
_THINGS = ["lamp", "door", "river", "road", "wall", "field", "roof", "boat", "hill", "stone", "tree", "cup",
           "coat", "bell", "cart", "well", "bird", "horse", "garden", "window"]
_QUALITIES = ["red", "old", "wide", "quiet", "tall", "warm", "dark", "bright", "small", "heavy", "soft",
              "empty", "round", "brown", "white", "long", "cold", "green", "blue", "yellow"]
_EVAL_SENTENCES = {"The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                   "There and back again."}
"""The passkey prompt's filler sentences (pretrain/eval/passkey.py): never generated here."""


@dataclass(frozen=True)
class NeedlesConfig:
    """Parameters of `needles:docs=N,seed=S,words=W,facts=F` sources."""

    docs: int = 2000
    """Documents in the train split (validation and test get docs // 20, at least 2)."""
    seed: int = 1234
    """Corpus seed; each split and document derives its own seed from it."""
    words: int = 600
    """Filler words per document; needle distances are drawn from [0, words] (about 1.6 tokens per
    word with a 512-token vocabulary)."""
    facts: int = 3
    """Key -> value facts per document, besides the passkey."""

    def problems(self) -> list[str]:
        """What is wrong with these parameters, one message each (empty when valid)."""
        out = []
        if self.docs < 1:
            out.append(f"docs must be >= 1, got {self.docs}")
        if self.words < 20:
            out.append(f"words must be >= 20, got {self.words}")
        if not 0 <= self.facts <= 50:
            out.append(f"facts must be in 0..50, got {self.facts}")
        return out


def _prose(rng: random.Random, cast: list[str]) -> str:
    if rng.random() < 0.2:
        return rng.choice(_WEATHER)
    if rng.random() < 0.5:
        return f"{rng.choice(cast)} {rng.choice(_VERBS)} the {rng.choice(_PLACES)}."
    return rng.choice(_FILLER)


def _statement(rng: random.Random) -> str:
    while True:
        sentence = f"The {rng.choice(_THINGS)} is {rng.choice(_QUALITIES)}."
        if sentence not in _EVAL_SENTENCES:
            return sentence


def _filler(rng: random.Random, words: int, cast: list[str]) -> list[str]:
    """Sentences of ``words`` words or up to one sentence more, in stretches of one style each."""
    sentences: list[str] = []
    written = 0
    while written < words:
        style = rng.choice(("prose", "statements", "repeated"))
        stretch = rng.randint(20, 200)
        if style == "repeated":
            group = [_statement(rng) if rng.random() < 0.5 else _prose(rng, cast) for _ in range(rng.randint(2, 5))]
            make = itertools.cycle(group).__next__
        else:
            make = (lambda: _prose(rng, cast)) if style == "prose" else (lambda: _statement(rng))
        done = 0
        while done < stretch and written < words:
            sentence = make()
            sentences.append(sentence)
            done += len(sentence.split())
            written += len(sentence.split())
    return sentences


def document(seed: int, words: int, facts: int) -> str:
    """One document: intro, filler with needles at uniform distances before the end, questions."""
    rng = random.Random(seed)
    cast = [_name(rng) for _ in range(4)]
    filler = _filler(rng, words, cast)
    passkey = rng.randint(10000, 99999)
    names = []
    while len(names) < facts:  # distinct one-word names, so every question has one answer
        name = _word(rng, rng.randint(2, 3)).capitalize()
        if name not in names:
            names.append(name)
    values = [rng.randint(100, 9999) for _ in names]
    needles = [(PASSKEY_NEEDLE.format(key=passkey), PASSKEY_QUESTION.format(key=passkey))]
    needles += [(FACT_NEEDLE.format(name=name, value=value), FACT_QUESTION.format(name=name, value=value))
                for name, value in zip(names, values)]

    # remaining[i]: filler words after sentence i, up to the questions. A needle drawn at distance d
    # goes after the first sentence whose remaining filler is at most d words (one always exists:
    # remaining[-1] == 0), so it ends up between d - len(that sentence) and d words from the end.
    remaining, left = [], sum(len(s.split()) for s in filler)
    for sentence in filler:
        left -= len(sentence.split())
        remaining.append(left)
    inserts: dict[int, list[str]] = {}  # sentence index -> needles placed right after it
    for needle, _ in needles:
        distance = rng.randint(0, words)
        after = next(i for i, r in enumerate(remaining) if r <= distance)
        inserts.setdefault(after, []).append(needle)
    body = []
    for i, sentence in enumerate(filler):
        body.append(sentence)
        body.extend(inserts.get(i, []))
    questions = [question for _, question in needles]
    rng.shuffle(questions)
    intro = rng.choice(_INTROS)
    return (intro + "\n\n" if intro else "") + " ".join(body) + "\n\n" + "\n".join(questions) + "\n"


def documents(config: NeedlesConfig, split: str, start: int = 0, stop: int | None = None) -> Iterator[str]:
    """Documents `start:stop` of one split (seeded like synthetic.py's)."""
    for seed in document_seeds(config, split, start, stop):
        yield document(seed, config.words, config.facts)
