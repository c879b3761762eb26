"""Train a SentencePiece tokenizer on a text source.

    python -m tokenizer.train --input pg19:../shared/data/pg19-mini --vocab-size 8000 --output tok/

Settings follow DESIGN.md §2: BPE (or unigram) with byte fallback, identity normalisation and
whitespace kept, so decode(encode(text)) == text. Training text is the documents of one split
cut into paragraphs (newlines kept, so the vocabulary learns them); `--max-sentences` samples
that many paragraphs with a seeded reservoir for corpora too big to train on whole. The same
input, options and seed give a byte-identical tokenizer.model.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import random
import sys
from collections.abc import Iterator
from pathlib import Path

import sentencepiece as spm

from fileio import write_bytes_atomic

from data_prep.sources import open_source

from .tokenizer import SPECIAL_IDS, Tokenizer

log = logging.getLogger("tokenizer.train")

MAX_SENTENCE_CHARS = 2000  # SentencePiece drops "sentences" over max_sentence_length (8192 bytes)


def paragraphs(texts: Iterator[str]) -> Iterator[str]:
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


def train(source: str, vocab_size: int, output: Path, model_type: str = "bpe", split: str = "train",
          max_sentences: int = 0, seed: int = 0, text_field: str = "text", threads: int = 2,
          force: bool = False) -> Tokenizer:
    """Train, then write tokenizer.model + tokenizer_config.json into `output` atomically.

    A tokenizer already in `output` is replaced only with `force` (its shards would no longer
    match it); `output` is checked before training, which can take minutes."""
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
    corpus = open_source(source, text_field)
    corpus.require_split(split)
    sentences = sample(paragraphs(corpus.documents(split)), max_sentences, seed)
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
        tok = train(args.input, args.vocab_size, args.output, args.model_type, args.split,
                    args.max_sentences, args.seed, args.text_field, args.threads, args.force)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"tokenizer: {tok.model_path} (vocab {tok.vocab_size}, sha256 {tok.sha256[:12]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
