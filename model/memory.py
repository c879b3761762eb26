"""MemMamba memory: note block, chunked causal note pool, cross-token and cross-layer attention.

After "MemMamba: Rethinking Memory Patterns in State Space Models" (arXiv 2510.03279). The
paper describes the mechanism; these formulas are our own definitions after its description (DESIGN.md §4). For the
mixer output y (B, L, D) of one layer:

- Note score   s_t = sigmoid(w_s . RMSNorm(y_t) + b_s): how worth remembering token t is.
- Note         n_t = W_n . pool_w(y)_t (summary_dim wide), pool_w = max (or mean) over the
               causal window y_{t-w+1..t}; before the sequence start y counts as -inf (max)
               or 0 (mean). With pooling "none", n_t = W_n . y_t. With "concat",
               n_t = W_n . [y_{t-w+1}; ...; y_t] (w*D wide, the pad value 0): the window's
               outputs side by side, so the note keeps their order, which max and mean lose.
- Pool         the sequence is cut into chunks of C tokens (the SSD chunk). When chunk j
               ends, its top-k tokens by s_t with s_t > tau1 enter the layer's pool of
               ``pool_size`` notes as s_t * n_t (hard selection; the score scales the note,
               so the scorer gets gradients, but only for the tokens it picked: training can
               add noise to the picking scores, ``selection_noise``, to explore the others).
               When the pool overflows, "fifo" drops the oldest notes, "priority" the
               lowest-scored ones (ties: the older goes).
               Tokens of chunk j read the pool as it stood after chunk j-1 only.
- State score  score_state_t = sigmoid(w_g . RMSNorm(y_t) + b_g): how much token t's state
               needs help from memory (the paper triggers retrieval when the state has lost
               information; we learn that judgement).
- Gate         g_t = sigmoid((score_state_t - tau2) / T), same formula in training and decoding.
- Cross-token  c_tok_t = multi-head attention from W_q RMSNorm(y_t) over the visible pool.
- Cross-layer  every p-th layer also computes c_lay_t over the visible pools of all
               previous layers (its own key/value projections).
- Fusion       out = F_tok(g_t * c_tok_t) + F_lay(c_lay_t), both projections zero-initialised,
               so a fresh MemMamba equals its Mamba2 backbone exactly.

Training cost is linear in L: each chunk gathers its <= pool_size visible notes (no mask over
all notes of the sequence) and the pool bookkeeping loops over chunks on (B, pool_size + k)
index tensors. Decoding keeps the pool and the current chunk's outputs and scores (plus the
w - 1 outputs before it) in a fixed-size cache (model/decode.py); when the chunk ends, the same
``_chunk_notes`` that training uses picks its notes.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import MemoryConfig
from .decode import MemoryCache
from .documents import ChunkLayout
from .mamba2 import RMSNorm


def memory_read(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Multi-head attention of each chunk's tokens over that chunk's visible notes.

    Args:
        q: (b, nc, c, h, d) queries of the c tokens of each of nc chunks.
        k, v: (b, nc, m, h, d) keys/values of the m note slots visible to each chunk.
        valid: (b, nc, m) bool, False for empty slots.

    Returns:
        (b, nc, c, h, d): softmax(q k^T / sqrt(d)) v over the valid slots; all zeros for a chunk
        with no valid slot. One fused SDPA call: the (c x m) scores never reach memory, which
        matters at long lengths, where a separate pass over them per op costs a trip to DRAM.
    """
    batch, nchunks, _, _, _ = q.shape
    out = attend_valid(*(t.flatten(0, 1).transpose(1, 2) for t in (q, k, v)), valid.flatten(0, 1))
    return out.transpose(1, 2).unflatten(0, (batch, nchunks))


def attend_valid(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """SDPA of q (n, h, c, d) over the valid slots of k, v (n, h, m, d), valid (n, m) bool.

    Rows of a sequence with no valid slot attend uniformly over all of them (no NaNs, no NaN
    gradients) and are then zeroed. memory_read (training) and MemoryBlock.step (decoding) both
    read the pool through this one function.
    """
    any_ok = valid.any(dim=-1)[:, None, None, None]  # (n, 1, 1, 1)
    mask = valid[:, None, None, :] | ~any_ok  # (n, 1, 1, m)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask) * any_ok


def keep_top(score: torch.Tensor, position: torch.Tensor, valid: torch.Tensor, count: int, by: str) -> torch.Tensor:
    """Indices of the ``count`` candidates to keep, valid ones first.

    Args:
        score, position, valid: (..., m) candidate note scores, token positions, validity.
        by: "priority" keeps the highest scores, "fifo" the newest positions; ties keep the newer.

    Returns:
        (..., count) int64 indices into the last dim. Used identically by training and decoding,
        so both select exactly the same notes.
    """
    newest_first = position.argsort(dim=-1, descending=True, stable=True)
    primary = (score if by == "priority" else position).double().gather(-1, newest_first)
    primary = primary.masked_fill(~valid.gather(-1, newest_first), -torch.inf)
    order = primary.argsort(dim=-1, descending=True, stable=True)[..., :count]
    return newest_first.gather(-1, order)


class PoolAttention(nn.Module):
    """Queries from the token stream (d_model), keys/values from notes (summary_dim)."""

    def __init__(self, d_model: int, summary_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(d_model, summary_dim, bias=False)
        self.kv_proj = nn.Linear(summary_dim, 2 * summary_dim, bias=False)

    def keys_values(self, notes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """notes (..., m, S) -> keys, values (..., m, heads, S / heads)."""
        k, v = self.kv_proj(notes).chunk(2, dim=-1)
        return k.unflatten(-1, (self.heads, -1)), v.unflatten(-1, (self.heads, -1))

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., D) -> (..., heads, S / heads)."""
        return self.q_proj(x).unflatten(-1, (self.heads, -1))


class MemoryBlock(nn.Module):
    """The memory of one layer: writes notes of its mixer output and reads its (and, for
    cross-layer layers, earlier layers') pools. Its output is added to the residual stream."""

    def __init__(self, d_model: int, cfg: MemoryConfig, chunk_size: int, norm_eps: float, cross_layer: bool):
        super().__init__()
        self.cfg, self.chunk_size = cfg, chunk_size
        self.norm = RMSNorm(d_model, norm_eps)
        self.note_score = nn.Linear(d_model, 1)  # s_t
        self.state_score = nn.Linear(d_model, 1)  # score_state_t
        window_width = cfg.pool_window if cfg.pooling == "concat" else 1
        self.summary = nn.Linear(window_width * d_model, cfg.summary_dim, bias=False)  # W_n
        self.token_attn = PoolAttention(d_model, cfg.summary_dim, cfg.heads)
        self.token_out = nn.Linear(cfg.summary_dim, d_model, bias=False)  # F_tok
        self.layer_attn = PoolAttention(d_model, cfg.summary_dim, cfg.heads) if cross_layer else None
        self.layer_out = nn.Linear(cfg.summary_dim, d_model, bias=False) if cross_layer else None  # F_lay
        self.read_fn = memory_read  # swapped for the Triton read by model/kernels on CUDA
        self.selection_noise = 0.0
        """Training only (`train.note_selection_noise`, set by the trainer): the std of Gaussian noise
        added to the scores that pick and keep notes (never to the scores that scale them). A hard
        top-k gives no gradient to the tokens it leaves out, so without noise the scorer cannot learn
        to rank up a useful token it does not pick already. Evaluation and decoding add none. The noise
        comes from torch's default generator, which the trainer seeds alike on every rank, so tensor-
        parallel ranks (which run the same ops on the same tokens) pick the same notes."""
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for linear in (self.note_score, self.state_score, self.summary, self.token_attn.q_proj,
                       self.token_attn.kv_proj):
            nn.init.normal_(linear.weight, std=0.02)
        nn.init.zeros_(self.note_score.bias)
        nn.init.zeros_(self.state_score.bias)
        nn.init.zeros_(self.token_out.weight)
        if self.layer_attn is not None:
            nn.init.normal_(self.layer_attn.q_proj.weight, std=0.02)
            nn.init.normal_(self.layer_attn.kv_proj.weight, std=0.02)
            nn.init.zeros_(self.layer_out.weight)

    # ---- shared pieces of training and decoding ----

    def _pool_window(self, y_window: torch.Tensor) -> torch.Tensor:
        """(..., w, D) -> (..., D), or (..., w * D) for concat: the pooling of the note's causal window."""
        if self.cfg.pooling == "max":
            return y_window.amax(dim=-2)
        if self.cfg.pooling == "mean":
            return y_window.mean(dim=-2)
        if self.cfg.pooling == "concat":
            return y_window.flatten(-2)
        return y_window[..., -1, :]

    def _window_pad(self) -> float:
        return -torch.inf if self.cfg.pooling == "max" else 0.0

    def _scores(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """y (..., D) -> note score s (...), gate g (...), normalised y (..., D)."""
        y_norm = self.norm(y)
        s = torch.sigmoid(self.note_score(y_norm)).squeeze(-1)
        score_state = torch.sigmoid(self.state_score(y_norm)).squeeze(-1)
        g = torch.sigmoid((score_state - self.cfg.tau2) / self.cfg.gate_temperature)
        return s, g, y_norm

    def _chunk_notes(self, history: torch.Tensor, s: torch.Tensor, start: int | torch.Tensor,
                     history_doc: torch.Tensor | None = None, rank: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, ...]:
        """The note candidates of whole chunks: per chunk its top-k tokens by s_t with s_t > tau1, as s_t * n_t.

        Args:
            history: (B, w - 1 + L, D) mixer outputs from position ``start - w + 1`` on (the pad value
                before position 0), so that every token's pooling window y_{t-w+1..t} lies in it.
            s: (B, L) note scores from position ``start`` on, L a multiple of the chunk size (a ragged
                end padded with -1, which never qualifies; its windows read the last row).
            start: the position of s[:, 0] (an int, or (B, 1, 1) per row).
            history_doc: (B, w - 1 + L) document of each history row (a ChunkLayout's ``row_doc``), or
                None: a window row of another document than the note's own token counts as the pad value.
            rank: (B, L) the scores that pick notes (and keep them, as the returned scores), or None: s.
                Differs from s only by ``selection_noise`` in training; s alone scales the notes.

        Returns:
            notes (B, nc, k, S), scores, positions, valid (B, nc, k). Training calls this once over the
            whole sequence and decoding once per finished chunk, so both pick exactly the same notes.
        """
        batch, length = s.shape
        c, k, w = self.chunk_size, self.cfg.notes_per_chunk, self.cfg.pool_window
        s_chunks = s.view(batch, -1, c)
        rank_chunks = s_chunks if rank is None else rank.view(batch, -1, c)
        offsets = torch.arange(length, device=s.device).view(1, -1, c).expand(batch, -1, -1)
        picked = keep_top(rank_chunks, offsets, rank_chunks > self.cfg.tau1, k, "priority")  # (B, nc, k)
        scores, picked_offsets = s_chunks.gather(-1, picked), offsets.gather(-1, picked)
        ranks = scores if rank is None else rank_chunks.gather(-1, picked)
        # Token t = start + o has its window in history rows o .. o + w - 1; notes only for candidates.
        rows = (picked_offsets.view(batch, -1, 1) + torch.arange(w, device=s.device)).clamp(max=history.shape[1] - 1)
        windows = history.gather(1, rows.view(batch, -1, 1).expand(-1, -1, history.shape[-1]))
        windows = windows.view(batch, -1, w, history.shape[-1])  # (B, nc*k, w, D)
        if history_doc is not None:
            row_doc = history_doc.gather(1, rows.view(batch, -1)).view(batch, -1, w)
            windows = windows.masked_fill((row_doc != row_doc[..., -1:]).unsqueeze(-1), self._window_pad())
        pooled = self._pool_window(windows)  # (B, nc*k, D), or w*D wide for concat
        notes = self.summary(pooled).view(batch, -1, k, self.cfg.summary_dim) * scores.clamp_min(0).unsqueeze(-1)
        return notes, ranks, picked_offsets + start, ranks > self.cfg.tau1

    def _fuse(self, c_tok: torch.Tensor, g: torch.Tensor, c_lay: torch.Tensor | None) -> torch.Tensor:
        out = self.token_out(g.unsqueeze(-1) * c_tok)
        if c_lay is not None:
            out = out + self.layer_out(c_lay)
        return out

    # ---- training / prefill: the whole sequence at once ----

    def forward(self, y: torch.Tensor, earlier_pools: list["ChunkPools"], layout: ChunkLayout | None = None
                ) -> tuple[torch.Tensor, "ChunkPools"]:
        """y (B, L, D) mixer output -> (memory output (B, L, D), this layer's ChunkPools).

        ``earlier_pools`` are the ChunkPools of the previous layers (read by cross-layer layers).
        ``layout`` places the tokens on whole chunks (every document from a chunk edge, model/documents.py);
        the chunked pool runs on that buffer, and its pool empties where a document starts. None: one
        document per row.
        """
        batch, c, w = y.shape[0], self.chunk_size, self.cfg.pool_window
        layout = layout or ChunkLayout.build(y.shape[1], c, None)
        nchunks = layout.length // c
        s, g, y_norm = self._scores(y)  # (B, L), (B, L), (B, L, D)

        # Padding rows of the buffer hold 0 (finite notes for candidates that never qualify); a window
        # reading rows of another document or of padding sees the pad value instead, through history_doc.
        history = F.pad(layout.scatter(y, 0.0), (0, 0, w - 1, 0), value=self._window_pad())
        history_doc = None if layout.row_doc is None else F.pad(layout.row_doc, (w - 1, 0), value=-1)
        rank = None
        if self.training and self.selection_noise > 0:
            rank = layout.scatter(s + self.selection_noise * torch.randn_like(s), -1.0)
        candidates = self._chunk_notes(history, layout.scatter(s, -1.0), 0, history_doc, rank)
        pools = ChunkPools.build(*candidates, self.cfg.pool_size, self.cfg.eviction, layout.doc_start)

        # Reads: each chunk's queries against the notes visible to it.
        def read(attn: PoolAttention, pool_list: list[ChunkPools]) -> torch.Tensor:
            keys, values, valid = zip(*(p.visible_keys_values(attn) for p in pool_list))
            q = layout.scatter(attn.queries(y_norm), 0.0).view(batch, nchunks, c, self.cfg.heads, -1)
            out = self.read_fn(q, torch.cat(keys, 2), torch.cat(values, 2), torch.cat(valid, 2))
            return layout.gather(out.reshape(batch, nchunks * c, -1))  # (B, L, S)

        c_tok = read(self.token_attn, [pools])
        c_lay = read(self.layer_attn, earlier_pools) if self.layer_attn is not None and earlier_pools else None
        return self._fuse(c_tok, g, c_lay), pools

    # ---- decoding: one token at a time ----

    def allocate_cache(self, batch_size: int, d_model: int, earlier_layers: int, device=None,
                       dtype=None) -> MemoryCache:
        """Zeroed cache; ``earlier_layers`` is the number of pools a cross-layer layer reads."""
        cfg = self.cfg
        pool, heads, head_dim = cfg.pool_size, cfg.heads, cfg.summary_dim // cfg.heads
        crossing = self.layer_attn is not None and earlier_layers > 0

        def zeros(*shape, dt=dtype):
            return torch.zeros(*shape, device=device, dtype=dt)

        return MemoryCache(
            notes=zeros(batch_size, pool, cfg.summary_dim),
            scores=zeros(batch_size, pool),
            positions=zeros(batch_size, pool, dt=torch.long),
            valid=zeros(batch_size, pool, dt=torch.bool),
            token_keys=zeros(batch_size, heads, pool, head_dim),
            token_values=zeros(batch_size, heads, pool, head_dim),
            chunk_outputs=torch.full((batch_size, cfg.pool_window - 1 + self.chunk_size, d_model),
                                     self._window_pad(), device=device, dtype=dtype),
            chunk_scores=zeros(batch_size, self.chunk_size),
            layer_keys=zeros(batch_size, heads, earlier_layers * pool, head_dim) if crossing else None,
            layer_values=zeros(batch_size, heads, earlier_layers * pool, head_dim) if crossing else None,
            layer_valid=zeros(batch_size, earlier_layers * pool, dt=torch.bool) if crossing else None,
        )

    @torch.no_grad()
    def fill_cache(self, cache: MemoryCache, y: torch.Tensor, pools: "ChunkPools", layout: ChunkLayout | None = None
                   ) -> None:
        """After a parallel forward (prefill) over y (B, L, D): per row, the pool after the last complete
        chunk of its last document, and that document's unfinished chunk: its outputs and scores (with
        the w - 1 outputs before it). Pool positions become positions in that document, like decoding's."""
        w, c = self.cfg.pool_window, self.chunk_size
        if layout is None or layout.index is None:
            offset, length = torch.zeros_like(cache.positions[:, 0]), torch.full_like(cache.positions[:, 0], y.shape[1])
        else:
            offset, length = layout.doc_offset, layout.doc_length
        done = length // c * c  # tokens of the last document in complete chunks
        pool = pools.pool_after((offset + done) // c)
        for target, source in zip((cache.notes, cache.scores, cache.positions, cache.valid), pool):
            target.copy_(source)
        cache.positions.sub_(offset.unsqueeze(1))
        # Scores only of the last c - 1 tokens: no unfinished chunk is longer.
        s = self._scores(y[:, max(0, y.shape[1] - (c - 1)):])[0]
        cache.chunk_outputs.fill_(self._window_pad())
        cache.chunk_scores.zero_()
        for row, (row_length, row_done) in enumerate(zip(length.tolist(), done.tolist())):
            before, pending = min(row_done, w - 1), row_length - row_done
            cache.chunk_outputs[row, w - 1 - before:w - 1 + pending] = y[row, y.shape[1] - pending - before:]
            if pending:
                cache.chunk_scores[row, :pending] = s[row, s.shape[1] - pending:]
        self._refresh_token_keys(cache)

    def step(self, y: torch.Tensor, cache: MemoryCache, position: torch.Tensor) -> torch.Tensor:
        """One token: y (B, D) at ``position`` (B,) in its document -> memory output (B, D). The token's
        output and score are kept until its chunk ends (end_chunk picks the chunk's notes, as training does)."""
        s, g, y_norm = self._scores(y)  # (B,), (B,), (B, D)
        offset, rows = position % self.chunk_size, torch.arange(y.shape[0], device=y.device)
        cache.chunk_outputs[rows, self.cfg.pool_window - 1 + offset] = y
        cache.chunk_scores[rows, offset] = s

        def read(attn: PoolAttention, keys, values, valid) -> torch.Tensor:
            q = attn.queries(y_norm).unsqueeze(2)  # (B, h, 1, d)
            return attend_valid(q, keys, values, valid).flatten(1)  # (B, S)

        c_tok = read(self.token_attn, cache.token_keys, cache.token_values, cache.valid)
        c_lay = None
        if cache.layer_keys is not None:
            c_lay = read(self.layer_attn, cache.layer_keys, cache.layer_values, cache.layer_valid)
        return self._fuse(c_tok, g, c_lay)

    def end_chunk(self, cache: MemoryCache, start: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """When the chunk starting at position ``start`` (B,) is complete in the ``rows`` (B,) bool (None:
        all): its notes enter their pool, whose keys/values are refreshed, and its last w - 1 outputs
        become the next chunk's history."""
        start = start.view(-1, 1, 1)
        candidates = (t.squeeze(1) for t in self._chunk_notes(cache.chunk_outputs, cache.chunk_scores, start))
        pool = (cache.notes, cache.scores, cache.positions, cache.valid)
        cand = [torch.cat(pair, dim=1) for pair in zip(pool, candidates)]
        keep = keep_top(cand[1], cand[2], cand[3], self.cfg.pool_size, self.cfg.eviction)
        history = self.cfg.pool_window - 1
        updates = [(target, _gather(source, keep)) for source, target in zip(cand, pool)]
        if history:
            updates.append((cache.chunk_outputs[:, :history], cache.chunk_outputs[:, -history:].clone()))
        for target, value in updates:
            if rows is None:
                target.copy_(value)
            else:  # rows in another phase of their chunk keep their pool and history
                target[rows] = value[rows]
        self._refresh_token_keys(cache)

    def reset(self, cache: MemoryCache, rows: torch.Tensor) -> None:
        """Empty the pool and the current chunk of the ``rows`` (B,) bool: a new document starts there.
        The cross-layer view of the earlier pools is refreshed by the caller, as after end_chunk."""
        cache.valid[rows] = False
        cache.chunk_outputs[rows] = self._window_pad()
        cache.chunk_scores[rows] = 0.0

    def _refresh_token_keys(self, cache: MemoryCache) -> None:
        keys, values = self.token_attn.keys_values(cache.notes)  # (B, P, h, d)
        cache.token_keys.copy_(keys.transpose(1, 2))
        cache.token_values.copy_(values.transpose(1, 2))

    def refresh_cross_layer(self, cache: MemoryCache, earlier: list[MemoryCache]) -> None:
        """After every layer's end_chunk: recompute the cross-layer keys/values over earlier pools."""
        if cache.layer_keys is None:
            return
        keys, values = self.layer_attn.keys_values(torch.cat([e.notes for e in earlier], dim=1))
        cache.layer_keys.copy_(keys.transpose(1, 2))
        cache.layer_values.copy_(values.transpose(1, 2))
        cache.layer_valid.copy_(torch.cat([e.valid for e in earlier], dim=1))


class ChunkPools:
    """One layer's pool as seen by every chunk of a sequence (training / prefill).

    ``notes`` (B, nc*k, S), ``scores``, ``positions``, ``valid`` (B, nc*k) are the candidate
    notes of all chunks, flattened; ``slots`` (B, nc + 1, P) index the candidates in the pool
    after chunks 0..j-1 (row j is what chunk j reads; row nc is the pool after the last chunk)
    and ``slot_valid`` (B, nc + 1, P) marks filled slots.
    """

    def __init__(self, notes, scores, positions, valid, slots, slot_valid):
        self.notes, self.scores, self.positions, self.valid = notes, scores, positions, valid
        self.slots, self.slot_valid = slots, slot_valid

    @classmethod
    def build(cls, notes, scores, positions, valid, pool_size: int, eviction: str,
              doc_start: torch.Tensor | None = None) -> "ChunkPools":
        """notes (B, nc, k, S); scores, positions, valid (B, nc, k) -> the pool before each chunk.
        ``doc_start`` (B, nc) bool marks chunks that start a document: the pool is empty before them."""
        batch, nchunks, k, _ = notes.shape
        flat = [t.reshape(batch, nchunks * k) for t in (scores, positions, valid)]
        with torch.no_grad():
            slots = torch.zeros(batch, pool_size, dtype=torch.long, device=notes.device)
            slot_valid = torch.zeros(batch, pool_size, dtype=torch.bool, device=notes.device)
            rows, row_valid = [slots], [slot_valid]
            for j in range(nchunks):
                if doc_start is not None:
                    slot_valid = row_valid[-1] = slot_valid & ~doc_start[:, j:j + 1]
                new = torch.arange(j * k, (j + 1) * k, device=notes.device).expand(batch, k)
                cand = torch.cat([slots, new], dim=1)  # (B, P + k) the pool plus chunk j's candidates
                cand_valid = torch.cat([slot_valid, flat[2][:, j * k:(j + 1) * k]], dim=1)
                keep = keep_top(flat[0].gather(1, cand), flat[1].gather(1, cand), cand_valid, pool_size, eviction)
                slots, slot_valid = cand.gather(1, keep), cand_valid.gather(1, keep)
                rows.append(slots)
                row_valid.append(slot_valid)
        return cls(notes.reshape(batch, nchunks * k, -1), *flat, torch.stack(rows, 1), torch.stack(row_valid, 1))

    def visible_keys_values(self, attn: PoolAttention):
        """Keys, values (B, nc, P, h, d) and validity (B, nc, P) of the pool each chunk reads."""
        keys, values = attn.keys_values(self.notes)  # (B, nc*k, h, d): project once, then gather
        visible = self.slots[:, :-1]  # (B, nc, P)
        batch, nchunks, pool_size = visible.shape
        index = visible.reshape(batch, -1, 1, 1).expand(-1, -1, *keys.shape[2:])
        keys, values = (t.gather(1, index).view(batch, nchunks, pool_size, *t.shape[2:]) for t in (keys, values))
        return keys, values, self.slot_valid[:, :-1]

    def pool_after(self, chunks: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(notes (B, P, S), scores, positions, valid (B, P)) of each row's pool after ``chunks`` (B,) chunks."""
        rows = torch.arange(self.slots.shape[0], device=self.slots.device)
        slots = self.slots[rows, chunks]
        return (_gather(self.notes, slots), self.scores.gather(1, slots), self.positions.gather(1, slots),
                self.slot_valid[rows, chunks])


def _gather(source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """source (B, m, ...) gathered along dim 1 at index (B, n) -> (B, n, ...)."""
    idx = index.view(*index.shape, *([1] * (source.dim() - 2))).expand(-1, -1, *source.shape[2:])
    return source.gather(1, idx)
