"""Step-by-step decoding gives the parallel forward's logits; caches stay O(1) for the Mamba archs."""

import pytest
import torch

from model import build_model, cache_nbytes

from .conftest import CHUNK, make_memory_matter, make_mixer_matter, tiny_config

SEQLEN = 5 * CHUNK + 3  # five whole chunks (the 5-note pool wraps around) and a ragged one

MODELS = {
    "memmamba-priority-max": dict(arch="memmamba"),  # the default retention
    "memmamba-fifo-max": dict(arch="memmamba", eviction="fifo"),
    "memmamba-priority-mean": dict(arch="memmamba", eviction="priority", pooling="mean"),
    "memmamba-priority-concat": dict(arch="memmamba", pooling="concat"),
    "memmamba-priority-none-tau0": dict(arch="memmamba", pooling="none", tau1=0.0, cross_layer_every=1),
    "memmamba-fifo-none-tau0": dict(arch="memmamba", eviction="fifo", pooling="none", tau1=0.0, cross_layer_every=1),
    "mamba2": dict(arch="mamba2"),
    "transformer": dict(arch="transformer"),
}


def build(name: str) -> torch.nn.Module:
    model = build_model(tiny_config(**MODELS[name])).eval()
    make_mixer_matter(model)
    make_memory_matter(model)
    return model


@pytest.mark.parametrize("name", list(MODELS))
def test_steps_equal_parallel_forward(name):
    model = build(name)
    ids = torch.randint(0, model.config.vocab_size, (2, SEQLEN))
    with torch.no_grad():
        parallel = model(ids)
    cache = model.allocate_cache(2)
    stepped = torch.stack([model.step(ids[:, t], cache) for t in range(SEQLEN)], dim=1)
    assert (stepped - parallel).abs().max() <= 1e-4
    assert parallel.abs().max() > 0.1  # the comparison is not between near-zero logits


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("prompt_len", [2 * CHUNK, 2 * CHUNK + 5])
def test_prefill_then_steps_equal_parallel_forward(name, prompt_len):
    model = build(name)
    ids = torch.randint(0, model.config.vocab_size, (2, SEQLEN))
    with torch.no_grad():
        parallel = model(ids)
    cache = model.allocate_cache(2)
    prefill = model.prefill(ids[:, :prompt_len], cache)
    stepped = torch.stack([model.step(ids[:, t], cache) for t in range(prompt_len, SEQLEN)], dim=1)
    assert (torch.cat([prefill, stepped], dim=1) - parallel).abs().max() <= 1e-4


def test_memory_changes_decoded_logits():
    """Guard against a decode path that silently ignores the pool."""
    model = build("memmamba-fifo-max")
    ids = torch.randint(0, model.config.vocab_size, (1, SEQLEN))
    cache = model.allocate_cache(1)
    with_memory = torch.stack([model.step(ids[:, t], cache) for t in range(SEQLEN)], dim=1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("token_out.weight", "layer_out.weight")):
                param.zero_()
    cache = model.allocate_cache(1)
    without = torch.stack([model.step(ids[:, t], cache) for t in range(SEQLEN)], dim=1)
    assert (with_memory - without)[:, CHUNK:].abs().max() > 1e-2  # from the second chunk on
    assert (with_memory - without)[:, :CHUNK].abs().max() == 0  # nothing in the pool yet


@pytest.mark.parametrize("arch", ["memmamba", "mamba2", "transformer"])
def test_cache_size_flat_for_mamba_grows_for_transformer(arch):
    cfg = tiny_config(arch, n_layers=2)
    cfg.d_model, cfg.vocab_size = 16, 17
    cfg.transformer.n_heads, cfg.transformer.n_kv_heads, cfg.transformer.max_seq_len = 2, 1, 16 * 1024 + 8
    model = build_model(cfg).eval()
    sizes = {}
    for position in (1024, 16 * 1024):
        cache = model.allocate_cache(1)
        model.prefill(torch.randint(0, cfg.vocab_size, (1, position - 2)), cache)
        for _ in range(2):
            model.step(torch.randint(0, cfg.vocab_size, (1,)), cache)
        assert cache.position == position
        sizes[position] = model.cache_nbytes(cache)
        assert sizes[position] == cache_nbytes(cache)
    if arch == "transformer":
        assert sizes[16 * 1024] == 16 * sizes[1024]
    else:
        assert sizes[16 * 1024] == sizes[1024] > 0
