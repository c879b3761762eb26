"""Tokenize a text source into Megatron-compatible .bin/.idx shards with a checksummed manifest.

    python -m data_prep.prepare --source pg19:../shared/data/pg19-mini --tokenizer tok/ --output data/

writes `data/<split>/shard_00000.{bin,idx}`, ... and `data/manifest.json` (see manifest.py).
One sequence per document with the EOD id appended; empty documents are skipped and counted.

Parallelism: documents are cut into ~10k-character pieces at guaranteed token boundaries
(tokenizer.piece_boundaries) and the pieces are spread over `--workers` processes, so one long
book keeps every worker busy; each task carries PIECES_PER_TASK pieces and results come back as
numpy arrays, in order. At most a bounded number of tasks is in flight, so memory stays flat
however large the corpus.

Resume: the manifest is rewritten (atomically) after every completed shard. Rerunning the same
command after a kill skips the shards it lists (after checking their sha256) and continues with
the next document; since shard boundaries depend only on the data, the result is byte-identical
to an uninterrupted run. A directory holding a different dataset is refused without --force,
and so is one made from the same source whose content has changed since (`source_identity`:
names, sizes and mtimes of its files, or the fingerprints `datasets` keeps), whether the first
run was interrupted (a resume would mix old and new books) or complete (new books would be ignored).

SLURM array jobs: `--num-tasks K --task-index I` prepares only the I-th of K contiguous slices of
each split, into shards `shard_IIIII_NNNNN` and `manifest.task_IIIII.json`; `python -m
data_prep.merge DIR` then joins them into one manifest.json in task order, which is the order
of a single-process run.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import multiprocessing as mp
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from fileio import temp_owner, write_json_atomic
from tokenizer import Tokenizer, piece_boundaries

from .indexed import IndexedDatasetBuilder, optimal_dtype
from .manifest import FORMAT, MANIFEST, fingerprint, load_manifest, sha256_file
from .sources import SPLITS, open_source

TOOL_VERSION = "0.1.0"
log = logging.getLogger("data_prep.prepare")

_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_dir: Path) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(tokenizer_dir)


PIECES_PER_TASK = 16
"""Pieces per worker task. With one piece per task the parent's pickling and thread wake-ups took
a third of a core from the workers (measured on pg19-mini: 67% of the tokenizer ceiling against
94% with 16, benchmarks/results/data_prep.json)."""


def _encode_pieces(pieces: list[str], dtype: np.dtype) -> list[np.ndarray]:
    return [np.asarray(ids, dtype=dtype) for ids in _worker_tokenizer.sp.encode(pieces)]


def encode_documents(texts: Iterable[str], tokenizer: Tokenizer, workers: int, dtype: np.dtype) -> Iterator[np.ndarray]:
    """Token ids of each text, in order, encoded piecewise over `workers` processes."""
    if workers <= 1:
        for text in texts:
            yield tokenizer.encode_long(text, dtype) if text else np.zeros(0, dtype)
        return
    piece_counts: deque[int] = deque()  # pieces of each document not yet yielded, in document order

    def cut(texts: Iterable[str]) -> Iterator[str]:
        for text in texts:
            ends = piece_boundaries(text) if text else []
            piece_counts.append(len(ends))
            yield from (text[a:b] for a, b in zip([0, *ends[:-1]], ends))

    pieces = cut(texts)
    max_in_flight = 2 * workers  # tasks: bounds memory however large the corpus
    encoded: list[np.ndarray] = []  # pieces back from the workers, in order, not yet joined into documents
    with mp.get_context("fork").Pool(workers, _init_worker, (tokenizer.directory,)) as pool:
        pending: deque = deque()
        while True:
            batch = list(itertools.islice(pieces, PIECES_PER_TASK))
            if batch:
                pending.append(pool.apply_async(_encode_pieces, (batch, dtype)))
            if pending and (not batch or len(pending) > max_in_flight):
                encoded.extend(pending.popleft().get())
            while piece_counts and len(encoded) >= piece_counts[0]:
                count = piece_counts.popleft()
                yield np.concatenate(encoded[:count]) if count else np.zeros(0, dtype)
                del encoded[:count]
            if not batch and not pending:
                return


def _open_output(output: Path, manifest_name: str, header: dict[str, Any], force: bool) -> dict[str, Any]:
    """The manifest to continue from: the existing one if it is the same dataset, else a fresh one."""
    output.mkdir(parents=True, exist_ok=True)
    if (output / manifest_name).exists():
        existing = load_manifest(output, manifest_name)
        if fingerprint(existing) == fingerprint(header):
            return existing
        if not force:
            differing = [f"{key}: {existing.get(key)!r} there, {header.get(key)!r} now" for key in fingerprint(header)
                         if key not in ("tokenizer", "source_identity") and existing.get(key) != header.get(key)]
            if existing.get("source_identity") != header["source_identity"]:
                differing.append(f"the source's files changed since it was prepared: files added, removed or "
                                 f"modified, {_describe_identity(existing.get('source_identity'))} there, "
                                 f"{_describe_identity(header['source_identity'])} now")
            if existing["tokenizer"] != header["tokenizer"]:
                differing.append(f"tokenizer: vocab {existing['tokenizer']['vocab_size']} sha256 "
                                 f"{existing['tokenizer']['sha256'][:12]} there, vocab {header['tokenizer']['vocab_size']} "
                                 f"sha256 {header['tokenizer']['sha256'][:12]} now")
            raise ValueError(f"{output}: holds a different dataset ({'; '.join(differing)}); pass --force to replace it")
        _remove_dataset(output, existing, manifest_name)
    elif not force and any(not _ours(entry.name) for entry in output.iterdir()):
        raise ValueError(f"{output}: holds files that are not a data_prep dataset; pass --force to write into it")
    return {**header, "decode_errors": {}, "splits": {}}


def _describe_identity(identity: dict[str, Any] | None) -> str:
    if identity is None:
        return "not recorded"
    if "files" in identity:
        return f"{identity['files']} files, sha256 {identity['sha256'][:12]}"
    return ", ".join(f"{split} {fp[:12]}" for split, fp in identity.items()) or "nothing"


def _ours(name: str) -> bool:
    """Names prepare writes at the top of an output dir (other array tasks may be writing them now)."""
    owner = temp_owner(name)  # fileio's temp file of a manifest counts as the manifest
    target = owner[0] if owner else name
    return name in SPLITS or (target.startswith("manifest") and target.endswith(".json"))


def _remove_dataset(output: Path, manifest: dict[str, Any], manifest_name: str) -> None:
    for split, entry in manifest["splits"].items():
        for shard in entry["shards"]:
            for suffix in (".bin", ".idx"):
                (output / split / shard["name"]).with_suffix(suffix).unlink(missing_ok=True)
    (output / manifest_name).unlink()


def _check_shard(split_dir: Path, shard: dict[str, Any]) -> bool:
    prefix = split_dir / shard["name"]
    bin_path, idx_path = prefix.with_suffix(".bin"), prefix.with_suffix(".idx")
    return (bin_path.is_file() and idx_path.is_file() and bin_path.stat().st_size == shard["bin_bytes"]
            and sha256_file(bin_path) == shard["bin_sha256"] and sha256_file(idx_path) == shard["idx_sha256"])


def prepare(source: str, tokenizer_dir: Path, output: Path, splits: list[str] | None = None, workers: int = 2,
            shard_size_mb: float = 256, text_field: str = "text", num_tasks: int = 1, task_index: int = 0,
            force: bool = False) -> dict[str, Any]:
    """Prepare every requested split; returns the final manifest. ValueError on bad input."""
    if not 0 <= task_index < num_tasks:
        raise ValueError(f"--task-index: expected 0 <= index < --num-tasks ({num_tasks}), got {task_index}")
    if shard_size_mb <= 0:
        raise ValueError(f"--shard-size-mb: expected > 0, got {shard_size_mb}")
    if workers < 1:
        raise ValueError(f"--workers: expected >= 1 (1 tokenizes in this process), got {workers}")
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output}: is a file, expected a directory")
    tokenizer = Tokenizer(tokenizer_dir)
    corpus = open_source(source, text_field)
    splits = splits or [s for s in SPLITS if s in corpus.splits()]
    for split in splits:
        corpus.require_split(split)
    dtype = optimal_dtype(tokenizer.vocab_size)
    task = {"index": task_index, "count": num_tasks} if num_tasks > 1 else None
    header = {"format": FORMAT, "tool_version": TOOL_VERSION, "source": source, "source_identity": corpus.identity(),
              "tokenizer": {"sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size,
                            "eod_id": tokenizer.eod_id, "model_type": tokenizer.config["model_type"]},
              "dtype": dtype.name, "shard_size_mb": shard_size_mb, "task": task}
    manifest_name = f"manifest.task_{task_index:05d}.json" if task else MANIFEST
    shard_prefix = f"shard_{task_index:05d}_" if task else "shard_"
    manifest = _open_output(output, manifest_name, header, force)
    write_json_atomic(output / manifest_name, manifest)

    for split in splits:
        total = corpus.count(split)
        first, last = total * task_index // num_tasks, total * (task_index + 1) // num_tasks
        entry = manifest["splits"].setdefault(split, {"complete": False, "source_documents": 0, "documents": 0,
                                                       "empty_documents": 0, "tokens": 0, "shards": []})
        split_dir = output / split
        split_dir.mkdir(exist_ok=True)
        for stale in split_dir.glob(f".{shard_prefix}[0-9][0-9][0-9][0-9][0-9].*.tmp"):  # left by a killed run of this task
            stale.unlink()
        bad = [shard["name"] for shard in entry["shards"] if not _check_shard(split_dir, shard)]
        if bad:
            raise ValueError(f"{split_dir / bad[0]}: listed in {manifest_name} but missing or corrupt; "
                             "rerun with --force to rebuild the dataset")
        if entry["complete"]:
            log.info("%s: complete, %d shards checked, skipping", split, len(entry["shards"]))
            continue
        _prepare_split(corpus, split, first, last, tokenizer, workers, dtype, shard_size_mb, output,
                       manifest, manifest_name, shard_prefix)
        entry.update(complete=True, **corpus.describe(split, first, last))
        manifest["decode_errors"].update(corpus.decode_errors)
        write_json_atomic(output / manifest_name, manifest)
    return manifest


def _prepare_split(corpus, split: str, first: int, last: int, tokenizer: Tokenizer, workers: int, dtype: np.dtype,
                   shard_size_mb: float, output: Path, manifest: dict[str, Any], manifest_name: str,
                   shard_prefix: str) -> None:
    entry = manifest["splits"][split]
    next_document = first + entry["source_documents"]
    shard_bytes = int(shard_size_mb * (1 << 20))
    eod = np.array([tokenizer.eod_id], dtype=dtype)

    texts = corpus.documents(split, next_document, last)
    text_bytes = 0

    def counted(stream: Iterator[str]) -> Iterator[str]:
        nonlocal text_bytes
        for text in stream:
            text_bytes += len(text.encode("utf-8"))
            yield text

    started = time.perf_counter()
    tokens_done = 0
    builder, shard = None, None
    bar = tqdm(total=last - next_document, desc=f"{split}", unit="doc", disable=None, dynamic_ncols=True)
    for ids in encode_documents(counted(texts), tokenizer, workers, dtype):
        if builder is None:
            shard = {"name": f"{shard_prefix}{len(entry['shards']):05d}", "first_document": next_document,
                     "source_documents": 0, "documents": 0, "tokens": 0}
            builder = IndexedDatasetBuilder(output / split / shard["name"], dtype)
        shard["source_documents"] += 1
        if len(ids):
            builder.add_document(np.concatenate([ids, eod]))
            shard["documents"] += 1
            shard["tokens"] += len(ids) + 1
        next_document += 1
        tokens_done += len(ids) + 1 if len(ids) else 0
        bar.update(1)
        bar.set_postfix(tokens_per_s=f"{tokens_done / (time.perf_counter() - started):,.0f}")
        if shard["tokens"] * dtype.itemsize >= shard_bytes or next_document == last:
            _finish_shard(builder, shard, output / split, entry, manifest, output / manifest_name)
            builder = None
    bar.close()
    if builder is not None:  # only possible when the source yielded fewer documents than it counted
        _finish_shard(builder, shard, output / split, entry, manifest, output / manifest_name)
    elapsed = time.perf_counter() - started
    print(f"[data_prep] {split}: {entry['documents']} docs ({entry['empty_documents']} empty skipped), "
          f"{entry['tokens']:,} tokens, {len(entry['shards'])} shard(s); this run: {tokens_done:,} tokens from "
          f"{text_bytes / 1e6:.1f} MB in {elapsed:.1f} s ({tokens_done / max(elapsed, 1e-9):,.0f} tokens/s, "
          f"{text_bytes / 1e6 / max(elapsed, 1e-9):.2f} MB/s)", flush=True)


def _finish_shard(builder: IndexedDatasetBuilder, shard: dict[str, Any], split_dir: Path, entry: dict[str, Any],
                  manifest: dict[str, Any], manifest_path: Path) -> None:
    builder.finalize()
    prefix = split_dir / shard["name"]
    shard.update(bin_sha256=sha256_file(prefix.with_suffix(".bin")), idx_sha256=sha256_file(prefix.with_suffix(".idx")),
                 bin_bytes=prefix.with_suffix(".bin").stat().st_size)
    entry["shards"].append(shard)
    entry["source_documents"] += shard["source_documents"]
    entry["documents"] += shard["documents"]
    entry["empty_documents"] += shard["source_documents"] - shard["documents"]
    entry["tokens"] += shard["tokens"]
    write_json_atomic(manifest_path, manifest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True,
                        help="pg19:PATH | hf:NAME_OR_PATH | jsonl:PATH | synthetic[:docs=N,seed=S,words=W] | "
                             "needles[:docs=N,seed=S,words=W,facts=F] (data_prep/sources.py)")
    parser.add_argument("--tokenizer", type=Path, required=True, help="directory made by `python -m tokenizer.train`")
    parser.add_argument("--output", type=Path, required=True, help="dataset directory (shards + manifest.json)")
    parser.add_argument("--workers", type=int, default=2, help="tokenizer processes (default: %(default)s)")
    parser.add_argument("--shard-size-mb", type=float, default=256, help="close a shard past this many MB of tokens (default: %(default)s)")
    parser.add_argument("--splits", default=None, help="comma-separated splits (default: all the source has)")
    parser.add_argument("--text-field", default="text", help="text column for hf:/jsonl: sources (default: %(default)s)")
    parser.add_argument("--num-tasks", type=int, default=1, help="split the work into this many array tasks")
    parser.add_argument("--task-index", type=int, default=0, help="which task this is (0-based)")
    parser.add_argument("--force", action="store_true", help="replace a different dataset found in --output")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    try:
        manifest = prepare(args.source, args.tokenizer, args.output, args.splits.split(",") if args.splits else None,
                           args.workers, args.shard_size_mb, args.text_field, args.num_tasks, args.task_index, args.force)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for split, entry in manifest["splits"].items():
        print(f"[data_prep] {args.output / split}: {len(entry['shards'])} shard(s), {entry['documents']} docs, {entry['tokens']:,} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
