"""Llama-style Transformer baseline: RMSNorm, RoPE, grouped-query SDPA attention, SwiGLU, KV cache.

Parameter names equal HF ``LlamaForCausalLM``'s (``model.embed_tokens``, ``model.layers.{i}.
{self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj, input_layernorm, post_attention_layernorm}``,
``model.norm``, ``lm_head``) and so do the numerics (rotate-half RoPE). It shares ModelConfig,
the RMSNorm, the embedding init and the tied head with MemMamba, so comparisons differ only in
the mixer.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .decode import KVCache, cache_nbytes
from .mamba2 import RMSNorm


def rope_tables(head_dim: int, positions: torch.Tensor, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (L, head_dim) for rotate-half RoPE at integer ``positions`` (L,)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    freqs = positions.float()[:, None] * inv_freq[None]  # (L, head_dim / 2)
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, L, hd) rotated by position: x cos + rotate_half(x) sin."""
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        t = cfg.transformer
        self.head_dim = cfg.d_model // t.n_heads
        self.theta = t.rope_theta
        self.q_proj = nn.Linear(cfg.d_model, t.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, t.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, t.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(t.n_heads * self.head_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, start: int, kv: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """x (B, L, D) at positions start..start+L-1. With ``kv`` = (keys, values) buffers
        (B, kv_heads, max_len, hd), the new keys/values are written there and attention runs over
        all cached positions (decode / prefill); without, causal attention over x alone."""
        batch, seqlen, _ = x.shape
        q = self.q_proj(x).view(batch, seqlen, -1, self.head_dim).transpose(1, 2)  # (B, H, L, hd)
        k = self.k_proj(x).view(batch, seqlen, -1, self.head_dim).transpose(1, 2)  # (B, KVH, L, hd)
        v = self.v_proj(x).view(batch, seqlen, -1, self.head_dim).transpose(1, 2)
        cos, sin = rope_tables(self.head_dim, torch.arange(start, start + seqlen, device=x.device), self.theta)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None:
            kv[0][:, :, start:start + seqlen] = k
            kv[1][:, :, start:start + seqlen] = v
            k, v = kv[0][:, :, :start + seqlen], kv[1][:, :, :start + seqlen]
        # A single query at the end attends to everything cached; otherwise causal from `start`.
        causal = seqlen > 1
        if causal and start > 0:
            raise ValueError("multi-token attention after cached tokens is not supported (prefill a fresh cache)")
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)  # (B, H, L, hd)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seqlen, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = cfg.transformer.ffn_hidden
        self.gate_proj = nn.Linear(cfg.d_model, hidden, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, start: int = 0, kv=None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), start, kv)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)

    def forward(self, input_ids: torch.Tensor, start: int = 0, cache: KVCache | None = None):
        """input_ids (B, L) -> final normed hidden (B, L, D) and each layer's output [(B, L, D)] * N."""
        x = self.embed_tokens(input_ids)
        hidden_states = []
        for i, layer in enumerate(self.layers):
            x = layer(x, start, (cache.keys[i], cache.values[i]) if cache is not None else None)
            hidden_states.append(x)
        return self.norm(x), hidden_states


class LlamaForCausalLM(nn.Module):
    """Transformer baseline with the same interface as MemMambaForCausalLM."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        for module in self.modules():  # GPT-2/Llama init; output projections scaled with depth
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
        for layer in self.model.layers:
            for linear in (layer.self_attn.o_proj, layer.mlp.down_proj):
                linear.weight.data.div_(math.sqrt(2 * cfg.n_layers))
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, return_hidden_states: bool = False):
        """input_ids (B, L) -> logits (B, L, V) [, per-layer outputs [h_1, ..., h_N] each (B, L, D)]."""
        hidden, hidden_states = self.model(input_ids)
        logits = self.lm_head(hidden)
        return (logits, hidden_states) if return_hidden_states else logits

    def final_hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B, L) -> final normed hidden states (B, L, D), the LM head's input."""
        return self.model(input_ids)[0]

    def allocate_cache(self, batch_size: int) -> KVCache:
        cfg, weight = self.config, self.lm_head.weight
        head_dim = cfg.d_model // cfg.transformer.n_heads
        shape = (cfg.n_layers, batch_size, cfg.transformer.n_kv_heads, cfg.transformer.max_seq_len, head_dim)
        return KVCache(torch.zeros(shape, device=weight.device, dtype=weight.dtype),
                       torch.zeros(shape, device=weight.device, dtype=weight.dtype))

    def _check_room(self, cache: KVCache, new_tokens: int) -> None:
        limit = self.config.transformer.max_seq_len
        if cache.position + new_tokens > limit:
            raise ValueError(f"KV cache full: {cache.position + new_tokens} tokens exceed "
                             f"model.transformer.max_seq_len ({limit})")

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Parallel forward over a prompt (B, L) that fills a fresh ``cache``; returns logits (B, L, V)."""
        if cache.position != 0:
            raise ValueError(f"prefill needs a fresh cache (position 0), got position {cache.position}")
        self._check_room(cache, input_ids.shape[1])
        hidden, _ = self.model(input_ids, 0, cache)
        cache.position = input_ids.shape[1]
        return self.lm_head(hidden)

    @torch.no_grad()
    def step(self, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One token per sequence: input_ids (B,) -> logits (B, V); appends to ``cache``."""
        self._check_room(cache, 1)
        hidden, _ = self.model(input_ids[:, None], cache.position, cache)
        cache.position += 1
        return self.lm_head(hidden[:, 0])

    @staticmethod
    def cache_nbytes(cache: KVCache) -> int:
        return cache_nbytes(cache)
