"""The `needles:` source (data_prep/needles.py) through the real prepare CLI: shards decoded back to
documents whose needles sit at the drawn distances, answers that match, no eval filler, bad input."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from data_prep import needles
from data_prep.indexed import IndexedDataset
from data_prep.manifest import load_manifest, split_prefixes
from data_prep.sources import open_source
from tokenizer import Tokenizer

REPO_ROOT = Path(__file__).resolve().parents[2]
WORDS, FACTS = 300, 3
SPEC = f"needles:docs=200,seed=11,words={WORDS},facts={FACTS}"

NEEDLE = re.compile(r"The pass key is (?P<key>\d+)\. Remember it\. (?P=key) is the pass key\."
                    r"|The code of (?P<name>[A-Z][a-z]+) is (?P<value>\d+)\.")
QUESTION = re.compile(r"What is the pass key\? The pass key is (?P<key>\d+)\."
                      r"|What is the code of (?P<name>[A-Z][a-z]+)\? The code of (?P=name) is (?P<value>\d+)\.")


@pytest.fixture(scope="module")
def prepared(synthetic_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """SPEC prepared with the real CLI; every split's documents decoded back to text."""
    out = tmp_path_factory.mktemp("needles") / "data"
    result = subprocess.run([sys.executable, "-m", "data_prep.prepare", "--source", SPEC, "--tokenizer",
                             str(synthetic_data["tokenizer"]), "--output", str(out), "--workers", "1"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    tok = Tokenizer(synthetic_data["tokenizer"])
    texts = {}
    for split in ("train", "validation", "test"):
        texts[split] = []
        for prefix in split_prefixes(out, split):
            shard = IndexedDataset(prefix)
            for i in range(len(shard)):
                ids = shard[i]
                assert ids[-1] == tok.eod_id
                texts[split].append(tok.decode(ids[:-1].tolist()))
    return {"out": out, "texts": texts}


def parse(text: str) -> dict:
    """A document's parts: intro, body (filler + needles), needles found in the body, question lines."""
    assert text.endswith("\n") and "\n\n" in text, text[-200:]
    *intro, body, block = text[:-1].split("\n\n")
    return {"intro": intro, "body": body, "needles": list(NEEDLE.finditer(body)), "questions": block.split("\n")}


def filler_after(body: str, needle: re.Match) -> int:
    """Filler words between a needle and the questions (other needles in between do not count)."""
    return len(NEEDLE.sub(" ", body[needle.end():]).split())


def test_same_seed_same_documents_other_seed_differs() -> None:
    a = list(open_source("needles:docs=4,seed=5,words=200").documents("train"))
    assert a == list(open_source("needles:docs=4,seed=5,words=200").documents("train"))
    assert a != list(open_source("needles:docs=4,seed=6,words=200").documents("train"))
    assert len(set(a)) == 4
    held_out = list(open_source("needles:docs=4,seed=5,words=200").documents("validation"))
    assert not set(held_out) & set(a)
    # a slice is the same documents as the whole split (what --num-tasks relies on)
    assert list(open_source("needles:docs=4,seed=5,words=200").documents("train", 1, 3)) == a[1:3]


def test_shards_hold_the_generated_documents(prepared: dict) -> None:
    manifest = load_manifest(prepared["out"])
    assert manifest["source"] == SPEC
    assert manifest["splits"]["train"]["needles"] == {"docs": 200, "seed": 11, "words": WORDS, "facts": FACTS}
    source = open_source(SPEC)
    for split, texts in prepared["texts"].items():
        assert len(texts) == source.count(split) == (200 if split == "train" else 10)
        assert texts == list(source.documents(split)), split


def test_needles_at_the_drawn_distances_and_answers_match(prepared: dict) -> None:
    distances = {"passkey": [], "fact": []}
    for text in [text for texts in prepared["texts"].values() for text in texts]:
        doc = parse(text)
        assert doc["intro"] in ([], *[[intro] for intro in needles._INTROS if intro]), doc["intro"]
        keys = {m["key"] for m in doc["needles"] if m["key"]}
        facts = {m["name"]: m["value"] for m in doc["needles"] if m["name"]}
        assert len(keys) == 1 and len(facts) == FACTS and len(doc["needles"]) == 1 + FACTS, doc["body"]
        (key,) = keys
        assert len(key) == 5 and text.count(key) == 3  # twice in the needle, once in the answer

        answers = [QUESTION.fullmatch(line) for line in doc["questions"]]
        assert all(answers) and len(answers) == 1 + FACTS, doc["questions"]
        assert [a["key"] for a in answers if a["key"]] == [key]
        assert {a["name"]: a["value"] for a in answers if a["name"]} == facts

        # Filler words between a needle and the questions lie in [0, WORDS]. needles.py draws d
        # uniformly from [0, WORDS] and puts the needle at the last sentence boundary at most d words
        # from the end, so the bound is exact; the one sentence of slack is on the low side (a needle
        # lands up to one sentence closer than drawn), hence "> 0.9 * WORDS", not "== WORDS", below.
        # The filler as a whole is WORDS words plus less than one sentence (the last one drawn).
        filler = NEEDLE.sub(" ", doc["body"])
        longest = max(len(s.split()) for s in re.split(r"(?<=\.)\s+", filler.strip()))
        assert WORDS <= len(filler.split()) < WORDS + longest
        for needle in doc["needles"]:
            distance = filler_after(doc["body"], needle)
            assert 0 <= distance <= WORDS, (distance, needle.group())
            distances["passkey" if needle["key"] else "fact"].append(distance)

    for kind, found in distances.items():  # spread over the whole range, for passkeys and facts alike
        assert min(found) < WORDS / 10 and max(found) > 0.9 * WORDS, (kind, min(found), max(found))
        per_tenth = Counter(min(9, 10 * d // (WORDS + 1)) for d in found)
        assert all(per_tenth[t] >= len(found) / 10 / 3 for t in range(10)), (kind, sorted(per_tenth.items()))


def eval_prompt_texts() -> dict[str, str]:
    """DESCRIPTION and FILLER of pretrain/eval/passkey.py, read from its source: importing it would
    pull in torch and the whole eval package for two strings."""
    tree = ast.parse((REPO_ROOT / "pretrain" / "eval" / "passkey.py").read_text())
    return {target.id: ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
            for target in node.targets if isinstance(target, ast.Name) and target.id in ("DESCRIPTION", "FILLER")}


def test_digits_only_in_needles_and_answers_and_no_eval_filler(prepared: dict) -> None:
    prompt = eval_prompt_texts()
    eval_sentences = [s.strip() + "." for s in prompt["FILLER"].split(".") if s.strip()]
    assert set(eval_sentences) == needles._EVAL_SENTENCES  # the generator's copy is the eval's list
    description = [s.strip() + "." for s in prompt["DESCRIPTION"].split(".") if s.strip()]
    sentences = Counter()
    for split, texts in prepared["texts"].items():
        for text in texts:
            doc = parse(text)
            rest = " ".join([*doc["intro"], NEEDLE.sub(" ", doc["body"]),
                             *(QUESTION.sub(" ", line) for line in doc["questions"])])
            assert not re.search(r"\d", rest), rest
            for sentence in [*eval_sentences, prompt["DESCRIPTION"], *description]:
                assert sentence not in text, (split, sentence)
            sentences.update(re.split(r"(?<=\.)\s+", NEEDLE.sub(" ", doc["body"]).strip()))
    # varied filler: many different sentences, none dominating
    total = sum(sentences.values())
    assert len(sentences) > 200 and sentences.most_common(1)[0][1] < total / 20, sentences.most_common(3)


BAD_OPTIONS = {
    "docs=0": "docs must be >= 1, got 0",
    "facts=x": "bad option 'facts=x', expected key=integer with key in docs, seed, words, facts",
    "bogus=3": "bad option 'bogus=3', expected key=integer with key in docs, seed, words, facts",
    "words=5": "words must be >= 20, got 5",
    "facts=51": "facts must be in 0..50, got 51",
    "docs=²": "bad option 'docs=²', expected key=integer with key in docs, seed, words, facts",
    "docs=3,docs=4": "option 'docs' given twice",
}
CLI_CHECKED = ["docs=0", "facts=x", "bogus=3"]
"""Through the real CLI (a subprocess each); the others through open_source, whose message prepare prints."""


@pytest.mark.parametrize("options", CLI_CHECKED)
def test_bad_parameters_give_one_line(cli, synthetic_data: dict[str, Path], tmp_path: Path, options: str) -> None:
    """Exit 2 (prepare's code for bad input), one line naming the source and the problem, nothing written."""
    out = tmp_path / "out"
    result = cli("data_prep.prepare", "--source", f"needles:{options}", "--tokenizer", synthetic_data["tokenizer"],
                 "--output", out, check=False)
    assert result.returncode == 2, result
    assert result.stderr.splitlines() == [f"error: needles:{options}: {BAD_OPTIONS[options]}"], result.stderr
    assert not out.exists()


def test_every_bad_parameter_is_named() -> None:
    for options, problem in BAD_OPTIONS.items():
        with pytest.raises(ValueError) as raised:
            open_source(f"needles:{options}")
        assert str(raised.value) == f"needles:{options}: {problem}"
