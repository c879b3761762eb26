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
from .documents import ChunkLayout, position_in_document, reset_document_ids, segment_ids
from .loss import LMHead
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

    def forward(self, x: torch.Tensor, earlier_pools: list[ChunkPools], seq_idx: torch.Tensor | None = None,
                layout: ChunkLayout | None = None, cache: LayerCache | None = None
                ) -> tuple[torch.Tensor, ChunkPools | None]:
        """x (B, L, D) residual stream -> (B, L, D) float32, and this layer's pools (or None).
        ``seq_idx`` (the mixer's) and ``layout`` (the memory's) describe the documents of the rows
        (model/documents.py); None: one document per row. They differ only while training with
        ``MemMambaModel.mixer_segment``."""
        y = self.mixer(self.norm(x.to(self.norm.weight.dtype)), cache.mixer if cache else None, seq_idx)
        out = x.float() + y  # residual kept in float32, like HF's residual_in_fp32
        if self.memory is None:
            return out, None
        fused, pools = self.memory(y, earlier_pools, layout)
        if cache is not None:
            self.memory.fill_cache(cache.memory, y, pools, layout)
        return out + fused, pools

    def step(self, x: torch.Tensor, cache: LayerCache, position: torch.Tensor) -> torch.Tensor:
        """x (B, D) -> (B, D) float32 for the tokens at ``position`` (B,) in their documents."""
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
        self.mixer_segment = 0
        """Training only (`train.mixer_segment_tokens`, set by the trainer): when > 0, the mixers' state
        and conv window start afresh every this many tokens of a document, while the memory still
        spans the document, so information from further back reaches a token only through the
        memory. Evaluation and decoding (``self.training`` False) never cut the state."""

    def forward(self, input_ids: torch.Tensor, seq_idx: torch.Tensor | None = None, cache=None
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """input_ids (B, L) -> final normed hidden (B, L, D) and each layer's output [(B, L, D)] * N.
        ``seq_idx`` (B, L): document of each token, or None for one document per row."""
        x = self.embeddings(input_ids)
        layout = ChunkLayout.build(input_ids.shape[1], self.layers[0].mixer.chunk_size, seq_idx)
        mixer_idx = seq_idx
        if self.training and self.mixer_segment > 0:
            mixer_idx = segment_ids(seq_idx, *input_ids.shape, self.mixer_segment, input_ids.device)
        hidden_states, pools = [], []
        for i, layer in enumerate(self.layers):
            x, layer_pools = layer(x, pools, mixer_idx, layout, cache.layers[i] if cache else None)
            pools.append(layer_pools)
            hidden_states.append(x)
        return self.norm_f(x), hidden_states


class MemMambaForCausalLM(nn.Module):
    """MemMamba (or, with the memory off, Mamba2) causal LM."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.backbone = MemMambaModel(cfg)
        self.lm_head = LMHead(cfg.d_model, cfg.vocab_size)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight
        else:
            nn.init.normal_(self.lm_head.weight, std=0.02)

    def _head(self, hidden: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm_head(hidden.to(self.lm_head.weight.dtype), targets)

    def document_ids(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """The documents of packed rows when the config resets at EOD (model/documents.py), else None."""
        return reset_document_ids(input_ids, self.config.reset_at_eod, self.config.eod_token_id)

    def forward(self, input_ids: torch.Tensor, return_hidden_states: bool = False,
                seq_idx: torch.Tensor | None = None, targets: torch.Tensor | None = None):
        """input_ids (B, L) -> logits (B, L, V) [, per-layer outputs [h_1, ..., h_N] each (B, L, D)].

        Rows holding several documents (``seq_idx`` (B, L), by default found from the EOD tokens when
        ``config.reset_at_eod``) are computed as if each document stood alone. With ``targets`` (B, L)
        the output is the mean next-token loss instead of the logits, which then never exist whole
        (model/loss.py)."""
        hidden, hidden_states = self.backbone(input_ids, self._seq_idx(input_ids, seq_idx))
        output = self._head(hidden, targets)
        return (output, hidden_states) if return_hidden_states else output

    def final_hidden(self, input_ids: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, L) -> final normed hidden states (B, L, D), the LM head's input
        (what ``lm_head`` reads)."""
        return self.backbone(input_ids, self._seq_idx(input_ids, seq_idx))[0]

    def _seq_idx(self, input_ids: torch.Tensor, seq_idx: torch.Tensor | None) -> torch.Tensor | None:
        return self.document_ids(input_ids) if seq_idx is None else seq_idx

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
        return MemMambaCache(layers, torch.zeros(batch_size, dtype=torch.long, device=weight.device))

    # Decoding runs under inference_mode (cheaper per op than no_grad: a token's step is hundreds of
    # small ops); the returned logits are computed outside it, so they are ordinary tensors that
    # callers (transformers' logits processors) may modify in place.

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, cache: MemMambaCache, seq_idx: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Parallel forward over a prompt (B, L) that also fills a fresh ``cache``; returns logits (B, L, V).
        ``seq_idx`` as for ``forward``: the cache then holds each row's last document alone."""
        if cache.position != 0:
            raise ValueError(f"prefill needs a fresh cache (position 0), got position {cache.position}")
        with torch.inference_mode():
            seq_idx = self._seq_idx(input_ids, seq_idx)
            hidden, _ = self.backbone(input_ids, seq_idx, cache)
            cache.position = input_ids.shape[1]
            cache.doc_position.copy_(position_in_document(seq_idx)[:, -1] + 1 if seq_idx is not None
                                     else torch.full_like(cache.doc_position, cache.position))
            self._reset_after_eod(input_ids[:, -1], cache)
            self._refresh_cross_layer(cache)
        return self._head(hidden.clone())

    @torch.no_grad()
    def step(self, input_ids: torch.Tensor, cache: MemMambaCache) -> torch.Tensor:
        """One token per sequence: input_ids (B,) -> logits (B, V); updates ``cache`` in place."""
        with torch.inference_mode():
            x = self.backbone.embeddings(input_ids)
            for layer, layer_cache in zip(self.backbone.layers, cache.layers):
                x = layer.step(x, layer_cache, cache.doc_position)
            cache.position += 1
            cache.doc_position += 1
            if self.config.memory_enabled:
                self._end_chunks(cache)
            if self._reset_after_eod(input_ids, cache):
                self._refresh_cross_layer(cache)
            x = self.backbone.norm_f(x)
        return self._head(x.clone())

    def _end_chunks(self, cache: MemMambaCache) -> None:
        """Rows whose chunk just ended: every layer picks its notes into its pool, only now, after all
        layers read the old pools, so no token sees notes of its own chunk."""
        chunk = self.config.mamba.chunk_size
        ended = cache.doc_position % chunk == 0
        if not bool(ended.any()):
            return
        rows = None if bool(ended.all()) else ended  # rows differ once documents started at different steps
        for layer, layer_cache in zip(self.backbone.layers, cache.layers):
            layer.memory.end_chunk(layer_cache.memory, cache.doc_position - chunk, rows)
        self._refresh_cross_layer(cache)

    def _reset_after_eod(self, last_ids: torch.Tensor, cache: MemMambaCache) -> bool:
        """Rows whose last token was the EOD start a new document: conv window, SSM state and pool
        empty, position 0 (what the parallel forward does after an EOD). Returns whether any row did."""
        if not self.config.reset_at_eod:
            return False
        rows = last_ids == self.config.eod_token_id
        if not bool(rows.any()):
            return False
        cache.doc_position[rows] = 0
        for layer, layer_cache in zip(self.backbone.layers, cache.layers):
            layer_cache.mixer.conv_state[rows] = 0.0
            layer_cache.mixer.ssm_state[rows] = 0.0
            if layer.memory is not None:
                layer.memory.reset(layer_cache.memory, rows)
        return True

    def _refresh_cross_layer(self, cache: MemMambaCache) -> None:
        if not self.config.memory_enabled:
            return
        memories = [layer_cache.memory for layer_cache in cache.layers]
        for i, layer in enumerate(self.backbone.layers):
            layer.memory.refresh_cross_layer(memories[i], memories[:i])

    @staticmethod
    def cache_nbytes(cache: MemMambaCache) -> int:
        return cache_nbytes(cache)
