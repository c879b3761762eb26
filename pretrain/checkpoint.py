"""Checkpoints that count only when complete, and resuming from them (DESIGN.md §5).

    <run_dir>/checkpoints/
      latest                  one line: the tag of the newest complete checkpoint (moved last, atomically)
      global_step200/         DeepSpeed's files (mp_rank_*_model_states.pt, zero_pp_rank_*_optim_states.pt)
        config.yaml           the resolved run config (the directory describes itself)
        meta.json             step, tokens, world/tp/dp sizes, config hashes: readable before any process group
        rng/rank_00000.pt     each rank's RNG states
      global_step200_universal/   made on demand to resume at another data-parallel size

Saving: every rank writes its DeepSpeed shards (`save_latest=False`: DeepSpeed 0.19 writes its own
`latest` in place, which a kill can leave empty) and its RNG file; rank 0 adds config.yaml and
meta.json and fsyncs the directory's files; after a barrier rank 0 writes `latest` to a temp file,
fsyncs it and renames it over the old pointer, then deletes all but the newest `keep_last`
complete checkpoints. A kill at any moment leaves `latest` naming a complete checkpoint (or no
`latest` at all). Tag directories newer than `latest` are leftovers of a killed save and are
removed before the run saves again.

Health: meta.json says `"healthy": false` when the checkpoint was written during a streak of
skipped (non-finite) steps or its parameters hold a non-finite value. Pruning never deletes the
newest healthy checkpoint, and `--resume auto` passes over unhealthy ones to the newest healthy
one (saying so), so a run that diverged can be resumed from where it was still sound.

Changing the data-parallel size: DeepSpeed cannot load ZeRO shards written by a different number
of ranks, so the checkpoint is converted once with `deepspeed.checkpoint.ds_to_universal` into
`<tag>_universal` and loaded with `"checkpoint": {"load_universal": true}`.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fileio import atomic_file, fsync_dir, read_json, write_text_atomic

LATEST = "latest"
TAG_PATTERN = re.compile(r"^global_step(\d+)$")
UNIVERSAL_SUFFIX = "_universal"


def tag_for_step(step: int) -> str:
    return f"global_step{step}"


def step_of_tag(tag: str) -> int | None:
    match = TAG_PATTERN.match(tag)
    return int(match.group(1)) if match else None


def _fsync_tree(directory: Path) -> None:
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for path in [directory, *sorted(p for p in directory.rglob("*") if p.is_dir())]:
        fsync_dir(path)


def read_latest(checkpoint_dir: Path) -> str | None:
    """Tag named by `latest`, or None when there is no complete checkpoint yet."""
    pointer = checkpoint_dir / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    if step_of_tag(tag) is None or not (checkpoint_dir / tag / "meta.json").is_file():
        raise ValueError(f"{pointer}: names '{tag}', which is not a complete checkpoint in {checkpoint_dir}")
    return tag


@dataclass(frozen=True)
class ResumePoint:
    """A complete checkpoint chosen for resuming, with its meta.json."""

    checkpoint_dir: Path
    tag: str
    meta: dict[str, Any]
    passed_over: tuple[str, ...] = ()
    """Newer, unhealthy checkpoints that `--resume auto` did not resume from."""

    @property
    def path(self) -> Path:
        return self.checkpoint_dir / self.tag


def find_resume_point(resume: str, run_checkpoint_dir: Path) -> ResumePoint | None:
    """Resolve `--resume auto|none|PATH`; PATH may be a tag directory, a checkpoints directory or a run directory."""
    if resume == "none":
        if (run_checkpoint_dir / LATEST).exists():
            raise ValueError(f"--resume none: {run_checkpoint_dir} already holds checkpoints; "
                             f"resume with --resume auto or choose another --run-dir")
        return None
    if resume == "auto":
        tag = read_latest(run_checkpoint_dir)
        return None if tag is None else _newest_healthy(run_checkpoint_dir, tag)
    path = Path(resume)
    if (path / "meta.json").is_file():
        return _resume_point(path.parent, path.name)
    for checkpoint_dir in (path, path / "checkpoints"):
        tag = read_latest(checkpoint_dir) if checkpoint_dir.is_dir() else None
        if tag is not None:
            return _resume_point(checkpoint_dir, tag)
    raise ValueError(f"--resume {resume}: no complete checkpoint there (expected a checkpoint directory "
                     f"with meta.json, or a directory with a '{LATEST}' pointer)")


META_KEYS = ("step", "tokens_seen", "world_size", "model_config", "data_seed")
"""Keys of meta.json that resuming reads."""


def _resume_point(checkpoint_dir: Path, tag: str) -> ResumePoint:
    meta_path = checkpoint_dir / tag / "meta.json"
    meta = read_json(meta_path)
    missing = [key for key in META_KEYS if key not in meta] if isinstance(meta, dict) else list(META_KEYS)
    if missing:
        raise ValueError(f"{meta_path}: not a checkpoint's metadata (missing {', '.join(missing)})")
    return ResumePoint(checkpoint_dir=checkpoint_dir, tag=tag, meta=meta)


def is_healthy(meta: dict[str, Any]) -> bool:
    return meta.get("healthy", True)  # checkpoints from before the rule were not marked


def _newest_healthy(checkpoint_dir: Path, latest: str) -> ResumePoint:
    """The newest healthy complete checkpoint at or before ``latest``, with the unhealthy ones after it."""
    passed_over = []
    for step in sorted(_complete_steps(checkpoint_dir, step_of_tag(latest)), reverse=True):
        point = _resume_point(checkpoint_dir, tag_for_step(step))
        if is_healthy(point.meta):
            return ResumePoint(checkpoint_dir, point.tag, point.meta, tuple(reversed(passed_over)))
        passed_over.append(point.tag)
    raise ValueError(f"--resume auto: every checkpoint in {checkpoint_dir} ({', '.join(reversed(passed_over))}) was "
                     f"saved during a non-finite streak; resume from one by path, or start a new --run-dir")


def rewind_latest(point: ResumePoint) -> None:
    """Point `latest` back at ``point``, so the checkpoints it passed over count as leftovers (rank 0)."""
    write_text_atomic(point.checkpoint_dir / LATEST, point.tag + "\n")


def check_compatible(point: ResumePoint, model_config: dict[str, Any], data_seed: int) -> None:
    """ValueError naming the checkpoint and every differing model key if it was trained with another model."""
    saved = point.meta["model_config"]
    differences = [f"model.{key}: {a!r} -> {b!r}" for key, (a, b) in _flat_diff(saved, model_config).items()]
    if differences:
        raise ValueError(f"--resume: checkpoint {point.path} was saved with a different model config "
                         f"({'; '.join(differences)})")
    if point.meta["data_seed"] != data_seed:
        raise ValueError(f"--resume: checkpoint {point.path} was saved with data.seed {point.meta['data_seed']}, "
                         f"the config says {data_seed} (the data order would not continue)")


def check_same_data(point: ResumePoint, sources: list[dict[str, Any]], identity: str) -> None:
    """ValueError when the checkpoint was trained on other data (the loader's position means nothing there);
    ``sources``: the run's [{path, weight}], ``identity``: `pretrain.data.dataset_identity` of them."""
    saved = point.meta.get("data_identity")  # absent in checkpoints from before it was recorded
    if saved is not None and saved != identity:
        def show(data: list[dict[str, Any]]) -> str:
            return ", ".join(d["path"] if len(data) == 1 else f"{d['path']} x{d['weight']:g}" for d in data)

        raise ValueError(f"--resume: checkpoint {point.path} was trained on other data ({show(point.meta['data'])} "
                         f"there, {show(sources)} now, other shards or weights); its loader position means nothing "
                         f"on it: pass --allow-new-data to resume anyway")


def _flat_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> dict[str, tuple[Any, Any]]:
    out: dict[str, tuple[Any, Any]] = {}
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out.update(_flat_diff(x, y, f"{prefix}{key}."))
        elif x != y:
            out[f"{prefix}{key}"] = (x, y)
    return out


def remove_incomplete(checkpoint_dir: Path) -> list[Path]:
    """Delete tag directories newer than `latest` (leftovers of a killed save) and scratch dirs; rank 0 only."""
    latest = read_latest(checkpoint_dir) if checkpoint_dir.is_dir() else None
    latest_step = -1 if latest is None else step_of_tag(latest)
    removed = [p for p in _tag_dirs(checkpoint_dir) if step_of_tag(_base_tag(p.name)) > latest_step]
    if checkpoint_dir.is_dir():  # scratch of an interrupted universal conversion
        removed += [p for p in checkpoint_dir.glob(".*.tmp") if p.is_dir()]
    for path in removed:
        shutil.rmtree(path)
    return removed


def prune(checkpoint_dir: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints (and their universal copies), and the newest
    healthy one even when it is older; rank 0 only."""
    latest_step = step_of_tag(read_latest(checkpoint_dir))
    complete = _complete_steps(checkpoint_dir, latest_step)
    keep = set(complete[-keep_last:])
    healthy = [s for s in complete if is_healthy(_resume_point(checkpoint_dir, tag_for_step(s)).meta)]
    keep.update(healthy[-1:])
    for path in _tag_dirs(checkpoint_dir):
        step = step_of_tag(_base_tag(path.name))
        if step <= latest_step and step not in keep:
            shutil.rmtree(path)


def _complete_steps(checkpoint_dir: Path, latest_step: int) -> list[int]:
    """Steps of the complete checkpoints up to ``latest_step``, oldest first."""
    steps = [step_of_tag(p.name) for p in _tag_dirs(checkpoint_dir) if (p / "meta.json").is_file()]
    return sorted(s for s in steps if s is not None and s <= latest_step)  # None: a universal copy


def _base_tag(name: str) -> str:
    return name.removesuffix(UNIVERSAL_SUFFIX)


def _tag_dirs(checkpoint_dir: Path) -> list[Path]:
    if not checkpoint_dir.is_dir():
        return []
    return [p for p in checkpoint_dir.iterdir() if p.is_dir() and step_of_tag(_base_tag(p.name)) is not None]


def save(engine, checkpoint_dir: Path, step: int, client_state: dict[str, Any], meta: dict[str, Any],
         config_yaml: str, keep_last: int) -> Path:
    """Collective: write checkpoint `global_step<step>` from every rank and make it the latest."""
    dist = torch.distributed
    tag = tag_for_step(step)
    path = checkpoint_dir / tag
    engine.save_checkpoint(str(checkpoint_dir), tag=tag, client_state=client_state, save_latest=False)
    rank = dist.get_rank()
    rng_file = path / "rng" / f"rank_{rank:05d}.pt"
    rng_file.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(rng_file) as tmp:
        torch.save(rng_states(), tmp)
    dist.barrier()
    if rank == 0:
        write_text_atomic(path / "config.yaml", config_yaml)
        write_text_atomic(path / "meta.json", json.dumps(meta, indent=1) + "\n")
        _fsync_tree(path)
        write_text_atomic(checkpoint_dir / LATEST, tag + "\n")
        prune(checkpoint_dir, keep_last)
    dist.barrier()
    return path


def rng_states() -> dict[str, Any]:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


UNREADABLE = (RuntimeError, EOFError, OSError, pickle.UnpicklingError, KeyError, ValueError)
"""What torch.load and DeepSpeed raise on a truncated or garbage checkpoint file."""


def read_torch_file(path: Path) -> Any:
    """torch.load on CPU; ValueError naming the file when it is truncated or not a torch file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except UNREADABLE as e:
        raise unreadable(path, e) from None


def unreadable(path: Path, error: BaseException) -> ValueError:
    return ValueError(f"{path}: unreadable (truncated or corrupt? {error_line(error)})")


def error_line(error: BaseException) -> str:
    """An exception as one short line (torch and DeepSpeed raise paragraphs)."""
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}"


def restore_rng_states(point: ResumePoint, rank: int, world_size: int) -> bool:
    """Restore this rank's RNG states when the world size is unchanged; returns whether it did."""
    rng_file = point.path / "rng" / f"rank_{rank:05d}.pt"
    if point.meta["world_size"] != world_size or not rng_file.is_file():
        return False
    states = read_torch_file(rng_file)
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    return True


def make_universal(point: ResumePoint) -> str:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format once (rank 0); returns the new tag."""
    tag = point.tag + UNIVERSAL_SUFFIX
    target = point.checkpoint_dir / tag
    if target.is_dir():
        return tag
    # ds_to_universal also writes a `latest_universal` beside its output: keep that inside the scratch dir.
    scratch = point.checkpoint_dir / f".{tag}.tmp"
    shutil.rmtree(scratch, ignore_errors=True)
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(point.path),
               "--output_folder", str(scratch / tag), "--num_extract_workers", "1", "--num_merge_workers", "1"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"converting {point.path} to a universal checkpoint failed: {tail[0]}")
    for name in ("config.yaml", "meta.json"):
        shutil.copy2(point.path / name, scratch / tag / name)
    os.replace(scratch / tag, target)  # the converted checkpoint appears complete or not at all
    shutil.rmtree(scratch)
    return tag
