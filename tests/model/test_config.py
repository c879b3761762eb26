"""Bad model configs raise one ValueError naming every offending field."""

import pytest
import torch

from model import ModelConfig, build_model
from model.config import memory_reach_tokens
from model.memory import ChunkPools

from .conftest import tiny_config


def test_defaults_are_valid_for_every_arch():
    for arch in ("memmamba", "mamba2", "transformer"):
        ModelConfig(arch=arch).validate()


@pytest.mark.parametrize("mutate,field", [
    (lambda c: setattr(c, "arch", "rwkv"), "model.arch"),
    (lambda c: setattr(c.memory, "pooling", "avg"), "model.memory.pooling"),
    (lambda c: setattr(c.memory, "eviction", "lru"), "model.memory.eviction"),
    (lambda c: setattr(c.memory, "pool_size", 1), "model.memory.pool_size"),
    (lambda c: setattr(c.memory, "heads", 3), "model.memory.heads"),
    (lambda c: setattr(c.mamba, "ngroups", 3), "model.mamba.ngroups"),
    (lambda c: setattr(c.mamba, "headdim", 7), "model.mamba.headdim"),
    (lambda c: setattr(c.mamba, "chunk_size", 0), "model.mamba.chunk_size"),
    (lambda c: setattr(c.memory, "tau1", 1.5), "model.memory.tau1"),
    (lambda c: setattr(c.memory, "gate_temperature", 0.0), "model.memory.gate_temperature"),
    (lambda c: setattr(c, "vocab_size", "32000"), "model.vocab_size"),
])
def test_bad_field_is_named(mutate, field):
    cfg = tiny_config("memmamba")
    mutate(cfg)
    with pytest.raises(ValueError, match=field.replace(".", r"\.") + ":"):
        build_model(cfg)


def test_transformer_fields_are_checked():
    cfg = tiny_config("transformer")
    cfg.transformer.n_heads, cfg.transformer.n_kv_heads = 5, 2
    with pytest.raises(ValueError, match=r"model\.transformer\.n_heads: must divide d_model"):
        cfg.validate()
    cfg.transformer.n_heads = 4
    cfg.transformer.n_kv_heads = 3
    with pytest.raises(ValueError, match=r"model\.transformer\.n_kv_heads"):
        cfg.validate()


def test_all_problems_reported_at_once():
    cfg = tiny_config("memmamba")
    cfg.memory.pooling, cfg.mamba.ngroups, cfg.memory.heads = "avg", 3, 5
    with pytest.raises(ValueError) as error:
        cfg.validate()
    message = str(error.value)
    assert message.count("model.") == 3 and "\n" not in message


def test_memory_section_ignored_for_mamba2():
    cfg = tiny_config("mamba2", pool_size=1)  # would be invalid for memmamba
    cfg.validate()
    assert not cfg.memory_enabled
    assert not any(".memory." in name for name, _ in build_model(cfg).named_parameters())


def test_seq_len_must_be_a_multiple_of_chunk_size():
    cfg = tiny_config("memmamba")
    cfg.validate_seq_len(4 * cfg.mamba.chunk_size)
    with pytest.raises(ValueError, match=r"model\.mamba\.chunk_size"):
        cfg.validate_seq_len(4 * cfg.mamba.chunk_size + 1)
    transformer = tiny_config("transformer")
    transformer.validate_seq_len(100)  # any length up to max_seq_len
    with pytest.raises(ValueError, match=r"model\.transformer\.max_seq_len"):
        transformer.validate_seq_len(transformer.transformer.max_seq_len + 1)


@pytest.mark.parametrize("pool_size,notes_per_chunk,chunk,reach", [
    (8, 2, 64, 256),      # configs/quickstart.yaml
    (16, 2, 64, 512),     # configs/repro_small.yaml
    (50, 4, 256, 3328),   # configs/memmamba_130m_pg19.yaml: ceil(50 / 4) = 13 chunks
    (5, 2, 8, 24),        # tiny_config
])
def test_fifo_reach_is_ceil_pool_over_notes_times_chunk(pool_size, notes_per_chunk, chunk, reach):
    cfg = tiny_config("memmamba", pool_size=pool_size, notes_per_chunk=notes_per_chunk, eviction="fifo")
    cfg.mamba.chunk_size = chunk
    assert memory_reach_tokens(cfg) == reach


def test_reach_is_none_without_a_position_cap_or_without_memory():
    assert memory_reach_tokens(tiny_config("memmamba", eviction="priority")) is None
    assert memory_reach_tokens(tiny_config("memmamba", enabled=False, eviction="fifo")) is None
    assert memory_reach_tokens(tiny_config("mamba2", eviction="fifo")) is None
    assert memory_reach_tokens(tiny_config("transformer", eviction="fifo")) is None


def test_reach_of_an_unknown_eviction_is_not_guessed():
    with pytest.raises(NotImplementedError, match="model.memory.eviction 'lru'"):
        memory_reach_tokens(tiny_config("memmamba", eviction="lru"))


def _pools(pool_size: int, k: int, chunk: int, nchunks: int, eviction: str, scores: torch.Tensor) -> ChunkPools:
    """The real pool bookkeeping fed k valid notes per chunk at distinct positions (newest last within a chunk)."""
    offsets = torch.stack([torch.randperm(chunk, generator=torch.Generator().manual_seed(j))[:k].sort().values
                           for j in range(nchunks)])
    positions = (torch.arange(nchunks).unsqueeze(1) * chunk + offsets).unsqueeze(0)  # (1, nc, k)
    notes = torch.zeros(1, nchunks, k, 1)
    return ChunkPools.build(notes, scores.view(1, nchunks, k), positions, torch.ones(1, nchunks, k, dtype=torch.bool),
                            pool_size, eviction)


@pytest.mark.parametrize("pool_size,k", [(16, 2), (8, 2), (50, 4), (5, 2), (7, 3)])
def test_fifo_reach_matches_the_pool_each_chunk_reads(pool_size, k):
    """memory_reach_tokens against ChunkPools: a token of chunk j reads notes of chunks j - R .. j - 1 only
    (R = reach / chunk), all of them from chunk j - pool_size // k on, the pool_size % k newest of chunk j - R."""
    chunk, nchunks = 8, 40
    cfg = tiny_config("memmamba", pool_size=pool_size, notes_per_chunk=k, eviction="fifo")
    reach = memory_reach_tokens(cfg)
    r, full, rest = reach // chunk, pool_size // k, pool_size % k
    pools = _pools(pool_size, k, chunk, nchunks, "fifo", torch.rand(nchunks * k) * 0.4 + 0.55)
    all_positions = pools.positions.view(nchunks, k)
    for j in range(nchunks + 1):
        _, _, positions, valid = pools.pool_after(j)  # the pool chunk j reads
        seen = set(positions[0][valid[0]].tolist())
        expected = {p for i in range(max(0, j - full), j) for p in all_positions[i].tolist()}
        if rest and j - r >= 0:
            expected |= set(all_positions[j - r, k - rest:].tolist())
        assert seen == expected, j
        if seen:
            assert min(seen) >= j * chunk - reach  # nothing older than the reach before the chunk's start
        if j > r:
            assert min(seen) // chunk == j - r  # and the reach is reached


def test_priority_keeps_a_top_note_at_any_distance():
    chunk, nchunks, pool_size, k = 8, 60, 4, 2
    scores = torch.rand(nchunks * k) * 0.3 + 0.55
    scores[0] = 0.99  # the first note outranks every later one
    for eviction, kept in (("priority", True), ("fifo", False)):
        pools = _pools(pool_size, k, chunk, nchunks, eviction, scores)
        first = pools.positions[0, 0].item()
        _, _, positions, valid = pools.pool_after(nchunks)
        assert (first in positions[0][valid[0]].tolist()) == kept, eviction
