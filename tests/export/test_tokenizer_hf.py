"""tokenizer/hf.py: the exported tokenizer.json encodes exactly like our SentencePiece model."""

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from transformers import AutoTokenizer

from data_prep.train_tokenizer import train_on_source as train
from tokenizer import Tokenizer
from tokenizer.hf import build_hf_tokenizer, export_hf_tokenizer, load_proto, main

EDGE_CASES = [
    "", " ", "  two leading spaces", "trailing spaces   ", "multiple   inner    spaces",
    "\n\nparagraphs\n\n\tindented\tTabs\r\n", "unicode: naïve café — “quotes” 日本語 🎉 \x00 \x7f",
    "digits 1234567 3.14159", "a literal </s> and <s> <pad> <unk> in the text",
]


def assert_encodes_like_sentencepiece(hf, ours: Tokenizer, texts: list[str]) -> None:
    for text in texts:
        expected = ours.encode(text)
        got = hf.encode(text)
        if got != expected:
            first = next(i for i, (a, b) in enumerate(zip(got + [None], expected + [None])) if a != b)
            raise AssertionError(f"{len(text)}-char text: ids differ first at token {first}: "
                                 f"HF {got[first:first + 5]} vs SentencePiece {expected[first:first + 5]}")
        assert hf.decode(got) == text


def test_autotokenizer_matches_sentencepiece_on_pg19_test_books(pg19_tokenizer, pg19_mini, tmp_path):
    export_hf_tokenizer(pg19_tokenizer, tmp_path / "hf")
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf")
    books = sorted((pg19_mini / "test").glob("*.txt"))
    assert books
    texts = [book.read_text(encoding="utf-8") for book in books]
    assert sum(map(len, texts)) > 1_000_000  # whole held-out books, not excerpts
    assert_encodes_like_sentencepiece(hf, Tokenizer(pg19_tokenizer), EDGE_CASES + texts)
    assert hf.bos_token_id == 1 and hf.eos_token_id == 2 and hf.pad_token_id == 3 and hf.unk_token_id == 0


def test_unigram_tokenizer_matches_too(tmp_path):
    train("synthetic:docs=10,seed=3,words=400", 400, tmp_path / "uni", model_type="unigram")
    export_hf_tokenizer(tmp_path / "uni", tmp_path / "hf")
    # The last edge case is the documented Unigram exception (literal control pieces).
    texts = EDGE_CASES[:-1] + [" ".join(EDGE_CASES[:-1]) * 20]
    assert_encodes_like_sentencepiece(AutoTokenizer.from_pretrained(tmp_path / "hf"), Tokenizer(tmp_path / "uni"),
                                      texts)


def test_merge_order_matters(pg19_tokenizer, pg19_mini):
    """Negative control: the same vocabulary with the merges in reverse order encodes differently."""
    tok = build_hf_tokenizer(load_proto(Path(pg19_tokenizer) / "tokenizer.model"))
    spec = json.loads(tok.to_str())
    spec["model"]["merges"] = spec["model"]["merges"][::-1]
    reversed_merges = HFTokenizer.from_str(json.dumps(spec))
    text = (pg19_mini / "test" / "36.txt").read_text(encoding="utf-8")[:20000]
    ours = Tokenizer(pg19_tokenizer).encode(text)
    assert tok.encode(text).ids == ours
    assert reversed_merges.encode(text).ids != ours


def test_cli_writes_files_and_rejects_a_missing_tokenizer(capsys, pg19_tokenizer, tmp_path):
    assert main(["--tokenizer", str(pg19_tokenizer), "--output", str(tmp_path / "out")]) == 0
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"tokenizer.json", "tokenizer_config.json"}
    config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["split_special_tokens"] is True
    capsys.readouterr()
    assert main(["--tokenizer", str(tmp_path / "nothing"), "--output", str(tmp_path / "o2")]) == 2
    stderr = capsys.readouterr().err
    assert "tokenizer.model: missing" in stderr and len(stderr.strip().splitlines()) == 1
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "tokenizer.json" in capsys.readouterr().out
