"""model/hf/mapping.py: one table, both directions, and clear errors for configs we cannot represent."""

import math
from dataclasses import asdict

import pytest
import transformers

from model import ModelConfig
from model.hf.mapping import hf_config_fields, model_config_fields
from pretrain.config import from_dict

from .conftest import tiny_config


@pytest.mark.parametrize("arch, model_type", [("memmamba", "memmamba"), ("mamba2", "mamba2"),
                                              ("transformer", "llama")])
def test_config_round_trip(arch, model_type):
    cfg = tiny_config(arch)
    cfg.norm_eps, cfg.tie_embeddings = 1e-6, False
    got_type, fields = hf_config_fields(asdict(cfg))
    assert got_type == model_type
    back = from_dict(ModelConfig, model_config_fields(model_type, fields), "test")
    sections = {"memmamba": ("mamba", "memory"), "mamba2": ("mamba",), "llama": ("transformer",)}[model_type]
    for name in ("arch", "vocab_size", "d_model", "n_layers", "norm_eps", "tie_embeddings", *sections):
        assert getattr(back, name) == getattr(cfg, name), name


def test_memory_disabled_is_native_mamba2():
    cfg = tiny_config("memmamba")
    cfg.memory.enabled = False
    model_type, fields = hf_config_fields(asdict(cfg))
    assert model_type == "mamba2" and "memory" not in fields
    config = transformers.Mamba2Config(**fields)  # HF's own validation accepts it
    assert config.num_heads * config.head_dim == config.hidden_size * config.expand
    assert list(config.time_step_limit) == [0.0, math.inf]


def test_llama_fields_are_hf_llama_fields():
    _, fields = hf_config_fields(asdict(tiny_config("transformer")))
    config = transformers.LlamaConfig(**fields)
    assert config.rope_parameters["rope_theta"] == 500.0 and config.head_dim == 8
    assert config.num_key_value_heads == 2 and config.intermediate_size == 48


def mamba2_fields() -> dict:
    return hf_config_fields(asdict(tiny_config("mamba2")))[1]


@pytest.mark.parametrize("change, message", [
    ({"use_conv_bias": False}, "use_conv_bias = False is not supported"),
    ({"time_step_limit": [0.0, 1.0]}, "time_step_limit = [0.0, 1.0] is not supported"),
    ({"use_bias": True}, "use_bias = True is not supported"),
    ({"num_heads": 6}, "num_heads = 6 does not match the other fields (expected 8)"),
    ({"state_size": None}, "missing field 'state_size'"),
])
def test_unsupported_hf_fields_are_named(change, message):
    fields = {**mamba2_fields(), **change}
    with pytest.raises(ValueError) as err:
        model_config_fields("mamba2", fields, "some/config.json")
    assert str(err.value).startswith("some/config.json: ") and message in str(err.value)


def test_unknown_model_type():
    with pytest.raises(ValueError, match="unknown model_type 'gpt2', expected one of mamba2, memmamba, llama"):
        model_config_fields("gpt2", {}, "x/config.json")
