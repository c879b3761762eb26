"""Checkpoints, all in one place (DESIGN.md §5): writing them so they count only when complete,
finding one from any path, reading one (ZeRO gather, TP merge), the one rule for "same model",
resuming, and the DeepSpeed universal-checkpoint info.

    <run_dir>/checkpoints/
      latest                  one line: the tag of the newest complete checkpoint (moved last, atomically)
      global_step200/         DeepSpeed's files (mp_rank_*_model_states.pt, zero_pp_rank_*_optim_states.pt)
        config.yaml           the resolved run config (the directory describes itself); its model
                              section is the checkpoint's one copy of the model config
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

Reading: `find_checkpoint` resolves a run directory, its checkpoints/ directory, a tag directory or
a `pretrain.import_hf` output (the same record, with per-TP-rank module files instead of ZeRO
partitions) for the export, evaluation, `--init-from` and `--resume PATH`; `load_checkpoint` returns
its full TP=1 fp32 weights. `model_differences` is the one rule for whether a checkpoint holds the
same model (the fields the architecture uses), for resuming and for `--init-from` alike.

Changing the data-parallel size: DeepSpeed cannot load ZeRO shards written by a different number
of ranks, so the checkpoint is converted once with `deepspeed.checkpoint.ds_to_universal` into
`<tag>_universal` and loaded with `"checkpoint": {"load_universal": true}`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from fileio import atomic_file, fsync_dir, read_json, write_text_atomic
from model import ModelConfig, build_model
from model.hf.mapping import hf_format
from model.parallel import check_tp_config, merge_state_dicts, split_of, tp_splits

from .config import config_hash, from_dict

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
    tag_dir = find_checkpoint(resume, flag="--resume")
    return _resume_point(tag_dir.parent, tag_dir.name)


META_KEYS = ("step", "tokens_seen", "world_size", "data_seed")
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
    differences = [f"model.{key}: {a!r} -> {b!r}"
                   for key, a, b in model_differences(saved_model_config(point.path), model_config)]
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
         run_config: dict[str, Any], keep_last: int) -> Path:
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
        write_record(path, run_config, meta)
        _fsync_tree(path)
        write_text_atomic(checkpoint_dir / LATEST, tag + "\n")
        prune(checkpoint_dir, keep_last)
    dist.barrier()
    return path


def write_record(tag_dir: Path, run_config: dict[str, Any], meta: dict[str, Any]) -> None:
    """The two files that describe a checkpoint, for the trainer and `pretrain.import_hf` alike:
    config.yaml (the run config, or just ``{"model": ...}`` for an import) and then meta.json, whose
    presence marks the record complete. meta.json gains the model config's hash, not a copy of it."""
    write_text_atomic(tag_dir / "config.yaml", yaml.safe_dump(run_config, sort_keys=False))
    meta = {**meta, "model_config_hash": config_hash(run_config["model"])}
    write_text_atomic(tag_dir / "meta.json", json.dumps(meta, indent=1) + "\n")


def saved_model_config(tag_dir: Path) -> dict[str, Any]:
    """The model section of a checkpoint's config.yaml; ValueError naming the file when it has none."""
    path = tag_dir / "config.yaml"
    try:
        model = (yaml.safe_load(path.read_text()) or {}).get("model")
    except (OSError, yaml.YAMLError, AttributeError) as e:
        raise ValueError(f"{path}: unreadable ({error_line(e)})") from None
    if not isinstance(model, dict):
        raise ValueError(f"{path}: no model section (every checkpoint records its model config there)")
    return model


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


# ---- finding and reading a checkpoint (export, evaluation, --init-from, --resume PATH) ----

MODEL_STATES = "mp_rank_{:02d}_model_states.pt"
"""Per-TP-rank module weights when there are no ZeRO partitions (ZeRO stage 0, and import_hf's output)."""
ZERO_PARTITION = "zero_pp_rank_{}_mp_rank_{:02d}_optim_states.pt"
"""DeepSpeed's ZeRO partition file of one (data-parallel rank, TP rank)."""


@dataclass
class Checkpoint:
    """Full (TP-merged) float32 weights of one checkpoint and what describes them."""

    path: Path
    """The global_stepN (or imported) directory."""
    model: ModelConfig
    state_dict: dict[str, torch.Tensor]
    """Our parameter names, full TP=1 shapes; a tied lm_head.weight is the embedding tensor."""
    meta: dict[str, Any]
    """meta.json: step, tokens_seen, tp, dp, ..."""
    run_config: dict[str, Any]
    """The checkpoint's config.yaml (the whole resolved run config; just {"model": ...} for imports)."""


def find_checkpoint(path: str | Path, tag: str = "latest", flag: str = "--checkpoint") -> Path:
    """The complete checkpoint directory named by ``path`` and ``tag``: ``path`` may be a run directory,
    its checkpoints/ directory, one tag directory or a `pretrain.import_hf` output. ValueErrors name
    ``flag``, the option the path came from."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{flag} {path}: no such directory, so no complete checkpoint there")
    if (path / "meta.json").is_file() or step_of_tag(path.name) is not None:
        if tag not in ("latest", path.name):
            raise ValueError(f"--tag {tag}: {flag} {path} already is one checkpoint; pass its run directory")
        return _complete(path)
    checkpoint_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if tag == "latest":
        latest = read_latest(checkpoint_dir)
        if latest is None:
            raise ValueError(f"{flag} {path}: no complete checkpoint (no {checkpoint_dir / LATEST} pointer; "
                             f"pretrain/main.py writes it after the first save)")
        return _complete(checkpoint_dir / latest)
    tags = sorted((p.name for p in checkpoint_dir.iterdir() if p.is_dir() and step_of_tag(p.name) is not None),
                  key=step_of_tag)
    if tag not in tags:
        raise ValueError(f"--tag {tag}: not found in {checkpoint_dir} (available: {', '.join(tags) or 'none'})")
    return _complete(checkpoint_dir / tag)


def holds_checkpoints(path: Path) -> bool:
    """Whether ``path`` looks like what `find_checkpoint` reads (a run, its checkpoints/, or one checkpoint)."""
    return (path / "checkpoints").is_dir() or (path / "meta.json").is_file() or (path / LATEST).is_file()


def _complete(tag_dir: Path) -> Path:
    for name in ("meta.json", "config.yaml"):
        if not (tag_dir / name).is_file():
            raise ValueError(f"{tag_dir}: incomplete checkpoint (no {name}; an interrupted save?)")
    return tag_dir


def load_checkpoint(path: str | Path, tag: str = "latest") -> Checkpoint:
    """Read a checkpoint on CPU: gather its ZeRO partitions, merge its TP shards, check the keys.

    ``path`` and ``tag`` as for `find_checkpoint`. Raises ValueError naming the directory and the
    missing file for an incomplete checkpoint.
    """
    tag_dir = find_checkpoint(path, tag)
    meta = read_json(tag_dir / "meta.json")
    run_config = yaml.safe_load((tag_dir / "config.yaml").read_text())
    model = from_dict(ModelConfig, run_config.get("model"), str(tag_dir / "config.yaml"), "model.")
    model.validate()
    shards = [_with_tied_head(_tp_rank_state(tag_dir, rank, meta.get("dp", 1)), model)
              for rank in range(meta.get("tp", 1))]
    state = shards[0] if len(shards) == 1 else merge_state_dicts(shards, model)
    with torch.device("meta"):
        expected = build_model(model).state_dict()
    check_weights(state, expected, str(tag_dir), "the model of its config.yaml")
    return Checkpoint(tag_dir, model, state, meta, run_config)


def check_weights(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str, config: str,
                  may_lack: Callable[[str], bool] = lambda name: False) -> None:
    """ValueError naming ``source`` when the names or shapes of ``state`` are not those of ``expected``,
    the state dict of the model ``config`` describes; names for which ``may_lack`` is true may be absent."""
    missing = sorted(name for name in set(expected) - set(state) if not may_lack(name))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not match {config} (missing {missing[:4]}, unexpected {unexpected[:4]})")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(f"{source}: {name} has shape {tuple(tensor.shape)}, the config implies "
                             f"{tuple(expected[name].shape)}")


def _with_tied_head(state: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """A tied head under both of its names (DeepSpeed may record it under one, and not on every TP rank)."""
    if model.tie_embeddings:
        embedding = hf_format(asdict(model)).embedding_key
        for name, twin in (("lm_head.weight", embedding), (embedding, "lm_head.weight")):
            if name not in state and twin in state:
                state[name] = state[twin]
    return state


def _tp_rank_state(tag_dir: Path, tp_rank: int, dp: int) -> dict[str, torch.Tensor]:
    """The fp32 state dict of one TP rank: ZeRO partitions of all dp ranks gathered, or the module
    weights of a checkpoint without partitions."""
    partitions = [tag_dir / ZERO_PARTITION.format(d, tp_rank) for d in range(dp)]
    if not any(p.is_file() for p in partitions):
        module_file = tag_dir / MODEL_STATES.format(tp_rank)
        if not module_file.is_file():
            raise ValueError(f"{tag_dir}: incomplete checkpoint: neither {partitions[0].name} nor {module_file.name}")
        return {k: v.float() for k, v in read_torch_file(module_file)["module"].items()}
    missing = [p.name for p in partitions if not p.is_file()]
    if missing:
        raise ValueError(f"{tag_dir}: incomplete checkpoint: missing {', '.join(missing)} (meta.json says dp={dp})")
    return _gather_zero(tag_dir, tp_rank)


def _gather_zero(tag_dir: Path, tp_rank: int) -> dict[str, torch.Tensor]:
    """DeepSpeed's zero_to_fp32 over one TP rank's files.

    zero_to_fp32 reads every *_optim_states.pt of a directory as one data-parallel group, so it
    is given a view (symlinks) of this TP rank's files only.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with tempfile.TemporaryDirectory(prefix="export-zero-") as view:
        rank_dir = Path(view) / tag_dir.name
        rank_dir.mkdir()
        for file in tag_dir.glob(f"*mp_rank_{tp_rank:02d}_*.pt"):
            (rank_dir / file.name).symlink_to(file.resolve())
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # it prints progress lines
                return get_fp32_state_dict_from_zero_checkpoint(view, tag=tag_dir.name)
        except UNREADABLE as e:
            raise ValueError(f"{tag_dir}: cannot gather the ZeRO partitions of TP rank {tp_rank} "
                             f"({error_line(e)})") from None


def used_fields(model: dict[str, Any]) -> dict[str, Any]:
    """A nested ModelConfig dict without the sections its architecture ignores (mamba/memory/transformer)."""
    arch, memory = model.get("arch"), model.get("memory") or {}
    unused = {"transformer": ("mamba", "memory"), "mamba2": ("transformer", "memory"),
              "memmamba": ("transformer",) + (() if memory.get("enabled", True) else ("memory",))}.get(arch, ())
    return {key: value for key, value in model.items() if key not in unused}


def model_differences(saved: dict[str, Any], ours: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """The one rule for "is this checkpoint the same model?", for resuming and for --init-from: the
    (dotted key, saved value, our value) of every field that differs among those the architecture uses."""
    return _flat_diff(used_fields(saved), used_fields(ours))


def _flat_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    out = []
    for key in dict.fromkeys([*b, *a]):  # in the order of our config's fields
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _flat_diff(x, y, f"{prefix}{key}.")
        elif x != y:
            out.append((f"{prefix}{key}", x, y))
    return out


# ---- DeepSpeed universal checkpoints ----

def universal_checkpoint_info(model: torch.nn.Module, tp_size: int) -> dict:
    """The ``UNIVERSAL_CHECKPOINT_INFO`` entry for DeepSpeed's client state, so that
    ``ds_to_universal`` merges a TP checkpoint correctly: replicated parameters are listed as such,
    row-parallel ones are concatenated along dim 1, in_proj and conv1d per component (with each
    rank's widths), everything else along dim 0. Save it as ``client_state={UNIVERSAL_CHECKPOINT_INFO:
    universal_checkpoint_info(model, tp)}`` (key from ``deepspeed.checkpoint.constants``); it needs
    the local shapes, so take it before ZeRO-3 partitions the model.
    """
    from deepspeed.checkpoint import constants as ds

    cfg: ModelConfig = model.config
    check_tp_config(cfg, tp_size)
    splits = tp_splits(cfg)
    replicated, row_parallel, sub_params, shard_widths = [], [], [], {}
    for name, param in model.named_parameters():
        pattern = re.escape(name) + "$"
        split = split_of(name, splits)
        if split is None:
            replicated.append(pattern)
        elif len(split.sizes) > 1:
            shape = list(param.shape)  # other dims are the same in the full and the local tensor
            shape[split.dim] = split.sizes
            sub_params.append({"patterns": [pattern], "shape": tuple(shape), "partition_dim": split.dim})
            shard_widths[pattern] = [[size // tp_size] * tp_size for size in split.sizes]
        elif split.dim == 1:
            row_parallel.append(pattern)
    return {
        ds.UNIVERSAL_CHECKPOINT_VERSION_KEY: ds.UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        ds.TP_REPLICATED_PARAMETER_PATTERNS: replicated,
        ds.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: row_parallel,
        ds.PARAMETER_WITH_SUB_PARAMS: sub_params,
        ds.SUB_PARAM_SHARD_WIDTHS: shard_widths,
    }
