"""Tiny TP-splittable configs and weight randomisation shared by the tensor-parallel tests."""

import pytest
import torch

from model import ModelConfig
from model.config import Mamba2Config, MemoryConfig, TransformerConfig


def tp_config(arch: str, ngroups: int = 2, tie_embeddings: bool = True) -> ModelConfig:
    """A few-thousand-parameter model splittable over 2 ranks (4 with ngroups=4): 4 SSM heads in
    ``ngroups`` groups, chunks of 8 tokens with the memory on (a 4-note pool filled 2 notes per
    chunk, cross-layer reads in layer 1), and a Transformer with 4 query / 2 key-value heads."""
    return ModelConfig(
        arch=arch, vocab_size=64, d_model=32, n_layers=2, tie_embeddings=tie_embeddings,
        mamba=Mamba2Config(d_state=8, headdim=16, expand=2, ngroups=ngroups, d_conv=4, chunk_size=8),
        memory=MemoryConfig(pool_size=4, notes_per_chunk=2, summary_dim=16, heads=2, pool_window=3,
                            cross_layer_every=2, tau1=0.5),
        transformer=TransformerConfig(n_heads=4, n_kv_heads=2, ffn_hidden=48, max_seq_len=64),
    )


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere (the memory's zero-initialised fusions included), so every
    parameter shapes the logits and gets a gradient; SSM parameters stay in their valid ranges."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen)
        if name.endswith(("A_log", "D", "dt_bias")) or "norm" in name:
            param.add_(0.1 * noise)
        else:
            param.copy_(0.3 * noise)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny shapes run fastest on one thread (and leave the second core to other jobs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
