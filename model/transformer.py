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
from .documents import position_in_document, reset_document_ids
from .loss import LMHead
from .mamba2 import RMSNorm


def rope_tables(head_dim: int, positions: torch.Tensor, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (..., L, head_dim) for rotate-half RoPE at integer ``positions`` (..., L)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    freqs = positions.float().unsqueeze(-1) * inv_freq  # (..., L, head_dim / 2)
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

    def forward(self, x: torch.Tensor, start: int, kv: tuple[torch.Tensor, torch.Tensor] | None,
                documents: "Documents | None" = None) -> torch.Tensor:
        """x (B, L, D) at positions start..start+L-1. With ``kv`` = (keys, values) buffers
        (B, kv_heads, max_len, hd), the new keys/values are written there and attention runs over
        all cached positions (decode / prefill); without, causal attention over x alone. With
        ``documents``, RoPE positions count from each document's start and attention stays inside it."""
        batch, seqlen, _ = x.shape
        q = self.q_proj(x).view(batch, seqlen, -1, self.head_dim).transpose(1, 2)  # (B, H, L, hd)
        k = self.k_proj(x).view(batch, seqlen, -1, self.head_dim).transpose(1, 2)  # (B, KVH, L, hd)
        v = self.v_proj(x).view(batch, seqlen, -1, self.head_dim).transpose(1, 2)
        positions = torch.arange(start, start + seqlen, device=x.device) if documents is None else documents.positions
        cos, sin = rope_tables(self.head_dim, positions, self.theta)
        if cos.dim() == 3:  # per row (B, L, hd): broadcast over heads
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None:
            kv[0][:, :, start:start + seqlen] = k
            kv[1][:, :, start:start + seqlen] = v
            first = 0 if documents is None else documents.first_key  # keys before it are another document's
            k, v = kv[0][:, :, first:start + seqlen], kv[1][:, :, first:start + seqlen]
        # A single query at the end attends to everything cached; otherwise causal from `start`.
        causal = seqlen > 1
        if causal and start > 0:
            raise ValueError("multi-token attention after cached tokens is not supported (prefill a fresh cache)")
        if documents is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)  # (B, H, L, hd)
        elif documents.spans is not None:  # causal attention of each document alone
            out = torch.cat([torch.cat([
                F.scaled_dot_product_attention(q[row:row + 1, :, a:b], k[row:row + 1, :, a:b], v[row:row + 1, :, a:b],
                                               is_causal=True, enable_gqa=True) for a, b in spans], dim=2)
                for row, spans in enumerate(documents.spans)])
        else:  # a decoding step (mask None when every row's document starts at first_key)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=documents.mask, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seqlen, -1))


class Documents:
    """RoPE positions (B, L_q) of rows holding several documents (or, in decoding, rows whose document
    started after position 0) and which keys each query reads: ``spans``, per row the (start, end) of
    its documents, for a parallel forward (each document attends alone, causally: no (L, L) mask, and
    the fused causal kernel runs); for a decoding step the cached keys from ``first_key`` on, and
    ``mask`` (B, 1, 1, keys) bool over those when the rows' documents start at different positions."""

    def __init__(self, positions: torch.Tensor, spans: list[list[tuple[int, int]]] | None = None,
                 first_key: int = 0, mask: torch.Tensor | None = None):
        self.positions, self.spans, self.first_key, self.mask = positions, spans, first_key, mask

    @classmethod
    def of_sequence(cls, seq_idx: torch.Tensor) -> "Documents":
        """Parallel forward: causal within each document."""
        positions = position_in_document(seq_idx)
        spans = []
        for row in positions == 0:
            starts = row.nonzero().flatten().tolist()
            spans.append(list(zip(starts, starts[1:] + [len(row)])))
        return cls(positions, spans=spans)

    @classmethod
    def of_step(cls, position: int, doc_start: torch.Tensor) -> "Documents":
        """Decoding the token at ``position``: it reads the cached positions from its row's ``doc_start`` (B,) on."""
        first = int(doc_start.min())
        positions = (position - doc_start).unsqueeze(1)
        if bool((doc_start == first).all()):  # one document start for all rows: read the keys from there
            return cls(positions, first_key=first)
        cached = torch.arange(first, position + 1, device=doc_start.device)
        return cls(positions, first_key=first, mask=(cached >= doc_start.unsqueeze(1))[:, None, None])


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

    def forward(self, x: torch.Tensor, start: int = 0, kv=None, documents: Documents | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), start, kv, documents)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)

    def forward(self, input_ids: torch.Tensor, start: int = 0, cache: KVCache | None = None,
                documents: Documents | None = None):
        """input_ids (B, L) -> final normed hidden (B, L, D) and each layer's output [(B, L, D)] * N."""
        x = self.embed_tokens(input_ids)
        hidden_states = []
        for i, layer in enumerate(self.layers):
            x = layer(x, start, (cache.keys[i], cache.values[i]) if cache is not None else None, documents)
            hidden_states.append(x)
        return self.norm(x), hidden_states


class LlamaForCausalLM(nn.Module):
    """Transformer baseline with the same interface as MemMambaForCausalLM."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = LMHead(cfg.d_model, cfg.vocab_size)
        for module in self.modules():  # GPT-2/Llama init; output projections scaled with depth
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
        for layer in self.model.layers:
            for linear in (layer.self_attn.o_proj, layer.mlp.down_proj):
                linear.weight.data.div_(math.sqrt(2 * cfg.n_layers))
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def document_ids(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """The documents of packed rows when the config resets at EOD (model/documents.py), else None."""
        return reset_document_ids(input_ids, self.config.reset_at_eod, self.config.eod_token_id)

    def _documents(self, input_ids: torch.Tensor, seq_idx: torch.Tensor | None) -> Documents | None:
        seq_idx = self.document_ids(input_ids) if seq_idx is None else seq_idx
        return None if seq_idx is None else Documents.of_sequence(seq_idx)

    def forward(self, input_ids: torch.Tensor, return_hidden_states: bool = False,
                seq_idx: torch.Tensor | None = None, targets: torch.Tensor | None = None):
        """input_ids (B, L) -> logits (B, L, V) [, per-layer outputs [h_1, ..., h_N] each (B, L, D)].
        Rows holding several documents (``seq_idx``, by default from the EODs when ``config.reset_at_eod``)
        attend within each document, with positions counted from its start. With ``targets`` (B, L)
        the output is the mean next-token loss instead of the logits (model/loss.py)."""
        hidden, hidden_states = self.model(input_ids, documents=self._documents(input_ids, seq_idx))
        logits = self.lm_head(hidden, targets)
        return (logits, hidden_states) if return_hidden_states else logits

    def final_hidden(self, input_ids: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, L) -> final normed hidden states (B, L, D), the LM head's input."""
        return self.model(input_ids, documents=self._documents(input_ids, seq_idx))[0]

    def allocate_cache(self, batch_size: int) -> KVCache:
        cfg, weight = self.config, self.lm_head.weight
        head_dim = cfg.d_model // cfg.transformer.n_heads
        shape = (cfg.n_layers, batch_size, cfg.transformer.n_kv_heads, cfg.transformer.max_seq_len, head_dim)
        return KVCache(torch.zeros(shape, device=weight.device, dtype=weight.dtype),
                       torch.zeros(shape, device=weight.device, dtype=weight.dtype),
                       torch.zeros(batch_size, dtype=torch.long, device=weight.device))

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
        seq_idx = self.document_ids(input_ids)
        documents = None if seq_idx is None else Documents.of_sequence(seq_idx)
        hidden, _ = self.model(input_ids, 0, cache, documents)
        cache.position = input_ids.shape[1]
        if seq_idx is not None:
            cache.doc_start.copy_(cache.position - 1 - documents.positions[:, -1])
        self._start_after_eod(input_ids[:, -1], cache)
        return self.lm_head(hidden)

    @torch.no_grad()
    def step(self, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One token per sequence: input_ids (B,) -> logits (B, V); appends to ``cache``."""
        self._check_room(cache, 1)
        documents = Documents.of_step(cache.position, cache.doc_start) if bool(cache.doc_start.any()) else None
        hidden, _ = self.model(input_ids[:, None], cache.position, cache, documents)
        cache.position += 1
        self._start_after_eod(input_ids, cache)
        return self.lm_head(hidden[:, 0])

    def _start_after_eod(self, last_ids: torch.Tensor, cache: KVCache) -> None:
        """Rows whose last token was the EOD: the next token starts a document (attends from there on)."""
        if self.config.reset_at_eod:
            cache.doc_start.masked_fill_(last_ids == self.config.eod_token_id, cache.position)

    @staticmethod
    def cache_nbytes(cache: KVCache) -> int:
        return cache_nbytes(cache)
