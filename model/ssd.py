"""Minimal chunked SSD (state space duality) scan of Mamba2, in pure PyTorch.

This is the ground truth that the Triton kernels in ``model/kernels/`` are tested against.
It follows ``ssd_minimal.py`` of mamba_ssm (Dao & Gu, "Transformers are SSMs", arXiv
2405.21060) and HF ``modeling_mamba2.py``'s torch path, in the notation of the paper:

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t B_t^T        # state (P, N) per head
    y_t = h_t C_t + D * x_t

The sequence is cut into chunks of ``chunk_size`` tokens. Inside a chunk the output is a
masked (C B^T * decay) @ (dt x) matmul (the "diagonal block"); between chunks only the
(B, H, P, N) state is passed on, so the cost is linear in the sequence length and no
(L x L) matrix ever exists. A ragged last chunk is padded with dt = 0, which neither decays
nor feeds the state, so the final state is exact.
"""

import torch
import torch.nn.functional as F


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
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

    Returns:
        y: (b, l, h, p) in x's dtype, and final_state: (b, h, p, n) float32 (float64 for
        float64 inputs). Low-precision inputs are computed with float32 accumulation.
    """
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    if nheads % ngroups != 0:
        raise ValueError(f"ssd_chunked: heads ({nheads}) must be a multiple of groups ({ngroups})")
    compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    out_dtype = x.dtype
    x, dt, A, B, C = (t.to(compute_dtype) for t in (x, dt, A, B, C))

    # Pad to whole chunks with dt = 0 (no decay, no input) and cut into chunks.
    pad = (-seqlen) % chunk_size
    nchunks = (seqlen + pad) // chunk_size
    x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    x = x.view(batch, nchunks, chunk_size, nheads, headdim)  # (b, c, l, h, p)
    dt = dt.view(batch, nchunks, chunk_size, nheads)  # (b, c, l, h)
    B = B.view(batch, nchunks, chunk_size, ngroups, dstate)  # (b, c, l, g, n)
    C = C.view(batch, nchunks, chunk_size, ngroups, dstate)
    heads_per_group = nheads // ngroups

    # Log-decay accumulated within each chunk; decay from token s to token t is
    # exp(a_cum[t] - a_cum[s]) for s <= t.
    a_cum = torch.cumsum(dt * A, dim=2).transpose(2, 3)  # (b, c, h, l)
    x_dt = (x * dt.unsqueeze(-1)).permute(0, 1, 3, 2, 4)  # (b, c, h, l, p)
    x_dt = x_dt.reshape(batch, nchunks, ngroups, heads_per_group, chunk_size, headdim)

    # 1. Diagonal blocks: y_t = sum_{s<=t} (C_t . B_s) exp(a_cum[t] - a_cum[s]) dt_s x_s.
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=x.device).tril()
    log_decay = a_cum.unsqueeze(-1) - a_cum.unsqueeze(-2)  # (b, c, h, l, s)
    decay = torch.exp(log_decay.masked_fill(~causal, -torch.inf))
    decay = decay.view(batch, nchunks, ngroups, heads_per_group, chunk_size, chunk_size)
    scores = torch.einsum("bclgn,bcsgn->bcgls", C, B).unsqueeze(3)  # (b, c, g, 1, l, s)
    y = torch.matmul(scores * decay, x_dt)  # (b, c, g, r, l, p)

    # 2. State contributed by each chunk alone: sum_s exp(a_cum[-1] - a_cum[s]) dt_s x_s B_s^T.
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum)  # (b, c, h, l)
    decay_to_end = decay_to_end.view(batch, nchunks, ngroups, heads_per_group, chunk_size, 1)
    chunk_states = torch.matmul(
        (x_dt * decay_to_end).transpose(-1, -2), B.transpose(2, 3).unsqueeze(3)
    )  # (b, c, g, r, p, n)

    # 3. Pass states between chunks: state entering chunk c+1 = decayed state + chunk c's own.
    if initial_state is None:
        state = x.new_zeros(batch, ngroups, heads_per_group, headdim, dstate)
    else:
        state = initial_state.to(compute_dtype).view(batch, ngroups, heads_per_group, headdim, dstate)
    chunk_decay = torch.exp(a_cum[..., -1]).view(batch, nchunks, ngroups, heads_per_group, 1, 1)
    states_in = []
    for c in range(nchunks):
        states_in.append(state)
        state = state * chunk_decay[:, c] + chunk_states[:, c]
    states_in = torch.stack(states_in, dim=1)  # (b, c, g, r, p, n)

    # 4. Off-diagonal part: y_t += exp(a_cum[t]) * state_in C_t.
    decay_from_start = torch.exp(a_cum).view(batch, nchunks, ngroups, heads_per_group, chunk_size, 1)
    c_heads = C.transpose(2, 3).unsqueeze(3)  # (b, c, g, 1, l, n)
    y = y + torch.matmul(c_heads, states_in.transpose(-1, -2)) * decay_from_start

    y = y.view(batch, nchunks, nheads, chunk_size, headdim).transpose(2, 3)
    y = y.reshape(batch, nchunks * chunk_size, nheads, headdim)[:, :seqlen]  # (b, l, h, p)
    if D is not None:
        y = y + x.view(batch, -1, nheads, headdim)[:, :seqlen] * D.to(compute_dtype).view(nheads, 1)
    return y.to(out_dtype), state.view(batch, nheads, headdim, dstate)


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
        float32; D: (h,) or None.

    Returns:
        y: (b, h, p) in x's dtype.
    """
    nheads, ngroups = x.shape[1], B.shape[1]
    B = B.repeat_interleave(nheads // ngroups, dim=1).to(state.dtype)  # (b, h, n)
    C = C.repeat_interleave(nheads // ngroups, dim=1).to(state.dtype)
    dt = dt.to(state.dtype)
    x_state = x.to(state.dtype)
    decay = torch.exp(dt * A.to(state.dtype))  # (b, h)
    state.mul_(decay[..., None, None]).add_((dt.unsqueeze(-1) * x_state).unsqueeze(-1) * B.unsqueeze(2))
    y = torch.einsum("bhpn,bhn->bhp", state, C)
    if D is not None:
        y = y + x_state * D.to(state.dtype).unsqueeze(-1)
    return y.to(x.dtype)
