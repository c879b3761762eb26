"""The run config: every shipped YAML loads and validates; bad keys, types and layouts fail with one clear line."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from model.config import memory_reach_tokens
from pretrain.config import MemoryReachWarning, RunConfig, apply_override, config_hash, load_config, save_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


MINIMAL = """
model: {vocab_size: 512, d_model: 64, n_layers: 2, mamba: {chunk_size: 64, headdim: 16, d_state: 16}}
data: {path: /nowhere}
curriculum: {stages: [{tokens: 0, seq_len: 128}]}
eval: {seq_lens: [128]}
"""


def test_configs_are_shipped():
    names = {p.name for p in CONFIGS}
    assert {"quickstart.yaml", "memmamba_130m_pg19.yaml", "mamba2_130m_pg19.yaml",
            "transformer_130m_pg19.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads_and_validates(path: Path):
    cfg = load_config(RunConfig, path)
    # The world size each config is written for: paper scale on 8 GPUs, quickstart on 2 CPU processes.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MemoryReachWarning)  # a fifo pool's reach: tested below
        cfg.validate(world_size=8 if "pg19" in path.name else 2 if path.name == "quickstart.yaml" else 1)
    assert cfg.model.vocab_size > 0 and cfg.curriculum.stages[0].tokens == 0


def test_quickstart_has_a_curriculum_and_zero3():
    cfg = load_config(RunConfig, CONFIGS[0].parent / "quickstart.yaml")
    assert [s.seq_len for s in cfg.curriculum.stages] == [256, 512, 1024]
    assert cfg.deepspeed.zero_stage == 3


def test_precedence_cli_over_file_over_defaults(tmp_path: Path):
    path = write(tmp_path, MINIMAL + "train: {seed: 7}\n")
    cfg = load_config(RunConfig, path, ["train.seed=9", "optimizer.lr=1e-3",
                                        "curriculum.stages=[{tokens: 0, seq_len: 64}]"])
    assert cfg.train.seed == 9  # CLI beats file
    assert cfg.train.micro_batch_size == 2  # default kept
    assert cfg.optimizer.lr == pytest.approx(1e-3)  # '1e-3' (a YAML 1.1 string) becomes a float
    assert cfg.curriculum.stages[0].seq_len == 64
    assert load_config(RunConfig, path).train.seed == 7


@pytest.mark.parametrize("text, message", [
    (MINIMAL + "train: {sed: 3}\n", "run.yaml: unknown key 'train.sed'"),
    (MINIMAL + "bogus: 1\n", "run.yaml: unknown key 'bogus'"),
    (MINIMAL.replace("data: {path: /nowhere}", ""), "run.yaml: missing required key 'data'"),
    (MINIMAL.replace("{path: /nowhere}", "{blend: [{path: /a}]}"), "run.yaml: missing required key 'data.blend[0].weight'"),
    (MINIMAL + "train: {seed: three}\n", "run.yaml: train.seed: expected int, got str 'three'"),
    (MINIMAL + "deepspeed: {activation_checkpointing: 1}\n", "deepspeed.activation_checkpointing: expected bool"),
    (MINIMAL.replace("{tokens: 0, seq_len: 128}", "{tokens: 0}"),
     "run.yaml: missing required key 'curriculum.stages[0].seq_len'"),
    ("model: [1, 2]\ndata: {path: x}\n", "run.yaml: model.: expected a mapping"),
    ("model: {\n", "run.yaml: not valid YAML"),
])
def test_bad_file_is_one_clear_line(tmp_path: Path, text: str, message: str):
    with pytest.raises(ValueError) as info:
        load_config(RunConfig, write(tmp_path, text))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("override, message", [
    ("train.sed=3", "--set train.sed=3: unknown key 'train.sed'"),
    ("nothing.here=3", "--set nothing.here=3: unknown key 'nothing'"),
    ("train.seed", "--set train.seed: expected KEY=VALUE"),
    ("parallel.tp=two", "--set parallel.tp=two: parallel.tp: expected int"),
])
def test_bad_override_names_it(tmp_path: Path, override: str, message: str):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        load_config(RunConfig, write(tmp_path, MINIMAL), [override])


def test_missing_file_is_named(tmp_path: Path):
    with pytest.raises(ValueError, match="nope.yaml: config file not found"):
        load_config(RunConfig, tmp_path / "nope.yaml")


def test_cross_field_problems_are_collected_and_raised_once(tmp_path: Path):
    cfg = load_config(RunConfig, write(tmp_path, MINIMAL), [
        "curriculum.stages=[{tokens: 0, seq_len: 100}, {tokens: 0, seq_len: 128}]",
        "optimizer.min_lr=1.0", "parallel.tp=3", "model.memory.heads=5", "optimizer.decay=step",
        "optimizer.wsd_decay_fraction=0", "logging.wandb.mode=cloud", "deepspeed.param_persistence_threshold=-1"])
    with pytest.raises(ValueError) as info:
        cfg.validate(world_size=4)
    message = str(info.value)
    for expected in ["model.memory.heads: must divide memory.summary_dim",
                     "curriculum.stages[1].tokens: must be greater than the previous stage's (0)",
                     "optimizer.min_lr: must be in [0, optimizer.lr]",
                     "parallel.tp: must divide the world size (4), got 3",
                     "optimizer.decay: got 'step', expected one of cosine, linear, constant, wsd",
                     "optimizer.wsd_decay_fraction: must be in (0, 1], got 0",
                     "logging.wandb.mode: got 'cloud', expected one of online, offline, disabled",
                     "deepspeed.param_persistence_threshold: must be >= 0 or null, got -1"]:
        assert expected in message, message
    assert "\n" not in message


def test_seq_len_must_be_a_multiple_of_chunk_size(tmp_path: Path):
    cfg = load_config(RunConfig, write(tmp_path, MINIMAL), ["curriculum.stages=[{tokens: 0, seq_len: 100}]"])
    with pytest.raises(ValueError, match=r"curriculum.stages\[0\].seq_len: 100 is not a multiple of "
                                         r"model.mamba.chunk_size \(64\)"):
        cfg.validate()


def test_batch_must_split_over_data_parallel_ranks(tmp_path: Path):
    cfg = load_config(RunConfig, write(tmp_path, MINIMAL),
                      ["train.global_batch_size=6", "train.micro_batch_size=2", "eval.samples=6"])
    cfg.validate(world_size=3)
    with pytest.raises(ValueError, match=r"train.global_batch_size: must be a multiple of micro_batch_size \* "
                                         r"data-parallel size \(2 \* 2\), got 6"):
        cfg.validate(world_size=2)


def test_constant_tokens_needs_divisible_micro_batches(tmp_path: Path):
    cfg = load_config(RunConfig, write(tmp_path, MINIMAL), [
        "curriculum.constant_tokens_per_step=true", "train.micro_batch_size=1",
        "curriculum.stages=[{tokens: 0, seq_len: 64}, {tokens: 100, seq_len: 128}]"])
    with pytest.raises(ValueError, match=r"curriculum.stages\[1\].seq_len: with constant_tokens_per_step"):
        cfg.validate()


def test_saved_config_reloads_identically(tmp_path: Path):
    cfg = load_config(RunConfig, write(tmp_path, MINIMAL), ["train.seed=5"])
    save_config(cfg, tmp_path / "out" / "config.yaml")
    again = load_config(RunConfig, tmp_path / "out" / "config.yaml")
    assert again == cfg and config_hash(again) == config_hash(cfg)
    apply_override(again, "model.d_model=128")
    assert config_hash(again.model) != config_hash(cfg.model)


# ceil(pool_size / notes_per_chunk) * chunk_size of each shipped MemMamba config, were its pool fifo.
FIFO_REACH = {"quickstart.yaml": 256, "repro_small.yaml": 512, "memmamba_130m_pg19.yaml": 3328,
              "repro_memory.yaml": 128}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_reach(path: Path):
    cfg = load_config(RunConfig, path)
    reach = memory_reach_tokens(cfg.model)
    if not cfg.model.memory_enabled:
        assert reach is None and path.name not in FIFO_REACH
        return
    assert path.name in FIFO_REACH, "a new MemMamba config: add its fifo reach to FIFO_REACH"
    assert reach == (FIFO_REACH[path.name] if cfg.model.memory.eviction == "fifo" else None)
    fifo = load_config(RunConfig, path, ["model.memory.eviction=fifo"])
    assert memory_reach_tokens(fifo.model) == FIFO_REACH[path.name]
    if cfg.model.memory.eviction == "priority":
        assert cfg.memory_reach_warning() is None


def reach_config(tmp_path: Path, eviction: str, seq_lens: list[int], longest: int = 128,
                 pool: tuple[int, int, int] = (16, 2, 64)) -> RunConfig:
    pool_size, k, chunk = pool
    return load_config(RunConfig, write(tmp_path, MINIMAL), [
        f"model.memory.eviction={eviction}", f"model.memory.pool_size={pool_size}",
        f"model.memory.notes_per_chunk={k}", f"model.mamba.chunk_size={chunk}", f"eval.seq_lens={seq_lens}",
        f"curriculum.stages=[{{tokens: 0, seq_len: {chunk}}}, {{tokens: 1000, seq_len: {longest}}}]"])


def validate_warnings(cfg: RunConfig) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg.validate()
    return [str(w.message) for w in caught if issubclass(w.category, MemoryReachWarning)]


def test_eval_length_beyond_a_fifo_reach_warns_once_naming_the_keys(tmp_path: Path):
    cfg = reach_config(tmp_path, "fifo", [256, 1024, 2048], longest=1024)
    assert validate_warnings(cfg) == [
        "eval.seq_lens has 1024, 2048 > model.memory reach 512 tokens (eviction fifo, pool_size 16, "
        "notes_per_chunk 2, chunk 64), as does curriculum.stages[1].seq_len 1024 (the longest training length): "
        "a token reads only the notes of the 8 chunks before its own, so notes from a window's first chunks are "
        "evicted before its end"]
    only_training = reach_config(tmp_path, "fifo", [256], longest=1024)
    assert validate_warnings(only_training)[0].startswith(
        "curriculum.stages[1].seq_len 1024 (the longest training length) > model.memory reach 512 tokens")


def test_no_reach_warning_for_priority_or_without_memory(tmp_path: Path):
    assert validate_warnings(reach_config(tmp_path, "priority", [1024, 65536], longest=1024)) == []
    cfg = reach_config(tmp_path, "fifo", [1024, 65536], longest=1024)
    cfg.model.arch = "mamba2"
    assert validate_warnings(cfg) == []


@pytest.mark.parametrize("pool,length,warns", [
    ((16, 2, 64), 512, False),    # the reach
    ((16, 2, 64), 576, False),    # 9 chunks: the last reads the 8 before it, all of the window
    ((16, 2, 64), 640, True),     # 10 chunks: the first chunk's notes are gone before the last
    ((50, 4, 256), 3328, False),  # reach 13 chunks, every note of the last 12
    ((50, 4, 256), 3584, True),   # 14 chunks: 2 notes of the first chunk are gone before the last
])
def test_reach_warning_is_exact_at_the_edge(tmp_path: Path, pool, length, warns):
    cfg = reach_config(tmp_path, "fifo", [length], longest=pool[2], pool=pool)
    assert bool(validate_warnings(cfg)) == warns
