"""Train the project's SentencePiece tokenizer on a text source.

    python -m tokenizer.train --input pg19:../shared/data/pg19-mini --vocab-size 8000 --output tok/

`--input` is a source spec of data_prep/sources.py; the documents of `--split` are its training
text (tokenizer/train.py: paragraphs with their newlines, BPE or unigram with byte fallback,
identity normalisation, whitespace kept, so decode(encode(text)) == text). `--max-sentences`
samples that many paragraphs with a seeded reservoir for corpora too big to train on whole. The
same input, options and seed give a byte-identical tokenizer.model.

The command lives here, not in tokenizer/, because it reads data_prep sources while data_prep
tokenizes with the tokenizer package: tokenizer/ stays below data_prep (`python -m
tokenizer.train` forwards to `main`, and `python -m data_prep.train_tokenizer` is the same).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

from tokenizer import Tokenizer
from tokenizer.train import train

from .sources import open_source


def split_texts(source: str, split: str, text_field: str = "text") -> Iterator[str]:
    """The documents of ``split`` of the source ``source``. A generator: the source is opened (and a
    bad spec or missing split raised) on the first ``next``, after `train` has checked its settings."""
    corpus = open_source(source, text_field)
    corpus.require_split(split)
    yield from corpus.documents(split)


def train_on_source(source: str, vocab_size: int, output: Path, model_type: str = "bpe", split: str = "train",
                    max_sentences: int = 0, seed: int = 0, text_field: str = "text", threads: int = 2,
                    force: bool = False) -> Tokenizer:
    """`tokenizer.train.train` on the documents of one split of a source spec (the CLI's function)."""
    return train(split_texts(source, split, text_field), vocab_size, output, source=source, split=split,
                 model_type=model_type, max_sentences=max_sentences, seed=seed, threads=threads, force=force)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenizer.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="source: pg19:PATH | hf:NAME_OR_PATH | jsonl:PATH | synthetic[:docs=N,...] | needles[:...]")
    parser.add_argument("--vocab-size", type=int, required=True, help="vocabulary size (incl. 256 byte pieces)")
    parser.add_argument("--output", type=Path, required=True, help="directory for tokenizer.model + tokenizer_config.json")
    parser.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"], help="default: %(default)s")
    parser.add_argument("--split", default="train", help="split of the source to train on (default: %(default)s)")
    parser.add_argument("--max-sentences", type=int, default=0, help="sample this many paragraphs (0 = all)")
    parser.add_argument("--seed", type=int, default=0, help="sampling/training seed (default: %(default)s)")
    parser.add_argument("--text-field", default="text", help="text column for hf:/jsonl: sources")
    parser.add_argument("--threads", type=int, default=2, help="SentencePiece trainer threads")
    parser.add_argument("--force", action="store_true", help="replace a tokenizer already in --output")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    try:
        tok = train_on_source(args.input, args.vocab_size, args.output, args.model_type, args.split,
                              args.max_sentences, args.seed, args.text_field, args.threads, args.force)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"tokenizer: {tok.model_path} (vocab {tok.vocab_size}, sha256 {tok.sha256[:12]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
