"""`manifest.json`: what a prepared dataset directory holds, and proof that it is intact.

    {
      "format": "megatron-indexed-v1", "tool_version": "0.1.0",
      "source": "pg19:../shared/data/pg19-mini",
      "source_identity": {"files": 17, "sha256": ...},   # what the source held when prepare started
      "tokenizer": {"sha256": ..., "vocab_size": 8000, "eod_id": 2, "model_type": "bpe"},
      "dtype": "uint16", "shard_size_mb": 256,
      "task": null,                       # or {"index": i, "count": k} for one SLURM array task
      "decode_errors": {"train/123.txt": 2},
      "splits": {
        "train": {
          "complete": true, "source_documents": 14, "documents": 14, "empty_documents": 0,
          "tokens": 3912345,
          "shards": [{"name": "shard_00000", "first_document": 0, "source_documents": 14,
                      "documents": 14, "tokens": 3912345,
                      "bin_sha256": ..., "idx_sha256": ..., "bin_bytes": 7824690}],
          "books": [["11", "Alice's Adventures in Wonderland by Lewis Carroll"], ...]   # pg19 only
        }
      }
    }

`first_document`/`source_documents` count documents of the source (empty ones included), so a
resumed run knows where the next shard starts. The manifest holds no timings, so an
interrupted-and-resumed run produces a byte-identical manifest. It is rewritten atomically
after every completed shard; a shard not listed in it does not exist as far as readers care.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from fileio import read_json

MANIFEST = "manifest.json"
FORMAT = "megatron-indexed-v1"
FINGERPRINT_KEYS = ("format", "source", "source_identity", "tokenizer", "dtype", "shard_size_mb", "task")
"""Keys that identify a dataset: a directory whose manifest differs in any is another dataset."""


REQUIRED_KEYS = ("format", "source", "tokenizer", "dtype", "shard_size_mb", "splits")
"""Keys every manifest has (`source_identity` and `task` came later or are optional)."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def load_manifest(data_dir: str | Path, name: str = MANIFEST) -> dict[str, Any]:
    """Read a dataset's manifest; ValueError naming the file if it is missing or malformed."""
    path = Path(data_dir) / name
    if not path.is_file():
        raise ValueError(f"{path}: missing (prepare the data with `python -m data_prep.prepare`)")
    manifest = read_json(path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or "splits" not in manifest:
        raise ValueError(f"{path}: not a data_prep manifest (expected format '{FORMAT}')")
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing:
        raise ValueError(f"{path}: missing key(s) {', '.join(missing)} (a manifest of another version, or edited?)")
    return manifest


def split_prefixes(data_dir: str | Path, split: str) -> list[Path]:
    """Shard prefixes (`<dir>/<split>/shard_NNNNN`) of a completely prepared split, in order."""
    manifest = load_manifest(data_dir)
    entry = manifest["splits"].get(split)
    if entry is None or not entry["complete"]:
        state = "incomplete" if entry else "absent"
        raise ValueError(f"{Path(data_dir) / MANIFEST}: split '{split}' is {state} (rerun prepare to finish it)")
    return [Path(data_dir) / split / shard["name"] for shard in entry["shards"]]


def split_identity(data_dir: str | Path, split: str) -> str:
    """A hash of the shards a split holds (their sha256s, in order): the same data wherever it lives."""
    shards = load_manifest(data_dir)["splits"][split]["shards"]
    return hashlib.sha256("".join(s["bin_sha256"] + s["idx_sha256"] for s in shards).encode()).hexdigest()


def fingerprint(manifest: dict[str, Any]) -> dict[str, Any]:
    return {key: manifest.get(key) for key in FINGERPRINT_KEYS}
