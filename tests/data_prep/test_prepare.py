"""prepare / verify / merge through their real CLIs: content, sources, resume after kill -9, bad input."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_prep.indexed import IndexedDataset
from data_prep.manifest import load_manifest, split_prefixes
from data_prep.sources import open_source
from tokenizer import Tokenizer

REPO_ROOT = Path(__file__).resolve().parents[2]


def documents(data_dir: Path, split: str) -> list[np.ndarray]:
    return [np.array(shard[i]) for prefix in split_prefixes(data_dir, split)
            for shard in [IndexedDataset(prefix)] for i in range(len(shard))]


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_pg19_shards_hold_the_books_exactly(cli, pg19_mini: Path, pg19_tokenizer: Path, tmp_path: Path) -> None:
    out = tmp_path / "data"
    result = cli("data_prep.prepare", "--source", f"pg19:{pg19_mini}", "--tokenizer", pg19_tokenizer,
                 "--output", out, "--splits", "validation,test", "--shard-size-mb", "0.1")
    assert "tokens/s" in result.stdout and "MB/s" in result.stdout
    tok = Tokenizer(pg19_tokenizer)
    manifest = load_manifest(out)
    assert manifest["tokenizer"]["sha256"] == tok.sha256 and manifest["dtype"] == "uint16"
    for split in ("validation", "test"):
        books = sorted((pg19_mini / split).glob("*.txt"), key=lambda p: int(p.stem))
        docs = documents(out, split)
        assert len(docs) == len(books)
        for doc, book in zip(docs, books):
            assert doc[-1] == tok.eod_id
            assert tok.decode(doc[:-1]) == book.read_text(encoding="utf-8")
        titles = dict(line.split(",")[:2] for line in (pg19_mini / "metadata.csv").read_text().splitlines())
        assert manifest["splits"][split]["books"] == [[b.stem, titles[b.stem]] for b in books]
        assert len(manifest["splits"][split]["shards"]) == len(books)  # 0.1 MB shards: one book each
    assert "OK" in cli("data_prep.verify", out).stdout


def test_hf_and_jsonl_sources(cli, synthetic_data: dict[str, Path], tmp_path: Path) -> None:
    import datasets

    texts = {"train": ["first document\n\nwith two paragraphs", "", "third  one ü"], "validation": ["held out"]}
    files = tmp_path / "files"
    files.mkdir()
    for split, rows in texts.items():
        datasets.Dataset.from_dict({"body": rows}).to_parquet(files / f"{split}.parquet")
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    datasets.DatasetDict({s: datasets.Dataset.from_dict({"text": r}) for s, r in texts.items()}).save_to_disk(tmp_path / "saved")

    tok = Tokenizer(synthetic_data["tokenizer"])
    for name, source, extra in [("parquet", f"hf:{files}", ["--text-field", "body"]), ("saved", f"hf:{tmp_path / 'saved'}", []),
                                ("jsonl", f"jsonl:{tmp_path}", [])]:
        out = tmp_path / f"out_{name}"
        cli("data_prep.prepare", "--source", source, "--tokenizer", synthetic_data["tokenizer"], "--output", out,
            "--workers", "1", *extra)
        manifest = load_manifest(out)
        assert sorted(manifest["splits"]) == ["train", "validation"], name
        assert manifest["splits"]["train"]["empty_documents"] == 1
        for split, rows in texts.items():
            assert [tok.decode(d[:-1]) for d in documents(out, split)] == [t for t in rows if t], name


def test_synthetic_is_deterministic_per_seed() -> None:
    a = list(open_source("synthetic:docs=3,seed=5,words=400").documents("train"))
    b = list(open_source("synthetic:docs=3,seed=5,words=400").documents("train"))
    c = list(open_source("synthetic:docs=3,seed=6,words=400").documents("train"))
    assert a == b and a != c
    assert len(set(a)) == 3 and all(len(d.split()) > 300 for d in a)
    held_out = list(open_source("synthetic:docs=3,seed=5,words=400").documents("validation"))
    assert not set(held_out) & set(a)
    for doc in a:  # long-range structure: the passkey stated early is asked for at the end
        key = doc.split("The pass key is ")[1][:5]
        assert doc.rstrip().endswith(f"The pass key is {key}.") and doc.count(key) == 3


def _prepare_cmd(data: dict[str, Path], out: Path) -> list[str]:
    return [sys.executable, "-m", "data_prep.prepare", "--source", "synthetic:docs=120,seed=3,words=2000",
            "--tokenizer", str(data["tokenizer"]), "--output", str(out), "--shard-size-mb", "0.05", "--workers", "2"]


def _shards_listed(out: Path) -> int:
    try:
        return sum(len(e["shards"]) for e in json.loads((out / "manifest.json").read_text())["splits"].values())
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


@pytest.mark.slow
def test_workers_give_the_in_process_ids_in_document_order(synthetic_data: dict[str, Path]) -> None:
    """Pieces batched over worker processes come back joined per document, empty documents included."""
    from data_prep.prepare import PIECES_PER_TASK, encode_documents

    tokenizer = Tokenizer(synthetic_data["tokenizer"])
    corpus = open_source("synthetic:docs=8,seed=3,words=12000", "text")
    texts = list(corpus.documents("train", 0, corpus.count("train")))
    texts = ["", texts[0], "", "", *texts[1:], "short", ""]  # empty ones first, between and last
    expected = [tokenizer.encode_long(t, np.uint16) if t else np.zeros(0, np.uint16) for t in texts]
    assert sum(len(t) // 10_000 for t in texts) > 2 * PIECES_PER_TASK  # several tasks, documents spanning them
    got = list(encode_documents(iter(texts), tokenizer, workers=2, dtype=np.dtype(np.uint16)))
    assert len(got) == len(expected)
    for ours, want in zip(got, expected):
        assert ours.dtype == np.uint16 and np.array_equal(ours, want)


@pytest.mark.slow
def test_kill_9_then_rerun_is_byte_identical(synthetic_data: dict[str, Path], tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    subprocess.run(_prepare_cmd(synthetic_data, reference), check=True, capture_output=True, cwd=REPO_ROOT)
    total = _shards_listed(reference)
    assert total >= 12

    out = tmp_path / "killed"
    kill_after = [0, 2, 6, total - 3]  # shards listed in the manifest when SIGKILL lands (0: during start-up)
    for target in kill_after:
        proc = subprocess.Popen(_prepare_cmd(synthetic_data, out), cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 120
        while _shards_listed(out) < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)  # the workers die too
        proc.wait()
        assert _shards_listed(out) < total, f"run finished before the kill at {target} shards"
    resumed = subprocess.run(_prepare_cmd(synthetic_data, out), check=True, capture_output=True, text=True, cwd=REPO_ROOT)
    assert "skipping" in resumed.stderr or _shards_listed(out) == total
    assert tree_digest(out) == tree_digest(reference)


def test_array_tasks_then_merge_equal_one_process(cli, synthetic_data: dict[str, Path], tmp_path: Path) -> None:
    source = "synthetic:docs=23,seed=9,words=300"
    cli("data_prep.prepare", "--source", source, "--tokenizer", synthetic_data["tokenizer"], "--output", tmp_path / "one", "--workers", "1")
    tasks = [subprocess.Popen([sys.executable, "-m", "data_prep.prepare", "--source", source, "--tokenizer",
                               str(synthetic_data["tokenizer"]), "--output", str(tmp_path / "many"), "--workers", "1",
                               "--num-tasks", "3", "--task-index", str(task)], cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True)
             for task in range(3)]  # concurrently, as array tasks run
    for task in tasks:
        assert task.wait(timeout=300) == 0, task.stderr.read()
    assert _last_line(cli("data_prep.merge", tmp_path / "one", check=False)) == f"error: {tmp_path / 'one'}: no manifest.task_*.json to merge"
    (tmp_path / "many" / "manifest.task_00001.json").rename(tmp_path / "task1.json")
    assert "missing task(s) [1]" in _last_line(cli("data_prep.merge", tmp_path / "many", check=False))
    (tmp_path / "task1.json").rename(tmp_path / "many" / "manifest.task_00001.json")
    cli("data_prep.merge", tmp_path / "many")
    cli("data_prep.verify", tmp_path / "many")
    for split in ("train", "validation", "test"):
        ours, theirs = documents(tmp_path / "one", split), documents(tmp_path / "many", split)
        assert len(ours) == len(theirs) > 0
        assert all(np.array_equal(a, b) for a, b in zip(ours, theirs))
    assert len(split_prefixes(tmp_path / "many", "train")) == 3


def _last_line(result: subprocess.CompletedProcess) -> str:
    """The CLI's one-line error (stderr may also hold log lines before it)."""
    assert result.returncode != 0, result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, f"expected exactly one error line, stderr was:\n{result.stderr}"
    return errors[0]


def test_bad_sources_fail_with_one_line_and_no_output(cli, synthetic_data: dict[str, Path], pg19_mini: Path, tmp_path: Path) -> None:
    tok = synthetic_data["tokenizer"]
    out = tmp_path / "out"

    def prepare(source: str, tokenizer: Path = tok) -> str:
        return _last_line(cli("data_prep.prepare", "--source", source, "--tokenizer", tokenizer, "--output", out, check=False))

    assert prepare(f"pg19:{tmp_path}/missing") == f"error: {tmp_path}/missing: PG19 directory not found"
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metadata.csv").write_text("")
    assert prepare(f"pg19:{tmp_path}/empty") == f"error: {tmp_path}/empty: no <id>.txt books in train/, validation/ or test/"
    broken = tmp_path / "broken"
    shutil.copytree(pg19_mini / "validation", broken / "validation")
    (broken / "metadata.csv").write_text("768,Some title,1850,http://x\nnot-a-number;title\n")
    assert prepare(f"pg19:{broken}") == f"error: {broken}/metadata.csv:2: malformed row, expected 'id,title,year,url' with a numeric id"
    assert prepare(f"pg19:{pg19_mini}", tmp_path / "no_tokenizer") == f"error: {tmp_path}/no_tokenizer/tokenizer.model: missing (train one with `python -m tokenizer.train`)"
    assert prepare("books:/x").startswith("error: source 'books:/x': expected pg19:PATH")
    assert prepare("synthetic:docs=ten").startswith("error: synthetic:docs=ten: bad option 'docs=ten'")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": broken\n')
    assert prepare(f"jsonl:{tmp_path / 'bad.jsonl'}").startswith(f"error: {tmp_path / 'bad.jsonl'}:2: invalid JSON")
    assert not out.exists() or not any(p.suffix in (".bin", ".idx") for p in out.rglob("*"))


def test_invalid_utf8_is_replaced_and_reported(cli, synthetic_data: dict[str, Path], tmp_path: Path) -> None:
    root = tmp_path / "pg"
    (root / "train").mkdir(parents=True)
    (root / "metadata.csv").write_text("1,Good,1900,u\n2,Bad,1900,u\n")
    (root / "train" / "1.txt").write_text("clean text\n")
    (root / "train" / "2.txt").write_bytes(b"caf\xe9 and \xff\xfe bytes\n")
    result = cli("data_prep.prepare", "--source", f"pg19:{root}", "--tokenizer", synthetic_data["tokenizer"],
                 "--output", tmp_path / "out", "--workers", "1")
    assert "2.txt: 3 invalid UTF-8 byte sequence(s) replaced by U+FFFD" in result.stderr
    assert load_manifest(tmp_path / "out")["decode_errors"] == {"train/2.txt": 3}
    tok = Tokenizer(synthetic_data["tokenizer"])
    assert tok.decode(documents(tmp_path / "out", "train")[1][:-1]) == "caf\ufffd and \ufffd\ufffd bytes\n"


def test_output_holding_another_dataset_is_refused(cli, synthetic_data: dict[str, Path], pg19_tokenizer: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["--source", "synthetic:docs=4,seed=1,words=200", "--output", out, "--workers", "1"]
    cli("data_prep.prepare", *args, "--tokenizer", synthetic_data["tokenizer"])
    before = tree_digest(out)
    line = _last_line(cli("data_prep.prepare", *args, "--tokenizer", pg19_tokenizer, check=False))
    assert line.startswith(f"error: {out}: holds a different dataset (tokenizer: vocab 512 ") and "vocab 4000" in line
    assert line.endswith("pass --force to replace it")
    assert tree_digest(out) == before  # nothing overwritten
    cli("data_prep.prepare", *args, "--tokenizer", pg19_tokenizer, "--force")
    assert load_manifest(out)["tokenizer"]["vocab_size"] == 4000
    cli("data_prep.verify", out)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert "holds files that are not a data_prep dataset" in _last_line(cli("data_prep.prepare", *args[:2], "--output", foreign,
                                                           "--tokenizer", pg19_tokenizer, check=False))


def test_verify_names_the_first_bad_file(cli, synthetic_data: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "data"
    shutil.copytree(synthetic_data["data"], out)
    cli("data_prep.verify", out)
    idx = out / "train" / "shard_00000.idx"
    raw = bytearray(idx.read_bytes())
    raw[0:7] = b"BADMAGC"
    idx.write_bytes(bytes(raw))
    assert _last_line(cli("data_prep.verify", out, check=False)) == f"error: {idx}: bad header: magic b'BADMAGC\\x00\\x00', expected b'MMIDIDX\\x00\\x00'"
    shutil.copy(synthetic_data["data"] / "train" / "shard_00000.idx", idx)
    binary = out / "validation" / "shard_00000.bin"
    binary.write_bytes(binary.read_bytes()[:-2])
    assert _last_line(cli("data_prep.verify", out, check=False)).startswith(f"error: {binary}: truncated or padded")
    shutil.copy(synthetic_data["data"] / "validation" / "shard_00000.bin", binary)
    tokens = np.fromfile(binary, dtype=np.uint16)
    tokens[5] = 600  # >= vocab 512, same file size
    tokens.tofile(binary)
    assert _last_line(cli("data_prep.verify", out, check=False)) == f"error: {binary}: token id 600 at position 5 >= vocab size 512"
    tokens[5] = 7
    tokens.tofile(binary)
    assert "sha256 differs" in _last_line(cli("data_prep.verify", out, check=False))
    assert _last_line(cli("data_prep.verify", tmp_path, check=False)) == f"error: {tmp_path}/manifest.json: missing (prepare the data with `python -m data_prep.prepare`)"


def test_verify_checks_the_manifest_against_the_shards(cli, synthetic_data: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "data"
    shutil.copytree(synthetic_data["data"], out)
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    extra = out / "test" / "shard_00042.bin"
    shutil.copy(out / "test" / "shard_00000.bin", extra)
    assert _last_line(cli("data_prep.verify", out, check=False)) == (
        f"error: {extra}: a shard file that manifest.json does not list")
    extra.unlink()
    dropped = json.loads(json.dumps(manifest))
    dropped["splits"]["train"]["shards"].pop()
    manifest_path.write_text(json.dumps(dropped))
    assert "split 'train' counts" in _last_line(cli("data_prep.verify", out, check=False))
    manifest_path.write_text(json.dumps({**manifest, "splits": {}}))  # killed before its first split was done
    assert _last_line(cli("data_prep.verify", out, check=False)) == (
        f"error: {manifest_path}: lists no split (prepare stopped before its first split was done; rerun it)")
    manifest_path.write_text(json.dumps(manifest))
    assert "OK" in cli("data_prep.verify", out).stdout
