"""A prepare resumed or rerun after its source changed refuses to mix old and new content."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from data_prep.manifest import load_manifest

from ..conftest import run_cli


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def prepare(source: Path, tokenizer: Path, output: Path, *extra: str, check: bool = True):
    return run_cli("data_prep.prepare", "--source", f"pg19:{source}", "--tokenizer", tokenizer, "--output", output,
                   "--workers", "1", *extra, check=check)


def test_source_changed_between_runs_is_refused(pg19_mini: Path, synthetic_data, tmp_path: Path):
    source, out = tmp_path / "pg19", tmp_path / "data"
    shutil.copytree(pg19_mini, source)
    tokenizer = synthetic_data["tokenizer"]
    prepare(source, tokenizer, out, "--splits", "train")  # as a run killed after its first split

    removed = sorted((source / "validation").glob("*.txt"))[0]
    removed.unlink()
    before = digests(out)
    refused = prepare(source, tokenizer, out, check=False)
    assert refused.returncode != 0
    line = refused.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {out}: holds a different dataset") and "the source's files changed" in line, line
    assert "pass --force" in line
    assert digests(out) == before  # nothing touched

    prepare(source, tokenizer, out, "--force")
    books = {split: [book for book, _ in entry["books"]] for split, entry in load_manifest(out)["splits"].items()}
    assert books == {split: sorted((p.stem for p in (source / split).glob("*.txt")), key=int)
                     for split in ("train", "validation", "test")}
    assert removed.stem not in books["validation"]

    shutil.copy(pg19_mini / "validation" / removed.name, removed)  # a book added after a complete run
    complete = digests(out)
    refused = prepare(source, tokenizer, out, check=False)
    assert refused.returncode != 0 and "the source's files changed" in refused.stderr
    assert digests(out) == complete
