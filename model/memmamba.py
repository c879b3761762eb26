"""MemMamba language model (arXiv 2510.03279): Mamba2 blocks with a note-pool memory.

embedding -> N x [RMSNorm -> Mamba2 mixer -> + residual -> + memory fusion] -> RMSNorm -> tied LM head.

Parameter names equal HF ``Mamba2ForCausalLM``'s (``backbone.embeddings``, ``backbone.layers.{i}.
{norm, mixer.*}``, ``backbone.norm_f``, ``lm_head``); memory parameters live under
``backbone.layers.{i}.memory.*``. With the memory disabled (arch "mamba2") the model is exactly
HF's Mamba2; a fresh MemMamba equals its Mamba2 backbone because the fusion starts at zero.
"""

import torch
import torch.nn as nn

from .config import ModelConfig
from .decode import LayerCache, MemMambaCache, cache_nbytes
from .mamba2 import Mamba2Mixer, RMSNorm
from .memory import ChunkPools, MemoryBlock


class MemMambaBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = Mamba2Mixer(cfg.d_model, cfg.mamba, cfg.norm_eps, cfg.n_layers)
        self.memory = None
        if cfg.memory_enabled:
            every = cfg.memory.cross_layer_every
            cross_layer = every > 0 and layer_idx > 0 and (layer_idx + 1) % every == 0
            self.memory = MemoryBlock(cfg.d_model, cfg.memory, cfg.mamba.chunk_size, cfg.norm_eps, cross_layer)

    def forward(self, x: torch.Tensor, earlier_pools: list[ChunkPools], cache: LayerCache | None = None
                ) -> tuple[torch.Tensor, ChunkPools | None]:
        """x (B, L, D) residual stream -> (B, L, D) float32, and this layer's pools (or None)."""
        y = self.mixer(self.norm(x.to(self.norm.weight.dtype)), cache.mixer if cache else None)
        out = x.float() + y  # residual kept in float32, like HF's residual_in_fp32
        if self.memory is None:
            return out, None
        fused, pools = self.memory(y, earlier_pools)
        if cache is not None:
            self.memory.fill_cache(cache.memory, y, pools)
        return out + fused, pools

    def step(self, x: torch.Tensor, cache: LayerCache, position: int) -> torch.Tensor:
        """x (B, D) -> (B, D) float32 for the token at ``position``."""
        y = self.mixer.step(self.norm(x.to(self.norm.weight.dtype)), cache.mixer)
        out = x.float() + y
        if self.memory is not None:
            out = out + self.memory.step(y, cache.memory, position)
        return out


class MemMambaModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(MemMambaBlock(cfg, i) for i in range(cfg.n_layers))
        self.norm_f = RMSNorm(cfg.d_model, cfg.norm_eps)
        nn.init.normal_(self.embeddings.weight, std=0.02)

    def forward(self, input_ids: torch.Tensor, cache=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """input_ids (B, L) -> final normed hidden (B, L, D) and each layer's output [(B, L, D)] * N."""
        x = self.embeddings(input_ids)
        hidden_states, pools = [], []
        for i, layer in enumerate(self.layers):
            x, layer_pools = layer(x, pools, cache.layers[i] if cache else None)
            pools.append(layer_pools)
            hidden_states.append(x)
        return self.norm_f(x), hidden_states


class MemMambaForCausalLM(nn.Module):
    """MemMamba (or, with the memory off, Mamba2) causal LM. Loss is computed by the caller."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.backbone = MemMambaModel(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight
        else:
            nn.init.normal_(self.lm_head.weight, std=0.02)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden.to(self.lm_head.weight.dtype))

    def forward(self, input_ids: torch.Tensor, return_hidden_states: bool = False):
        """input_ids (B, L) -> logits (B, L, V) [, per-layer outputs [h_1, ..., h_N] each (B, L, D)]."""
        hidden, hidden_states = self.backbone(input_ids)
        logits = self._logits(hidden)
        return (logits, hidden_states) if return_hidden_states else logits

    def final_hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B, L) -> final normed hidden states (B, L, D), the LM head's input
        (for model.loss.chunked_lm_loss, which never materialises all logits)."""
        return self.backbone(input_ids)[0]

    # ---- decoding ----

    def allocate_cache(self, batch_size: int) -> MemMambaCache:
        weight = self.backbone.embeddings.weight
        layers = []
        for i, layer in enumerate(self.backbone.layers):
            memory = None
            if layer.memory is not None:
                memory = layer.memory.allocate_cache(batch_size, weight.shape[1], earlier_layers=i,
                                                     device=weight.device, dtype=weight.dtype)
            layers.append(LayerCache(layer.mixer.allocate_cache(batch_size, weight.device, weight.dtype), memory))
        return MemMambaCache(layers)

    # Decoding runs under inference_mode (cheaper per op than no_grad: a token's step is hundreds of
    # small ops); the returned logits are computed outside it, so they are ordinary tensors that
    # callers (transformers' logits processors) may modify in place.

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, cache: MemMambaCache) -> torch.Tensor:
        """Parallel forward over a prompt (B, L) that also fills a fresh ``cache``; returns logits (B, L, V)."""
        if cache.position != 0:
            raise ValueError(f"prefill needs a fresh cache (position 0), got position {cache.position}")
        with torch.inference_mode():
            hidden, _ = self.backbone(input_ids, cache)
            cache.position = input_ids.shape[1]
            self._refresh_cross_layer(cache)
        return self._logits(hidden.clone())

    @torch.no_grad()
    def step(self, input_ids: torch.Tensor, cache: MemMambaCache) -> torch.Tensor:
        """One token per sequence: input_ids (B,) -> logits (B, V); updates ``cache`` in place."""
        with torch.inference_mode():
            x = self.backbone.embeddings(input_ids)
            for layer, layer_cache in zip(self.backbone.layers, cache.layers):
                x = layer.step(x, layer_cache, cache.position)
            cache.position += 1
            if cache.position % self.config.mamba.chunk_size == 0 and self.config.memory_enabled:
                # The chunk ended: every layer picks its notes into its pool, only now, after all
                # layers read the old pools, so no token sees notes of its own chunk.
                start = cache.position - self.config.mamba.chunk_size
                for layer, layer_cache in zip(self.backbone.layers, cache.layers):
                    layer.memory.end_chunk(layer_cache.memory, start)
                self._refresh_cross_layer(cache)
            x = self.backbone.norm_f(x)
        return self._logits(x.clone())

    def _refresh_cross_layer(self, cache: MemMambaCache) -> None:
        if not self.config.memory_enabled:
            return
        memories = [layer_cache.memory for layer_cache in cache.layers]
        for i, layer in enumerate(self.backbone.layers):
            layer.memory.refresh_cross_layer(memories[i], memories[:i])

    @staticmethod
    def cache_nbytes(cache: MemMambaCache) -> int:
        return cache_nbytes(cache)
