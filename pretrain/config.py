"""Run configuration: typed nested dataclasses filled from one YAML file plus `--set a.b=c` overrides.

Precedence: command line (`--set`) > YAML file > dataclass defaults. Every key is checked against
the dataclass it lands in: an unknown key, a missing required key or a value of the wrong type is
a ValueError naming the key and where it came from (the file, or `--set`). Cross-field rules are
collected by `RunConfig.validate` and raised once.

The generic part (`load_config`, `from_dict`, `apply_override`, `to_dict`, `save_config`,
`config_hash`) works for any dataclass tree of plain types, so other CLIs (export, evaluation)
load their configs the same way:

    cfg = load_config(RunConfig, "configs/quickstart.yaml", ["train.seed=3", "parallel.tp=2"])
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
import warnings
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from fileio import write_text_atomic
from model.config import ModelConfig, memory_reach_tokens
from model.parallel import check_tp_config

T = TypeVar("T")

# ----------------------------------------------------------------------------------------------
# Generic loader


def from_dict(cls: type[T], data: Any, source: str, prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping; errors name `source` and the dotted key."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: {prefix or 'top level'}: expected a mapping, got {_show(data)}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            known = ", ".join(sorted(names))
            raise ValueError(f"{source}: unknown key '{prefix}{key}' (known keys here: {known})")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            values[f.name] = _coerce(hints[f.name], data[f.name], source, prefix + f.name)
        elif f.default is MISSING and f.default_factory is MISSING:
            raise ValueError(f"{source}: missing required key '{prefix}{f.name}'")
    return cls(**values)


def _coerce(kind: Any, value: Any, source: str, key: str) -> Any:
    """Check `value` against type hint `kind` and convert where YAML is lossy (1 -> 1.0, '1e-3' -> 0.001)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, source, key)
    if dataclasses.is_dataclass(kind):
        return from_dict(kind, value, source, key + ".")
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{source}: {key}: expected a list, got {_show(value)}")
        return [_coerce(args[0], item, source, f"{key}[{i}]") for i, item in enumerate(value)]
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():  # 1e6 in YAML is a float
            return int(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif kind is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"config field {key}: unsupported type {kind!r}")
    raise ValueError(f"{source}: {key}: expected {kind.__name__}, got {_show(value)}")


def _show(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def apply_override(cfg: Any, assignment: str) -> None:
    """Apply one `a.b.c=value` (value parsed as YAML) to a dataclass tree, in place."""
    source = f"--set {assignment}"
    key, sep, text = assignment.partition("=")
    if not sep or not key:
        raise ValueError(f"{source}: expected KEY=VALUE, e.g. train.seed=3")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"{source}: value is not valid YAML ({str(e).splitlines()[0]})") from None
    *parents, leaf = key.split(".")
    node = cfg
    for depth, name in enumerate(parents):
        if not dataclasses.is_dataclass(node) or name not in {f.name for f in dataclasses.fields(node)}:
            raise ValueError(f"{source}: unknown key '{'.'.join(parents[:depth + 1])}'")
        node = getattr(node, name)
    if not dataclasses.is_dataclass(node) or leaf not in {f.name for f in dataclasses.fields(node)}:
        raise ValueError(f"{source}: unknown key '{key}'")
    setattr(node, leaf, _coerce(typing.get_type_hints(type(node))[leaf], value, source, key))


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Defaults, then the YAML file at `path` (if any), then each `a.b=c` override in order."""
    data: Any = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        if not Path(path).is_file():
            raise ValueError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    cfg = from_dict(cls, data, source)
    for assignment in overrides:
        apply_override(cfg, assignment)
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (temp file + rename, so readers never see half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def config_hash(cfg: Any) -> str:
    """sha256 of the canonical JSON of a config (sub)tree, a dataclass or its dict: equal hashes mean equal settings."""
    tree = to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------
# The training run's sections


@dataclass
class BlendSource:
    path: str
    """Dataset directory made by `python -m data_prep.prepare`."""
    weight: float
    """Share of the training samples (weights are normalised over the blend)."""


@dataclass
class DataConfig:
    path: str | None = None
    """Dataset directory made by `python -m data_prep.prepare` (holds manifest.json); or use ``blend``."""
    blend: list[BlendSource] = field(default_factory=list)
    """Several datasets instead of ``path``, as Megatron's `--data-path 0.7 A 0.3 B`: each training
    sample comes from one source, in the proportions of the weights over any window; validation
    reads every source's validation split."""
    tokenizer: str | None = None
    """Tokenizer directory; when set, its sha256 must match the one recorded in the manifest."""
    train_split: str = "train"
    """Split the training samples come from."""
    valid_split: str = "validation"
    """Split the periodic validation loss is measured on."""
    seed: int = 1234
    """Seed of the document shuffle (one permutation per epoch)."""

    def sources(self) -> list[BlendSource]:
        """The blend, or ``path`` alone with weight 1."""
        return self.blend or [BlendSource(self.path, 1.0)]


@dataclass
class TrainConfig:
    max_tokens: int = 1_000_000
    """Training length in tokens; the learning rate reaches min_lr here and training stops."""
    global_batch_size: int = 8
    """Sequences per optimizer step over all data-parallel ranks, at the first curriculum length."""
    micro_batch_size: int = 2
    """Sequences per rank per forward pass, at the first curriculum length."""
    seed: int = 1234
    """Seed of parameter initialisation."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 = no clipping)."""
    max_consecutive_skips: int = 5
    """Abort after this many consecutive steps skipped for a non-finite loss or gradient norm."""
    mixer_segment_tokens: int = 0
    """MemMamba / Mamba2 only, training only: when > 0 the Mamba2 mixers' state starts afresh every this
    many tokens of a document (the memory still spans it), so what lies further back must come
    through the memory. Validation, evaluation and decoding run the model unchanged. 0: off."""
    note_selection_noise: float = 0.0
    """MemMamba only, training only: std of Gaussian noise added to the note scores that pick and keep
    notes (model/memory.py, ``selection_noise``), so that tokens the scorer does not rank up yet still
    enter the pool now and then and their reads can teach it. Evaluation and decoding add none. 0: off."""
    freeze: list[str] = field(default_factory=list)
    """Parameters left untrained: glob patterns over parameter names (``fnmatch``), e.g.
    ``["*.mixer.*", "lm_head.*"]``. Each pattern must match at least one parameter. Empty: train all."""


@dataclass
class CurriculumStage:
    tokens: int
    """The stage starts once this many training tokens have been seen."""
    seq_len: int
    """Sequence length of this stage; a multiple of model.mamba.chunk_size."""


@dataclass
class CurriculumConfig:
    stages: list[CurriculumStage] = field(default_factory=lambda: [CurriculumStage(tokens=0, seq_len=256)])
    """(tokens seen -> seq_len) stages in increasing token order; the first starts at 0."""
    constant_tokens_per_step: bool = False
    """Keep tokens per step constant: the batch (global and micro) shrinks as 1 / seq_len."""


@dataclass
class OptimizerConfig:
    lr: float = 3e-4
    """Peak learning rate, reached at the end of warm-up."""
    min_lr: float = 3e-5
    """Learning rate at train.max_tokens."""
    warmup_tokens: int = 0
    """Linear warm-up from 0 over this many tokens."""
    decay: str = "cosine"
    """Decay from lr to min_lr between warm-up and train.max_tokens: cosine | linear | constant | wsd
    (warmup-stable-decay: lr until the last ``wsd_decay_fraction`` of the tokens, then linear to min_lr)."""
    wsd_decay_fraction: float = 0.2
    """wsd only: the fraction of train.max_tokens, at the end, over which the learning rate decays."""
    weight_decay: float = 0.1
    """AdamW weight decay for matrices (norms, biases and A_log, D, dt_bias get none)."""
    decay_embeddings: bool = True
    """Weight decay on the token embedding and the LM head too. false: none there (as nanoGPT-style
    recipes for small models do): on the needles corpus, tied and decayed embeddings let the ten
    digit embeddings collapse (cosine 0.93), so no model could copy a passkey (README, issue 13)."""
    memory_lr_scale: float = 1.0
    """The learning rate of MemMamba's memory (every parameter under a layer's ``.memory.``: scorer,
    note projection, reads, fusion) as a multiple of the schedule's; the rest follows the schedule
    unchanged. Ignored by models without a memory."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size; data-parallel size = world size / tp."""


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 3
    """ZeRO stage (0-3)."""
    precision: str = "auto"
    """auto (bf16 on a GPU that supports it, else fp32) | bf16 | fp32."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass."""
    offload_optimizer: bool = False
    """Keep optimizer states (and the step) on the CPU (ZeRO-Offload)."""
    offload_params: bool = False
    """Keep partitioned parameters on the CPU (ZeRO-Infinity, stage 3 only)."""
    param_persistence_threshold: int | None = None
    """ZeRO-3: parameters of at most this many elements are kept whole on every rank instead of
    partitioned (DeepSpeed's stage3_param_persistence_threshold). null: every parameter when there is
    one data-parallel rank (partitioning over one rank saves no memory, and gathering each weight
    before every use costs time), else DeepSpeed's default, 100,000."""


@dataclass
class CheckpointConfig:
    every_steps: int = 500
    """Save every N optimizer steps (and always at the end)."""
    keep_last: int = 3
    """Complete checkpoints to keep; older ones are deleted after a new one is complete."""


@dataclass
class WandbConfig:
    project: str | None = None
    """Weights & Biases project that receives the same scalars as TensorBoard and the resolved
    config; null (the default): off, and wandb is not imported (extra `wandb`)."""
    mode: str = "online"
    """online | offline (writes <run_dir>/wandb/offline-run-*; `wandb sync` uploads it later) | disabled."""


WANDB_MODES = ("online", "offline", "disabled")


@dataclass
class LoggingConfig:
    every_steps: int = 10
    """Console line, metrics.jsonl record and TensorBoard scalars every N steps."""
    progress_bar: bool = True
    """tqdm bar on rank 0."""
    peak_tflops: float | None = None
    """One device's peak TFLOP/s, the MFU's denominator (pretrain/flops.py). null: the bf16 dense
    peak from a table on known GPUs, else measured once at start-up with a large matmul (on CPU,
    fp32 with the rank's threads)."""
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class EvalConfig:
    every_steps: int = 0
    """Validation loss every N steps (0 = only at the end)."""
    seq_lens: list[int] = field(default_factory=lambda: [256])
    """Fixed lengths the validation loss is measured at, whatever the curriculum stage."""
    samples: int = 8
    """Validation sequences per length (the first ones of the split, divided over data-parallel ranks)."""


DECAYS = ("cosine", "linear", "constant", "wsd")
PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class RunConfig:
    model: ModelConfig
    data: DataConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self, world_size: int | None = None) -> None:
        """Raise one ValueError listing every problem; with `world_size`, also the parallel layout."""
        problems: list[str] = []

        def need(ok: bool, key: str, message: str) -> None:
            if not ok:
                problems.append(f"{key}: {message}")

        try:
            self.model.validate()
        except ValueError as e:
            problems.append(str(e).removeprefix("invalid model config: "))
        model_ok = not problems
        if model_ok and self.parallel.tp > 0:
            try:
                check_tp_config(self.model, self.parallel.tp)
            except ValueError as e:
                problems.append(str(e).removeprefix("tensor parallel: "))

        d = self.data
        need((d.path is None) != (not d.blend), "data.path", "set exactly one of data.path and data.blend")
        for i, source in enumerate(d.blend):
            need(source.weight > 0, f"data.blend[{i}].weight", f"must be > 0, got {source.weight}")

        t, c, o = self.train, self.curriculum, self.optimizer
        for key in ("max_tokens", "global_batch_size", "micro_batch_size", "max_consecutive_skips"):
            need(getattr(t, key) > 0, f"train.{key}", f"must be > 0, got {getattr(t, key)}")
        need(t.grad_clip >= 0, "train.grad_clip", f"must be >= 0, got {t.grad_clip}")
        need(t.mixer_segment_tokens >= 0, "train.mixer_segment_tokens", f"must be >= 0, got {t.mixer_segment_tokens}")
        need(t.mixer_segment_tokens == 0 or self.model.arch != "transformer", "train.mixer_segment_tokens",
             "cuts the Mamba2 mixers' state: must be 0 for model.arch transformer")
        need(t.note_selection_noise >= 0, "train.note_selection_noise", f"must be >= 0, got {t.note_selection_noise}")
        need(t.note_selection_noise == 0 or self.model.memory_enabled, "train.note_selection_noise",
             "perturbs the memory's note selection: must be 0 without it (model.arch mamba2 / transformer)")
        if t.micro_batch_size > 0:
            need(t.global_batch_size % t.micro_batch_size == 0, "train.global_batch_size",
                 f"must be a multiple of train.micro_batch_size ({t.micro_batch_size}), got {t.global_batch_size}")

        need(len(c.stages) > 0, "curriculum.stages", "needs at least one stage")
        if c.stages:
            need(c.stages[0].tokens == 0, "curriculum.stages[0].tokens",
                 f"the first stage must start at 0 tokens, got {c.stages[0].tokens}")
        for i, (before, after) in enumerate(zip(c.stages, c.stages[1:]), start=1):
            need(after.tokens > before.tokens, f"curriculum.stages[{i}].tokens",
                 f"must be greater than the previous stage's ({before.tokens}), got {after.tokens}")
        lengths = [(f"curriculum.stages[{i}].seq_len", s.seq_len) for i, s in enumerate(c.stages)]
        lengths += [(f"eval.seq_lens[{i}]", n) for i, n in enumerate(self.eval.seq_lens)]
        for key, seq_len in lengths:
            if model_ok:
                try:
                    self.model.validate_seq_len(seq_len)
                except ValueError as e:
                    problems.append(f"{key}: {str(e).removeprefix('seq_len: ')}")
        if c.constant_tokens_per_step and c.stages and t.micro_batch_size > 0:
            base = c.stages[0].seq_len
            for i, stage in enumerate(c.stages):
                need(base * t.micro_batch_size % stage.seq_len == 0, f"curriculum.stages[{i}].seq_len",
                     f"with constant_tokens_per_step, micro_batch_size * first seq_len ({t.micro_batch_size} * "
                     f"{base}) must be a multiple of {stage.seq_len}")

        need(o.lr > 0, "optimizer.lr", f"must be > 0, got {o.lr}")
        need(o.memory_lr_scale > 0, "optimizer.memory_lr_scale", f"must be > 0, got {o.memory_lr_scale}")
        need(0 <= o.min_lr <= o.lr, "optimizer.min_lr", f"must be in [0, optimizer.lr], got {o.min_lr}")
        need(0 <= o.warmup_tokens <= t.max_tokens, "optimizer.warmup_tokens",
             f"must be in [0, train.max_tokens ({t.max_tokens})], got {o.warmup_tokens}")
        need(o.decay in DECAYS, "optimizer.decay", f"got {o.decay!r}, expected one of {', '.join(DECAYS)}")
        w = self.logging.wandb
        need(w.mode in WANDB_MODES, "logging.wandb.mode", f"got {w.mode!r}, expected one of {', '.join(WANDB_MODES)}")
        need(w.project is None or bool(w.project.strip()), "logging.wandb.project", "must not be empty (null: off)")
        need(0 < o.wsd_decay_fraction <= 1, "optimizer.wsd_decay_fraction",
             f"must be in (0, 1], got {o.wsd_decay_fraction}")
        need(o.weight_decay >= 0, "optimizer.weight_decay", f"must be >= 0, got {o.weight_decay}")
        for key in ("beta1", "beta2"):
            need(0 <= getattr(o, key) < 1, f"optimizer.{key}", f"must be in [0, 1), got {getattr(o, key)}")

        d = self.deepspeed
        need(d.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", f"must be 0, 1, 2 or 3, got {d.zero_stage}")
        need(d.precision in PRECISIONS, "deepspeed.precision",
             f"got {d.precision!r}, expected one of {', '.join(PRECISIONS)}")
        need(not d.offload_params or d.zero_stage == 3, "deepspeed.offload_params", "needs deepspeed.zero_stage 3")
        need(d.param_persistence_threshold is None or d.param_persistence_threshold >= 0,
             "deepspeed.param_persistence_threshold", f"must be >= 0 or null, got {d.param_persistence_threshold}")
        need(self.parallel.tp > 0, "parallel.tp", f"must be > 0, got {self.parallel.tp}")
        need(self.checkpoint.every_steps > 0, "checkpoint.every_steps",
             f"must be > 0, got {self.checkpoint.every_steps}")
        need(self.checkpoint.keep_last > 0, "checkpoint.keep_last", f"must be > 0, got {self.checkpoint.keep_last}")
        need(self.logging.every_steps > 0, "logging.every_steps", f"must be > 0, got {self.logging.every_steps}")
        peak = self.logging.peak_tflops
        need(peak is None or (isinstance(peak, (int, float)) and not isinstance(peak, bool) and peak > 0),
             "logging.peak_tflops", f"must be null or a positive number, got {peak!r}")
        need(self.eval.every_steps >= 0, "eval.every_steps", f"must be >= 0, got {self.eval.every_steps}")
        need(self.eval.samples > 0, "eval.samples", f"must be > 0, got {self.eval.samples}")

        if world_size is not None and self.parallel.tp > 0:
            tp = self.parallel.tp
            need(world_size % tp == 0, "parallel.tp", f"must divide the world size ({world_size}), got {tp}")
            dp = max(1, world_size // tp)
            if t.micro_batch_size > 0:
                need(t.global_batch_size % (t.micro_batch_size * dp) == 0, "train.global_batch_size",
                     f"must be a multiple of micro_batch_size * data-parallel size ({t.micro_batch_size} * {dp}), "
                     f"got {t.global_batch_size}")
            need(self.eval.samples % dp == 0, "eval.samples",
                 f"must be a multiple of the data-parallel size ({dp}), got {self.eval.samples}")
        if problems:
            raise ValueError("invalid config: " + "; ".join(problems))
        reach_warning = self.memory_reach_warning()
        if reach_warning is not None:
            warnings.warn(reach_warning, MemoryReachWarning, stacklevel=2)

    def memory_reach_warning(self) -> str | None:
        """One line when an eval length or the longest curriculum length outgrows a FIFO pool, else None.

        A window of L tokens (they all start at a chunk boundary) loses notes of its first chunk
        before its end once L > (pool_size // notes_per_chunk + 1) * chunk_size: its last chunk reads
        only the notes of the R chunks before it (``model.config.memory_reach_tokens``). Only fifo
        has such a cap; priority, no memory and other archs give None.
        """
        reach = memory_reach_tokens(self.model)
        if reach is None or self.model.memory.eviction != "fifo":
            return None
        mem, chunk = self.model.memory, self.model.mamba.chunk_size
        keeps_all = (mem.pool_size // mem.notes_per_chunk + 1) * chunk  # longest window that loses no note
        over = [n for n in self.eval.seq_lens if n > keeps_all]
        longest = None
        if self.curriculum.stages:
            i, stage = max(enumerate(self.curriculum.stages), key=lambda item: (item[1].seq_len, -item[0]))
            if stage.seq_len > keeps_all:
                longest = f"curriculum.stages[{i}].seq_len {stage.seq_len} (the longest training length)"
        if not over and longest is None:
            return None
        pool = (f"model.memory reach {reach} tokens (eviction fifo, pool_size {mem.pool_size}, notes_per_chunk "
                f"{mem.notes_per_chunk}, chunk {chunk})")
        if over:
            line = f"eval.seq_lens has {', '.join(map(str, over))} > {pool}"
            line += f", as does {longest}" if longest else ""
        else:
            line = f"{longest} > {pool}"
        return (f"{line}: a token reads only the notes of the {reach // chunk} chunks before its own, so notes from "
                f"a window's first chunks are evicted before its end")


class MemoryReachWarning(UserWarning):
    """A run evaluates or trains at a length beyond its FIFO memory pool's reach (RunConfig.memory_reach_warning)."""
