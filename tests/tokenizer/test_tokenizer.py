"""Tokenizer: exact round trips, determinism, piecewise encoding equal to whole-text encoding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tokenizer import SPECIAL_IDS, Tokenizer, piece_boundaries

TRICKY = [
    "",
    " ",
    "   leading spaces and trailing   ",
    "tabs\tand\n\nblank lines\n\n\n    indented code\n",
    "unicode: café naïve Ærøskøbing — “quotes” … 日本語のテキスト 🙂 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "control \x00 \x07 and combining e\u0301 vs é",
    "digits 1234567890 3.14159 and runs of spaces:          end",
]


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_is_exact(pg19_tokenizer: Path, text: str) -> None:
    tok = Tokenizer(pg19_tokenizer)
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode_long(text * 3000)) == text * 3000


def test_round_trip_on_held_out_books(pg19_tokenizer: Path, pg19_mini: Path) -> None:
    tok = Tokenizer(pg19_tokenizer)
    for book in sorted((pg19_mini / "test").glob("*.txt")):
        text = book.read_text(encoding="utf-8")
        assert tok.decode(tok.encode_long(text)) == text, book


def test_piecewise_encoding_equals_whole_text(pg19_tokenizer: Path, pg19_mini: Path) -> None:
    """encode_long cuts books into ~10k-char pieces; the ids must equal whole-book encoding."""
    tok = Tokenizer(pg19_tokenizer)
    books = sorted((pg19_mini / "validation").glob("*.txt")) + sorted((pg19_mini / "test").glob("*.txt"))[:1]
    for book in books:
        text = book.read_text(encoding="utf-8")
        assert len(piece_boundaries(text)) > 10  # the book really is cut
        np.testing.assert_array_equal(tok.encode_long(text), np.array(tok.encode(text)), err_msg=str(book))
    # Worst cases for the cut rule: long runs of spaces, and no space at all.
    for text in ["word" + " " * 30 + "x" * 20_000 + "   tail " * 3000, "y" * 25_000 + "\n" * 5 + "z" * 12_000]:
        np.testing.assert_array_equal(tok.encode_long(text), np.array(tok.encode(text)))


def test_special_ids_and_config(pg19_tokenizer: Path) -> None:
    tok = Tokenizer(pg19_tokenizer)
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == tuple(SPECIAL_IDS.values())
    assert tok.eod_id == tok.eos_id
    assert tok.vocab_size == tok.config["vocab_size"] == 4000
    assert tok.encode_batch(["a b", "c"]) == [tok.encode("a b"), tok.encode("c")]
    assert tok.id_to_piece(tok.pad_id) == "<pad>"


def test_same_seed_gives_identical_model(cli, pg19_mini: Path, tmp_path: Path) -> None:
    for name in ("a", "b"):
        cli("tokenizer.train", "--input", f"pg19:{pg19_mini}", "--split", "validation", "--vocab-size", "1000",
            "--max-sentences", "3000", "--seed", "3", "--model-type", "unigram", "--output", tmp_path / name)
    assert (tmp_path / "a/tokenizer.model").read_bytes() == (tmp_path / "b/tokenizer.model").read_bytes()
    tok = Tokenizer(tmp_path / "a")
    assert tok.config["model_type"] == "unigram" and tok.config["trained_on"]["sentences"] == 3000
    text = (pg19_mini / "test").glob("*.txt").__next__().read_text()[:50_000]
    assert tok.decode(tok.encode_long(text)) == text
    np.testing.assert_array_equal(tok.encode_long(text), np.array(tok.encode(text)))


def test_bad_input_is_one_clear_line(cli, tmp_path: Path) -> None:
    result = cli("tokenizer.train", "--input", f"pg19:{tmp_path}/nowhere", "--vocab-size", "1000",
                 "--output", tmp_path / "tok", check=False)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == f"error: {tmp_path}/nowhere: PG19 directory not found"
    assert not (tmp_path / "tok").exists()
    with pytest.raises(ValueError, match="tokenizer.model: missing"):
        Tokenizer(tmp_path)


def test_existing_tokenizer_or_file_output_is_refused_before_training(cli, tmp_path: Path) -> None:
    args = ("--input", "synthetic:docs=5,seed=3,words=200", "--vocab-size", "400")
    cli("tokenizer.train", *args, "--output", tmp_path / "tok")
    model = (tmp_path / "tok" / "tokenizer.model").read_bytes()
    again = cli("tokenizer.train", *args, "--seed", "9", "--output", tmp_path / "tok", check=False)
    assert again.returncode != 0
    assert again.stderr.strip().splitlines()[-1] == (f"error: --output {tmp_path}/tok: holds a tokenizer already "
                                                     "(tokenizer.model, tokenizer_config.json); pass --force to replace it")
    assert (tmp_path / "tok" / "tokenizer.model").read_bytes() == model  # untouched
    cli("tokenizer.train", *args, "--seed", "9", "--force", "--output", tmp_path / "tok")
    (tmp_path / "file").write_text("not a directory")
    as_file = cli("tokenizer.train", *args, "--output", tmp_path / "file", check=False)
    assert as_file.returncode != 0
    assert as_file.stderr.strip().splitlines()[-1] == f"error: --output {tmp_path}/file: is a file, expected a directory"
