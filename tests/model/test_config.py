"""Bad model configs raise one ValueError naming every offending field."""

import pytest

from model import ModelConfig, build_model

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
