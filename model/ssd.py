"""Minimal chunked SSD (state space duality) scan of Mamba2, in pure PyTorch.

This is the ground truth that the Triton kernels in ``model/kernels/`` are tested against and
the scan used on CPU. It follows ``ssd_minimal.py`` of mamba_ssm (Dao & Gu, "Transformers are
SSMs", arXiv 2405.21060) and HF ``modeling_mamba2.py``'s torch path, in the paper's notation:

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t B_t^T        # state (P, N) per head
    y_t = h_t C_t + D * x_t

The sequence is cut into chunks of ``chunk_size`` tokens and a loop over the chunks passes the
(B, H, P, N) state on. Inside a chunk the output is a masked (C B^T * decay) @ (dt x) matmul
(the "diagonal block"), whose (chunk x chunk) matrices are recomputed in the backward pass
instead of stored: memory and time are linear in the sequence length and every temporary is
the size of one chunk (cache-resident on CPU). A ragged last chunk is padded with dt = 0, which
neither decays nor feeds the state, so the final state is exact. Decays below eps**2 count as
eps**2 (``_exp_decay_``): as subnormal floats they made the CPU scan several times slower.
With ``seq_idx`` (packed documents, model/documents.py) the chunks holding a boundary mask the
mixing to same-document pairs and cut the state at the boundary; the others run unchanged.
"""

import math

import torch
import torch.nn.functional as F


def _exp_decay_(log_decay: torch.Tensor) -> torch.Tensor:
    """exp of a log-decay (<= 0) in place, floored at eps**2 (1.4e-14 in float32).

    A smaller decay is far below the precision of the sums it enters. Without the floor, fast
    heads over a long chunk put most of the decay matrix at subnormal values or zero, and the
    CPU's exp, and the matmuls that read those values, run 10-50x slower there.
    """
    floor = 2 * math.log(torch.finfo(log_decay.dtype).eps)
    return log_decay.clamp_(floor, 0.0).exp_()


def _decayed_scores(a: torch.Tensor, B: torch.Tensor, C: torch.Tensor, same_doc: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """decay[t, s] = exp(a_t - a_s) and the causal scores C_t . B_s (0 for s > t or, with
    ``same_doc`` (b, 1, l, l), for s in another document than t).

    a: (b, g, r, l) log-decay accumulated within the chunk (non-increasing); B, C: (b, g, l, n).
    Returns decay (b, g, r, l, l), which is 1 for s > t, and scores (b, g, 1, l, l). The masks go
    on the scores, r times smaller than the decay (masked_fill over the decay cost more than its exp).
    """
    decay = _exp_decay_(a.unsqueeze(-1) - a.unsqueeze(-2))
    scores = torch.matmul(C, B.transpose(-1, -2)).tril_()
    if same_doc is not None:
        scores.mul_(same_doc)
    return decay, scores.unsqueeze(2)


class _DiagonalBlock(torch.autograd.Function):
    """y_t = sum_{s<=t} (C_t . B_s) exp(a_t - a_s) x_dt_s within one chunk.

    x_dt: (b, g, r, l, p); a: (b, g, r, l); B, C: (b, g, l, n); same_doc: (b, 1, l, l) 0/1 or None
    -> y (b, g, r, l, p). Only the inputs are saved; the (l x l) matrices are rebuilt in backward.
    """

    @staticmethod
    def forward(ctx, x_dt, a, B, C, same_doc):
        ctx.save_for_backward(x_dt, a, B, C, same_doc)
        decay, scores = _decayed_scores(a, B, C, same_doc)
        return torch.matmul(decay.mul_(scores), x_dt)

    @staticmethod
    def backward(ctx, grad_y):
        x_dt, a, B, C, same_doc = ctx.saved_tensors
        decay, scores = _decayed_scores(a, B, C, same_doc)
        # dM = dy x_dt^T, where M = decay * scores is the (b, g, r, t, s) mixing matrix. The (l x l)
        # buffers are updated in place: two are allocated, not four (each costs a trip to memory).
        grad_decayed = torch.matmul(grad_y, x_dt.transpose(-1, -2)).mul_(decay)  # dM * decay
        grad_scores = grad_decayed.sum(dim=2).tril_()  # heads of a group share C B^T
        if same_doc is not None:
            grad_scores.mul_(same_doc)
        grad_C = torch.matmul(grad_scores, B)
        grad_B = torch.matmul(grad_scores.transpose(-1, -2), C)
        # d(a_t - a_s) = dM * M; a_t gets the row sums, a_s minus the column sums.
        grad_log_decay = grad_decayed.mul_(scores)
        grad_a = grad_log_decay.sum(dim=-1) - grad_log_decay.sum(dim=-2)
        grad_x_dt = torch.matmul(decay.mul_(scores).transpose(-1, -2), grad_y)  # M^T dy
        return grad_x_dt, grad_a, grad_B, grad_C, None


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked selective scan.

    Args:
        x: (b, l, h, p) inputs per head.
        dt: (b, l, h) step sizes, already positive (caller applied softplus(dt + dt_bias)).
        A: (h,) negative decay rates.
        B, C: (b, l, g, n) input/output projections; head i uses group i // (h // g).
        chunk_size: tokens per chunk.
        D: (h,) skip connection, or None.
        initial_state: (b, h, p, n) state before the first token, or None for zeros.
        seq_idx: (b, l) non-decreasing document index of each token (model/documents.py), or None.
            No state passes from one document to the next: a token sees only earlier tokens of its
            own document, and the initial state only while the first document lasts.

    Returns:
        y: (b, l, h, p) in x's dtype, and final_state: (b, h, p, n) float32 (float64 for
        float64 inputs). Low-precision inputs are computed with float32 accumulation.
    """
    # The scan computes in float32 whatever autocast says: under bf16 autocast its matmuls would
    # otherwise run in bf16 and the backward would mix bf16 and float32 operands.
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _scan(x, dt, A, B, C, chunk_size, D, initial_state, seq_idx)


def _scan(x, dt, A, B, C, chunk_size, D, initial_state, seq_idx):
    """ssd_chunked's body (same arguments), outside autocast."""
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    if nheads % ngroups != 0:
        raise ValueError(f"ssd_chunked: heads ({nheads}) must be a multiple of groups ({ngroups})")
    heads_per_group = nheads // ngroups
    compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    out_dtype = x.dtype
    x, dt, A, B, C = (t.to(compute_dtype) for t in (x, dt, A, B, C))

    # Pad to whole chunks with dt = 0 (no decay, no input); heads grouped as (g, r = h / g).
    pad = (-seqlen) % chunk_size
    x_dt, dA = x * dt.unsqueeze(-1), dt * A
    if pad:
        x_dt, dA, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x_dt, dA, B, C))
    x_dt = x_dt.view(batch, -1, ngroups, heads_per_group, headdim).permute(0, 2, 3, 1, 4)  # (b, g, r, L, p)
    dA = dA.view(batch, -1, ngroups, heads_per_group).permute(0, 2, 3, 1)  # (b, g, r, L)
    B, C = B.transpose(1, 2), C.transpose(1, 2)  # (b, g, L, n)

    if initial_state is None:
        state = x.new_zeros(batch, ngroups, heads_per_group, headdim, dstate)
    else:
        state = initial_state.to(compute_dtype).view(batch, ngroups, heads_per_group, headdim, dstate)
    # Split into chunks with unbind (its backward is one stack, not a zero-filled copy per slice).
    nchunks = (seqlen + pad) // chunk_size
    chunks = zip(
        x_dt.unflatten(3, (nchunks, chunk_size)).unbind(3),  # (b, g, r, l, p) each
        dA.unflatten(3, (nchunks, chunk_size)).unbind(3),  # (b, g, r, l)
        B.unflatten(2, (nchunks, chunk_size)).unbind(2),  # (b, g, l, n)
        C.unflatten(2, (nchunks, chunk_size)).unbind(2),
    )
    documents = _chunk_documents(seq_idx, nchunks, chunk_size)
    ys = []
    for (x_c, dA_c, B_c, C_c), doc in zip(chunks, documents):
        # With a document boundary in the chunk: tokens mix only within their document, the state
        # entering the chunk reaches only tokens of the document it belongs to, and the state leaving
        # it holds only the chunk's last document.
        same_doc = carried = same_as_last = None
        if doc is None:
            a = torch.cumsum(dA_c, dim=-1)  # (b, g, r, l): log-decay from the chunk start
        else:
            before, ids = doc
            same_doc = (ids.unsqueeze(-1) == ids.unsqueeze(-2)).to(x_c.dtype).unsqueeze(1)  # (b, 1, l, l)
            # The log-decay restarts at each document: a_t sums dA over t's document only, so no
            # gradient reaches another document's dt (a cumsum's differences would cancel it only
            # up to rounding).
            a = torch.matmul(dA_c.unsqueeze(-2), same_doc.tril().transpose(-1, -2).unsqueeze(1)).squeeze(-2)
            carried = (ids == before.unsqueeze(-1)).to(x_c.dtype)[:, None, None]  # (b, 1, 1, l)
            same_as_last = (ids == ids[:, -1:]).to(x_c.dtype)[:, None, None, :, None]  # (b, 1, 1, l, 1)
        # 1. Diagonal block: contributions of tokens of this chunk.
        y = _DiagonalBlock.apply(x_c, a, B_c, C_c, same_doc)
        # 2. Off-diagonal: the state entering the chunk, decayed to t: y_t += exp(a_t) state C_t.
        # The r heads of a group share C, so this is one (l, n) @ (n, r * p) matmul per group.
        from_start = _exp_decay_(a.clone())  # (b, g, r, l)
        if carried is not None:
            from_start = from_start * carried
        state_by_n = state.permute(0, 1, 4, 2, 3).flatten(3)  # (b, g, n, r * p)
        y_state = torch.matmul(C_c, state_by_n).unflatten(3, (heads_per_group, headdim)).transpose(2, 3)
        y = y + y_state * from_start.unsqueeze(-1)
        # 3. State leaving the chunk: decayed old state + sum_s exp(a_end - a_s) x_dt_s B_s^T,
        # again one (r * p, l) @ (l, n) matmul per group.
        to_end = _exp_decay_(a[..., -1:] - a).unsqueeze(-1)  # (b, g, r, l, 1)
        if same_as_last is not None:
            to_end = to_end * same_as_last
        x_to_end = (x_c * to_end).transpose(2, 3).flatten(3)  # (b, g, l, r * p)
        state = state * from_start[..., -1, None, None] + torch.matmul(
            x_to_end.transpose(-1, -2), B_c).view_as(state)
        ys.append(y.permute(0, 3, 1, 2, 4))  # (b, l, g, r, p)

    # Concatenating the token-major views writes y once, already in the (b, l, h, p) layout.
    y = torch.cat(ys, dim=1).view(batch, -1, nheads, headdim)[:, :seqlen]  # (b, l, h, p)
    if D is not None:
        y = torch.addcmul(y, x, D.to(compute_dtype).view(nheads, 1))
    return y.to(out_dtype), state.reshape(batch, nheads, headdim, dstate)


def _chunk_documents(seq_idx: torch.Tensor | None, nchunks: int, chunk_size: int) -> list:
    """Per chunk None (no document boundary at or inside it, in any row), or (document of the token
    before the chunk (b,), documents of its tokens (b, l)). The padding of a ragged end continues
    the last document; the initial state counts as the first token's document."""
    if seq_idx is None:
        return [None] * nchunks
    pad = nchunks * chunk_size - seq_idx.shape[1]
    ids = torch.cat([seq_idx[:, :1], seq_idx, seq_idx[:, -1:].expand(-1, pad)], dim=1)  # (b, 1 + nc * l)
    before, tokens = ids[:, :-1:chunk_size], ids[:, 1:].unflatten(1, (nchunks, chunk_size))
    crossing = (tokens[:, :, -1] != before).any(0).tolist()  # ids never decrease: a boundary moves the last
    return [(before[:, j], tokens[:, j]) if crossing[j] else None for j in range(nchunks)]


def ssd_recurrent_step(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    state: torch.Tensor,
    D: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token of the recurrence, updating ``state`` in place (used for decoding).

    Args:
        x: (b, h, p); dt: (b, h) positive; A: (h,); B, C: (b, g, n); state: (b, h, p, n)
        float32 (float64 for float64 models); D: (h,) or None.

    Returns:
        y: (b, h, p) in x's dtype.
    """
    batch, nheads, headdim = x.shape
    ngroups, dstate = B.shape[1], B.shape[2]
    flat = state.view(batch * ngroups, -1, dstate)  # (b*g, r*p, n): the r heads of a group share B and C
    dt, x32 = dt.to(state.dtype), x.to(state.dtype)
    state.mul_(torch.exp(dt * A)[..., None, None])
    flat.baddbmm_((x32 * dt.unsqueeze(-1)).view(batch * ngroups, -1, 1),
                  B.to(state.dtype).reshape(batch * ngroups, 1, dstate))  # += x_dt B^T
    y = torch.bmm(flat, C.to(state.dtype).reshape(batch * ngroups, dstate, 1)).view(batch, nheads, headdim)
    if D is not None:
        y = torch.addcmul(y, x32, D.to(state.dtype).unsqueeze(-1))
    return y.to(x.dtype)
