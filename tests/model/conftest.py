"""Tiny configs and weight randomisation shared by the model tests."""

import pytest
import torch

from model import ModelConfig
from model.config import Mamba2Config, MemoryConfig, TransformerConfig

CHUNK = 8


def tiny_config(arch: str = "memmamba", n_layers: int = 4, **memory) -> ModelConfig:
    """A few-thousand-parameter model: chunks of 8 tokens, a 5-note pool filled 2 notes per chunk."""
    memory_defaults = dict(pool_size=5, notes_per_chunk=2, summary_dim=16, heads=2, pool_window=3,
                           cross_layer_every=2, tau1=0.5)
    return ModelConfig(
        arch=arch, vocab_size=61, d_model=32, n_layers=n_layers,
        mamba=Mamba2Config(d_state=8, headdim=8, expand=2, ngroups=2, d_conv=4, chunk_size=CHUNK),
        memory=MemoryConfig(**{**memory_defaults, **memory}),
        transformer=TransformerConfig(n_heads=4, n_kv_heads=2, ffn_hidden=48, rope_theta=500.0, max_seq_len=128),
    )


@torch.no_grad()
def make_memory_matter(model: torch.nn.Module, seed: int = 0) -> None:
    """Replace the (zero-initialised) memory weights by large random ones so the memory visibly
    changes the logits, and spread the note scores around tau1."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if ".memory." in name and "norm" not in name:
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3)


@torch.no_grad()
def make_mixer_matter(model: torch.nn.Module, seed: int = 0) -> None:
    """Scale up the mixer (SSM or attention) projections so they dominate the logits (sharper
    parity tests)."""
    gen = torch.Generator().manual_seed(seed)
    mixer_weights = ("in_proj", "out_proj", "conv1d.weight", "self_attn", "mlp")
    for name, param in model.named_parameters():
        if any(part in name for part in mixer_weights):
            param.copy_(torch.randn(param.shape, generator=gen) * 0.2)


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Tiny shapes run fastest on one thread (and leave the second core to other jobs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
