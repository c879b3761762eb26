"""Join the partial manifests of a SLURM array prepare into one manifest.json.

    python -m data_prep.merge data/

After `prepare --num-tasks K --task-index I` ran for every I, this checks that the K task
manifests describe one dataset (same source, tokenizer, dtype, shard size), that every task
finished every split, and writes manifest.json listing each split's shards in task order, which
is the document order of a single-process prepare. The task manifests are then removed. Shard
files are not touched.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from fileio import write_json_atomic
from .manifest import MANIFEST, fingerprint, load_manifest


def merge(data_dir: Path) -> dict[str, Any]:
    paths = sorted(data_dir.glob("manifest.task_*.json"))
    if not paths:
        raise ValueError(f"{data_dir}: no manifest.task_*.json to merge")
    parts = [load_manifest(data_dir, p.name) for p in paths]
    count = parts[0]["task"]["count"]
    indices = [part["task"]["index"] for part in parts]
    if indices != list(range(count)):
        missing = sorted(set(range(count)) - set(indices))
        raise ValueError(f"{data_dir}: expected {count} task manifests, missing task(s) {missing}")
    reference = {k: v for k, v in fingerprint(parts[0]).items() if k != "task"}
    merged = {**parts[0], "task": None, "merged_from_tasks": count, "decode_errors": {}, "splits": {}}
    for path, part in zip(paths, parts):
        if {k: v for k, v in fingerprint(part).items() if k != "task"} != reference:
            raise ValueError(f"{path}: describes a different dataset than {paths[0].name}")
        if part["splits"].keys() != parts[0]["splits"].keys():
            raise ValueError(f"{path}: splits {sorted(part['splits'])} differ from {paths[0].name}'s")
        merged["decode_errors"].update(part["decode_errors"])
        for split, entry in part["splits"].items():
            if not entry["complete"]:
                raise ValueError(f"{path}: split '{split}' is incomplete (task {part['task']['index']} did not finish)")
            into = merged["splits"].setdefault(split, {"complete": True, "source_documents": 0, "documents": 0,
                                                       "empty_documents": 0, "tokens": 0, "shards": []})
            for key in ("source_documents", "documents", "empty_documents", "tokens"):
                into[key] += entry[key]
            into["shards"].extend(entry["shards"])
            if "books" in entry:
                into.setdefault("books", []).extend(entry["books"])
            elif "synthetic" in entry:
                into["synthetic"] = entry["synthetic"]
    write_json_atomic(data_dir / MANIFEST, merged)
    for path in paths:
        path.unlink()
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.merge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", type=Path, help="directory holding manifest.task_*.json from an array prepare")
    args = parser.parse_args(argv)
    try:
        merged = merge(args.data_dir)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    shards = sum(len(entry["shards"]) for entry in merged["splits"].values())
    print(f"[data_prep] merged {merged['merged_from_tasks']} task manifests into {args.data_dir / MANIFEST} ({shards} shards)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
