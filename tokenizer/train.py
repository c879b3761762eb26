"""Train a SentencePiece tokenizer on texts.

    python -m tokenizer.train --input pg19:../shared/data/pg19-mini --vocab-size 8000 --output tok/

Settings follow DESIGN.md §2: BPE (or unigram) with byte fallback, identity normalisation and
whitespace kept, so decode(encode(text)) == text. Training text is the given documents cut into
paragraphs (newlines kept, so the vocabulary learns them); `max_sentences` samples that many
paragraphs with a seeded reservoir for corpora too big to train on whole. The same texts,
options and seed give a byte-identical tokenizer.model.

`train` takes any iterable of texts, so this package knows nothing of data sources: data_prep
(which tokenizes with this package) owns the source specs. The command line above therefore
lives in data_prep/train_tokenizer.py, which opens `--input` and passes its texts here; this
module only forwards `python -m tokenizer.train` to it.
"""

from __future__ import annotations

import io
import json
import logging
import random
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

from fileio import write_bytes_atomic

from .tokenizer import SPECIAL_IDS, Tokenizer

log = logging.getLogger("tokenizer.train")

MAX_SENTENCE_CHARS = 2000  # SentencePiece drops "sentences" over max_sentence_length (8192 bytes)


def paragraphs(texts: Iterable[str]) -> Iterator[str]:
    """Training sentences: paragraphs with their newlines, cut to MAX_SENTENCE_CHARS."""
    for text in texts:
        for paragraph in text.split("\n\n"):
            paragraph += "\n\n"
            for start in range(0, len(paragraph), MAX_SENTENCE_CHARS):
                yield paragraph[start:start + MAX_SENTENCE_CHARS]


def sample(sentences: Iterator[str], max_sentences: int, seed: int) -> list[str]:
    """All sentences, or a seeded uniform reservoir sample of `max_sentences` of them (in input order)."""
    rng = random.Random(seed)
    reservoir: list[tuple[int, str]] = []
    for index, sentence in enumerate(sentences):
        if max_sentences <= 0 or index < max_sentences:
            reservoir.append((index, sentence))
        else:
            slot = rng.randint(0, index)
            if slot < max_sentences:
                reservoir[slot] = (index, sentence)
    return [sentence for _, sentence in sorted(reservoir)]


def train(texts: Iterable[str], vocab_size: int, output: Path, source: str, split: str = "train",
          model_type: str = "bpe", max_sentences: int = 0, seed: int = 0, threads: int = 2,
          force: bool = False) -> Tokenizer:
    """Train on ``texts``, then write tokenizer.model + tokenizer_config.json into `output` atomically.

    ``source`` and ``split`` say where the texts come from: tokenizer_config.json records them
    (``trained_on``) and errors name them. A tokenizer already in `output` is replaced only with
    `force` (its shards would no longer match it). Every setting is checked before the first text
    is read, so a lazy iterable (the CLI's opens its source on first use) reports a bad source
    only after the settings, and training, which can take minutes, never starts on a bad one."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output}: is a file, expected a directory")
    existing = [name for name in ("tokenizer.model", "tokenizer_config.json") if (output / name).exists()]
    if existing and not force:
        raise ValueError(f"--output {output}: holds a tokenizer already ({', '.join(existing)}); "
                         f"pass --force to replace it")
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"--model-type: expected bpe or unigram, got '{model_type}'")
    if vocab_size < 300:
        raise ValueError(f"--vocab-size: expected >= 300 (256 byte-fallback pieces + specials), got {vocab_size}")
    if not 1 <= threads <= 1024:
        raise ValueError(f"--threads: expected 1..1024 (SentencePiece's limits), got {threads}")
    sentences = sample(paragraphs(texts), max_sentences, seed)
    if not sentences:
        raise ValueError(f"{source}: split '{split}' has no text to train on")
    log.info("training a %s tokenizer, vocab %d, on %d paragraphs of %s/%s", model_type, vocab_size,
             len(sentences), source, split)

    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size, model_type=model_type,
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True,
        max_sentence_length=4 * MAX_SENTENCE_CHARS + 16, input_sentence_size=0, shuffle_input_sentence=False,
        hard_vocab_limit=False, num_threads=threads, minloglevel=2,
        unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>", pad_piece="<pad>", **SPECIAL_IDS)

    config = {"model_type": model_type, "vocab_size": None, **SPECIAL_IDS, "eod_id": SPECIAL_IDS["eos_id"],
              "add_dummy_prefix": False, "normalization": "identity", "byte_fallback": True,
              "trained_on": {"source": source, "split": split, "sentences": len(sentences),
                             "max_sentences": max_sentences, "seed": seed}}
    config["vocab_size"] = spm.SentencePieceProcessor(model_proto=model.getvalue()).vocab_size()
    if config["vocab_size"] < vocab_size:  # hard_vocab_limit=False: the corpus had fewer distinct pieces
        log.warning("warning: --vocab-size %d: the corpus yields only %d pieces; the tokenizer has %d",
                    vocab_size, config["vocab_size"], config["vocab_size"])

    output.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(output / "tokenizer.model", model.getvalue())
    write_bytes_atomic(output / "tokenizer_config.json", (json.dumps(config, indent=2) + "\n").encode())
    return Tokenizer(output)


if __name__ == "__main__":  # the CLI opens data_prep sources, so it lives above this package (docstring)
    import sys

    from data_prep.train_tokenizer import main

    sys.exit(main())
