"""Check a prepared dataset directory against its manifest.

    python -m data_prep.verify data/ [more/ ...]      # several: the sources of a blend (data.blend)

For every shard listed in manifest.json (or manifest.task_*.json): the .idx header (magic,
version, dtype code matching the manifest), pointer consistency (each sequence starts where the
previous ends, the last ends at the end of the .bin, the document index is 0..S), every token id
below the tokenizer's vocab size, document/token counts and sha256 of both files. The manifest
itself: at least one split, every split complete, each split's document and token totals equal to
its shards', and no .bin/.idx in the split directories that no manifest lists. Several
directories (a blend's sources) must also share one tokenizer. Exits 1 naming the first bad file
and what is wrong; 0 with one summary line per directory when everything holds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from .indexed import IndexedDataset
from .manifest import MANIFEST, load_manifest, sha256_file


def check_token_ids(data: IndexedDataset, vocab_size: int) -> None:
    """Raise ValueError naming the .bin file when a token id is >= ``vocab_size`` (one pass over the tokens)."""
    if data.num_tokens:
        top = int(data.tokens.max())
        if top >= vocab_size:
            position = int(np.argmax(data.tokens >= vocab_size))
            raise ValueError(f"{data.prefix.with_suffix('.bin')}: token id {top} at position {position} >= vocab "
                             f"size {vocab_size}")


def verify_shard(prefix: Path, shard: dict[str, Any], dtype: str, vocab_size: int) -> None:
    """Raise ValueError naming the file at the first problem."""
    data = IndexedDataset(prefix)  # checks magic, version, dtype code, .idx and .bin sizes
    idx, bin_ = prefix.with_suffix(".idx"), prefix.with_suffix(".bin")
    if data.dtype.name != dtype:
        raise ValueError(f"{idx}: dtype {data.dtype.name}, manifest says {dtype}")
    lengths = data.sequence_lengths.astype(np.int64)
    expected_pointers = np.concatenate([[0], np.cumsum(lengths)[:-1]]) * data.dtype.itemsize
    if not np.array_equal(data.sequence_pointers, expected_pointers[:len(lengths)]):
        bad = int(np.argmax(data.sequence_pointers != expected_pointers[:len(lengths)]))
        raise ValueError(f"{idx}: sequence {bad} starts at byte {int(data.sequence_pointers[bad])}, expected {int(expected_pointers[bad])}")
    if not np.array_equal(data.document_indices, np.arange(len(lengths) + 1)):
        raise ValueError(f"{idx}: document index is not 0..{len(lengths)} (one sequence per document)")
    if len(data) != shard["documents"] or data.num_tokens != shard["tokens"]:
        raise ValueError(f"{idx}: {len(data)} documents / {data.num_tokens} tokens, manifest says "
                         f"{shard['documents']} / {shard['tokens']}")
    check_token_ids(data, vocab_size)
    for path, key in ((bin_, "bin_sha256"), (idx, "idx_sha256")):
        if sha256_file(path) != shard[key]:
            raise ValueError(f"{path}: sha256 differs from the manifest (file changed or corrupted)")


def _verify_manifest(data_dir: Path, name: str, manifest: dict[str, Any], listed: set[Path]) -> tuple[int, int]:
    """Check one manifest's splits and shards; adds its shard files to ``listed``; returns (shards, tokens)."""
    shards = tokens = 0
    if not manifest["splits"]:
        raise ValueError(f"{data_dir / name}: lists no split (prepare stopped before its first split was done; "
                         f"rerun it)")
    for split, entry in manifest["splits"].items():
        if not entry["complete"]:
            raise ValueError(f"{data_dir / name}: split '{split}' is incomplete (rerun prepare)")
        for key in ("documents", "tokens"):
            held = sum(shard[key] for shard in entry["shards"])
            if held != entry[key]:
                raise ValueError(f"{data_dir / name}: split '{split}' counts {entry[key]} {key}, its listed "
                                 f"shards hold {held} (a shard entry missing or changed)")
        for shard in entry["shards"]:
            verify_shard(data_dir / split / shard["name"], shard, manifest["dtype"], manifest["tokenizer"]["vocab_size"])
            listed.update(data_dir / split / f"{shard['name']}{suffix}" for suffix in (".bin", ".idx"))
            shards += 1
            tokens += shard["tokens"]
    return shards, tokens


def verify(data_dir: Path) -> str:
    """Verify every manifest in `data_dir`; return a one-line summary, raise ValueError on the first problem."""
    names = [MANIFEST] if (data_dir / MANIFEST).exists() else sorted(p.name for p in data_dir.glob("manifest.task_*.json"))
    if not names:
        load_manifest(data_dir)  # raises the standard "missing" error
    shards = tokens = 0
    listed: set[Path] = set()
    for name in names:
        manifest = load_manifest(data_dir, name)
        try:
            counts = _verify_manifest(data_dir, name, manifest, listed)
        except (KeyError, TypeError) as e:  # an entry missing a field, or of the wrong kind
            raise ValueError(f"{data_dir / name}: malformed entry ({type(e).__name__}: {e})") from None
        shards, tokens = shards + counts[0], tokens + counts[1]
    for path in sorted(data_dir.glob("*/*")):  # temp files (dot-prefixed) of a killed run are not shards
        if path.suffix in (".bin", ".idx") and not path.name.startswith(".") and path not in listed:
            raise ValueError(f"{path}: a shard file that {', '.join(names)} does not list")
    return f"OK: {data_dir}: {shards} shard(s), {tokens:,} tokens verified against {', '.join(names)}"


def check_one_tokenizer(data_dirs: list[Path]) -> None:
    """ValueError naming the first directory whose tokenizer differs from the first's (a blend needs one)."""
    first = load_manifest(data_dirs[0])["tokenizer"]["sha256"]
    for data_dir in data_dirs[1:]:
        other = load_manifest(data_dir)["tokenizer"]["sha256"]
        if other != first:
            raise ValueError(f"{data_dir / MANIFEST}: made with another tokenizer than {data_dirs[0]} "
                             f"(sha256 {other[:12]} != {first[:12]})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.verify", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dirs", type=Path, nargs="+", metavar="data_dir",
                        help="directory written by `python -m data_prep.prepare` (several: a blend's sources)")
    args = parser.parse_args(argv)
    try:
        for data_dir in args.data_dirs:
            print(verify(data_dir))
        if len(args.data_dirs) > 1:
            check_one_tokenizer(args.data_dirs)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
