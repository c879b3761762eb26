"""Decoding caches: fixed-size state updated in place by ``step`` (like mamba_ssm's InferenceParams).

MemMamba and Mamba2 caches do not grow with the position: per layer a conv window, an SSM state,
the note pool and the current chunk's mixer outputs and note scores (its notes are picked when it
ends, by the training code). The Transformer's KV cache is allocated
for ``max_seq_len`` tokens up front and reports only the filled part as its size.
"""

from dataclasses import dataclass, fields

import torch


@dataclass
class MixerCache:
    """Recurrent state of one Mamba2 mixer."""

    conv_state: torch.Tensor
    """(B, conv_dim, d_conv - 1): the last pre-convolution x|B|C inputs."""
    ssm_state: torch.Tensor
    """(B, H, P, N) float32 SSM state."""


@dataclass
class MemoryCache:
    """One layer's note pool and the current chunk's outputs and scores."""

    notes: torch.Tensor
    """(B, pool_size, S) notes s_t * n_t in the pool (slot order is irrelevant)."""
    scores: torch.Tensor
    """(B, pool_size) their scores s_t (priority eviction)."""
    positions: torch.Tensor
    """(B, pool_size) int64 token positions (fifo eviction, ties)."""
    valid: torch.Tensor
    """(B, pool_size) bool, False for empty slots."""
    token_keys: torch.Tensor
    """(B, heads, pool_size, S / heads) cross-token keys of the pool (SDPA layout), refreshed per chunk."""
    token_values: torch.Tensor
    """(B, heads, pool_size, S / heads) cross-token values."""
    chunk_outputs: torch.Tensor
    """(B, pool_window - 1 + chunk_size, D) mixer outputs of the current chunk, after the w - 1 before it
    (the pooling windows of its notes); the pad value before position 0."""
    chunk_scores: torch.Tensor
    """(B, chunk_size) note scores s_t of the current chunk's tokens so far."""
    layer_keys: torch.Tensor | None
    """(B, heads, earlier_layers * pool_size, S / heads) cross-layer keys, or None if not a cross-layer layer."""
    layer_values: torch.Tensor | None
    """Same shape as layer_keys."""
    layer_valid: torch.Tensor | None
    """(B, earlier_layers * pool_size) bool."""


@dataclass
class LayerCache:
    mixer: MixerCache
    memory: MemoryCache | None


@dataclass
class MemMambaCache:
    """Cache of a MemMamba / Mamba2 model; ``position`` is the number of tokens consumed."""

    layers: list[LayerCache]
    doc_position: torch.Tensor
    """(B,) int64 tokens consumed since the row's document started (its last EOD, with reset_at_eod):
    the memory's chunks count from there."""
    position: int = 0


@dataclass
class KVCache:
    """Transformer KV cache for all layers, preallocated for max_seq_len tokens."""

    keys: torch.Tensor
    """(n_layers, B, kv_heads, max_seq_len, head_dim)."""
    values: torch.Tensor
    """(n_layers, B, kv_heads, max_seq_len, head_dim)."""
    doc_start: torch.Tensor
    """(B,) int64 position where the row's current document started (after its last EOD, with reset_at_eod)."""
    position: int = 0


def cache_nbytes(cache) -> int:
    """Bytes held by a cache (for the KV cache: the filled positions only)."""
    if isinstance(cache, KVCache):
        per_position = cache.keys[:, :, :, :1].nbytes + cache.values[:, :, :, :1].nbytes
        return per_position * cache.position
    if isinstance(cache, torch.Tensor):
        return cache.nbytes
    if isinstance(cache, list):
        return sum(cache_nbytes(item) for item in cache)
    if cache is None or isinstance(cache, (int, float)):
        return 0
    return sum(cache_nbytes(getattr(cache, f.name)) for f in fields(cache))
