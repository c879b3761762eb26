"""Triton kernels for the chunked SSD scan of Mamba2, forward and backward.

The reference is ``model/ssd.py::ssd_chunked``; ``ssd_chunked_triton`` has the same signature
and returns the same values. Notation, per chunk c of Q tokens, with i the output position and
j the input position inside the chunk, head h reading group h // (H / G):

    a_i  = sum_{k<=i} dt_k A                          chunk cumsum of the log decay (<= 0, non-increasing)
    T_c  = sum_j exp(a_last - a_j) dt_j x_j B_j^T     state the chunk contributes on its own   (P, N)
    S_c  : S_0 = initial_state, S_{c+1} = exp(a_last) S_c + T_c    state entering chunk c
    y_i  = exp(a_i) S_c C_i + sum_{j<=i} (C_i . B_j) exp(a_i - a_j) dt_j x_j + D x_i

Forward = chunk cumsum -> chunk state -> state passing -> chunk scan. The backward pass with
dy and dS_final given, U_c = dL/dS_{c+1} (so U_last = dS_final):

    dS_c = exp(a_last) U_c + sum_i exp(a_i) dy_i C_i^T                 (reverse state passing)
    r_j  = sum_{i>=j} (C_i . B_j) exp(a_i - a_j) dy_i + exp(a_last - a_j) U_c B_j      (P,)
    dx_j = dt_j r_j + D dy_j
    dB_j = dt_j [sum_{i>=j} (dy_i . x_j) exp(a_i - a_j) C_i + exp(a_last - a_j) U_c^T x_j]
    dC_i = sum_{j<=i} (dy_i . x_j) exp(a_i - a_j) dt_j B_j + exp(a_i) S_c^T dy_i
    da_i = C_i . dC_i - dt_i (x_i . r_i)
           + [i = last] (sum_j dt_j x_j . r_j^state + exp(a_last) <U_c, S_c>)
    ddt_k = x_k . r_k + A sum_{i>=k} da_i ;  dA = sum_k dt_k sum_{i>=k} da_i ;  dD = sum dy . x

dB and dC are first kept per head (float32) and summed over each group's heads afterwards, which
keeps the kernels free of atomics and the result deterministic. Every exponent used is <= 0;
entries outside the causal mask get -inf before exp, so nothing overflows. All arithmetic and
every tl.dot accumulate in float32; fp32 inputs use exact ("ieee") dots, bf16/fp16 inputs TF32
dots (more mantissa than the inputs carry). Padding positions past the sequence end load
dt = x = B = C = 0, which neither decay nor feed the state: ragged last chunks are exact.

Documents (``seq_idx``, the document index of each token, non-decreasing): no state passes from
one document to the next. Per chunk, with doc_i the document of position i (the padding of a
ragged end continues the last document) and doc_before that of the token before the chunk (the
first token's for chunk 0: the initial state belongs to the first document), three 0/1 factors
enter the formulas above:

    carried_i = [doc_i = doc_before]  on exp(a_i) S_c C_i: the entering state reaches its document only
    kept_j    = [doc_j = doc_last]    on exp(a_last - a_j) in T_c: the leaving state holds the last document only
    same_ij   = [doc_i = doc_j]       on the (i, j) terms of y_i: tokens mix within their document only

and S_{c+1} = carried_last exp(a_last) S_c + T_c, carried_last being 0 iff a boundary lies in the
chunk. As constants they multiply the same terms of the backward: carried_i the exp(a_i) terms of
dS_c and dC_i, carried_last exp(a_last) in dS_c and da_last, kept_j the exp(a_last - a_j) terms of
r_j and dB_j, same_ij the (i, j) sums. The loss depends on the a_i of a later document in the chunk
only through differences within it, so their da sum to zero: the suffix sums of da for ddt and dA
run over each token's own document, which makes the gradient across a boundary exactly zero rather
than rounding noise. Without ``seq_idx`` the kernels compile without any of this (HAS_SEQ_IDX).
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _doc(seq_idx_ptr, batch, t, seqlen):
    """Document of position t (a scalar or a block) in row ``batch``: positions past the end (the
    padding of a ragged last chunk) continue the last document, and position -1, the one before the
    first chunk, counts as the first token's (the initial state belongs to the first document)."""
    return tl.load(seq_idx_ptr + batch * seqlen + tl.minimum(tl.maximum(t, 0), seqlen - 1))


@triton.jit
def _chunk_cumsum_fwd_kernel(dt_ptr, A_ptr, a_ptr, seqlen, nheads, chunk_size, BLOCK_Q: tl.constexpr):
    """a[b, h, c, i] = sum_{k<=i} dt[b, cQ + k, h] A[h], float32, for i < Q."""
    nchunks = tl.cdiv(seqlen, chunk_size)
    batch = (tl.program_id(0) // nchunks).to(tl.int64)
    chunk = tl.program_id(0) % nchunks
    head = tl.program_id(1)
    i = tl.arange(0, BLOCK_Q)
    t = chunk * chunk_size + i
    dt = tl.load(dt_ptr + (batch * seqlen + t) * nheads + head, mask=(i < chunk_size) & (t < seqlen), other=0.0)
    a = tl.cumsum(dt.to(tl.float32) * tl.load(A_ptr + head).to(tl.float32), axis=0)
    tl.store(a_ptr + ((batch * nheads + head) * nchunks + chunk) * chunk_size + i, a, mask=i < chunk_size)


@triton.jit
def _sum_of_first_doc(sum_a, doc_a, sum_b, doc_b):
    """Combines (sum over the earliest document of a span, that document) of two adjacent spans.

    Commutative, so a reverse scan with it is a suffix sum over the token's own document whichever
    operand order the scan uses.
    """
    doc = tl.minimum(doc_a, doc_b)
    return tl.where(doc_a == doc, sum_a, 0.0) + tl.where(doc_b == doc, sum_b, 0.0), doc


@triton.jit
def _chunk_cumsum_bwd_kernel(
    dt_ptr, A_ptr, da_ptr, ddt_direct_ptr, da_last_ptr, seq_idx_ptr, ddt_ptr, dA_partial_ptr,
    seqlen, nheads, chunk_size, HAS_SEQ_IDX: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    """Completes da (see module docstring) and pushes it through the cumsum into ddt and dA.

    HAS_SEQ_IDX: the suffix sum of da runs over the token's own document only (see module docstring).
    """
    nchunks = tl.cdiv(seqlen, chunk_size)
    batch = (tl.program_id(0) // nchunks).to(tl.int64)
    chunk = tl.program_id(0) % nchunks
    head = tl.program_id(1)
    i = tl.arange(0, BLOCK_Q)
    t = chunk * chunk_size + i
    valid = (i < chunk_size) & (t < seqlen)
    row = (batch * nheads + head) * nchunks + chunk
    dt = tl.load(dt_ptr + (batch * seqlen + t) * nheads + head, mask=valid, other=0.0).to(tl.float32)
    ddt_direct = tl.load(ddt_direct_ptr + row * chunk_size + i, mask=i < chunk_size, other=0.0)
    da = tl.load(da_ptr + row * chunk_size + i, mask=i < chunk_size, other=0.0) - dt * ddt_direct
    da += tl.where(i == chunk_size - 1, tl.load(da_last_ptr + row), 0.0)
    if HAS_SEQ_IDX:
        doc = _doc(seq_idx_ptr, batch, t, seqlen)
        da_suffix, _ = tl.associative_scan((da, doc), 0, _sum_of_first_doc, reverse=True)
    else:
        da_suffix = tl.cumsum(da, axis=0, reverse=True)  # dL / d(dt_k A), by linearity of the cumsum
    ddt = ddt_direct + tl.load(A_ptr + head).to(tl.float32) * da_suffix
    tl.store(ddt_ptr + (batch * seqlen + t) * nheads + head, ddt.to(ddt_ptr.dtype.element_ty), mask=valid)
    tl.store(dA_partial_ptr + row, tl.sum(dt * da_suffix, axis=0))


@triton.jit
def _chunk_state_kernel(
    x_ptr, B_ptr, dt_ptr, a_ptr, seq_idx_ptr, out_ptr,
    seqlen, nheads, ngroups, headdim, dstate, chunk_size,
    FROM_START: tl.constexpr, HAS_SEQ_IDX: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[b, c, h] = sum_i w_i x_i B_i^T over chunk c, (P, N) float32.

    w_i = dt_i exp(a_last - a_i) (x = inputs, B = B): the state T_c the chunk contributes.
    FROM_START, w_i = exp(a_i) (x = dy, B = C): the gradient the chunk sends to its entering state.
    HAS_SEQ_IDX: w_i = 0 for tokens outside the chunk's last document (T_c holds only that one),
    FROM_START outside the document of the token before the chunk (only those read S_c).
    """
    nchunks = tl.cdiv(seqlen, chunk_size)
    batch = (tl.program_id(0) // nchunks).to(tl.int64)
    chunk = tl.program_id(0) % nchunks
    head = tl.program_id(1)
    group = head // (nheads // ngroups)
    blocks_n = tl.cdiv(dstate, BLOCK_N)
    p = (tl.program_id(2) // blocks_n) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = (tl.program_id(2) % blocks_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    a_row = a_ptr + ((batch * nheads + head) * nchunks + chunk) * chunk_size
    a_last = tl.load(a_row + chunk_size - 1)
    if HAS_SEQ_IDX:
        if FROM_START:
            doc_kept = _doc(seq_idx_ptr, batch, chunk * chunk_size - 1, seqlen)
        else:
            doc_kept = _doc(seq_idx_ptr, batch, chunk * chunk_size + chunk_size - 1, seqlen)
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for i0 in range(0, chunk_size, BLOCK_Q):
        i = i0 + tl.arange(0, BLOCK_Q)
        t = chunk * chunk_size + i
        valid = (i < chunk_size) & (t < seqlen)
        a = tl.load(a_row + i, mask=i < chunk_size, other=0.0)
        if FROM_START:
            weight = tl.exp(a)
        else:
            dt = tl.load(dt_ptr + (batch * seqlen + t) * nheads + head, mask=valid, other=0.0).to(tl.float32)
            weight = dt * tl.exp(a_last - a)
        if HAS_SEQ_IDX:
            weight = tl.where(_doc(seq_idx_ptr, batch, t, seqlen) == doc_kept, weight, 0.0)
        x_t = tl.load(  # (P, Q): x transposed
            x_ptr + ((batch * seqlen + t[None, :]) * nheads + head) * headdim + p[:, None],
            mask=valid[None, :] & (p[:, None] < headdim), other=0.0,
        ).to(tl.float32)
        b = tl.load(  # (Q, N)
            B_ptr + ((batch * seqlen + t[:, None]) * ngroups + group) * dstate + n[None, :],
            mask=valid[:, None] & (n[None, :] < dstate), other=0.0,
        ).to(tl.float32)
        acc += tl.dot(x_t * weight[None, :], b, input_precision=DOT_PRECISION)
    out = out_ptr + ((batch * nchunks + chunk) * nheads + head) * headdim * dstate
    tl.store(out + p[:, None] * dstate + n[None, :], acc, mask=(p[:, None] < headdim) & (n[None, :] < dstate))


@triton.jit
def _carried_decay(seq_idx_ptr, batch, chunk, a_last, seqlen, chunk_size, HAS_SEQ_IDX: tl.constexpr):
    """Factor of S_c in S_{c+1}: exp(a_last), or 0 where the chunk's last token is in another document
    than the token before the chunk (a boundary lies in the chunk; documents never decrease)."""
    decay = tl.exp(a_last)
    if HAS_SEQ_IDX:
        start = chunk * chunk_size
        same = _doc(seq_idx_ptr, batch, start - 1, seqlen) == _doc(seq_idx_ptr, batch, start + chunk_size - 1, seqlen)
        decay = tl.where(same, decay, 0.0)
    return decay


@triton.jit
def _state_passing_fwd_kernel(
    states_ptr, a_ptr, seq_idx_ptr, initial_ptr, final_ptr,
    seqlen, nchunks, nheads, chunk_size, state_size,
    HAS_INITIAL: tl.constexpr, HAS_SEQ_IDX: tl.constexpr, BLOCK: tl.constexpr,
):
    """Turns the chunk states T_c, in place, into the states S_c entering each chunk.

    HAS_SEQ_IDX: S_c does not pass a chunk with a document boundary in it (S_{c+1} = T_c there).
    """
    batch = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    k = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    mask = k < state_size
    if HAS_INITIAL:
        state = tl.load(initial_ptr + (batch * nheads + head) * state_size + k, mask=mask, other=0.0).to(tl.float32)
    else:
        state = tl.zeros((BLOCK,), dtype=tl.float32)
    for chunk in range(nchunks):
        ptr = states_ptr + ((batch * nchunks + chunk) * nheads + head) * state_size + k
        own = tl.load(ptr, mask=mask, other=0.0)
        tl.store(ptr, state, mask=mask)
        a_last = tl.load(a_ptr + ((batch * nheads + head) * nchunks + chunk) * chunk_size + chunk_size - 1)
        decay = _carried_decay(seq_idx_ptr, batch, chunk, a_last, seqlen, chunk_size, HAS_SEQ_IDX)
        state = decay * state + own
    tl.store(final_ptr + (batch * nheads + head) * state_size + k, state, mask=mask)


@triton.jit
def _state_passing_bwd_kernel(
    grads_ptr, states_ptr, a_ptr, seq_idx_ptr, dfinal_ptr, dinitial_ptr, da_last_partial_ptr,
    seqlen, nchunks, nheads, chunk_size, state_size, HAS_SEQ_IDX: tl.constexpr, BLOCK: tl.constexpr,
):
    """Reverse state passing: turns sum_i exp(a_i) dy_i C_i^T, in place, into U_c = dL/dS_{c+1}.

    Also writes dL/dS_0 and this block's share of exp(a_last) <U_c, S_c> (a part of da_last).
    HAS_SEQ_IDX: exp(a_last) is 0 for a chunk with a document boundary, as in the forward.
    """
    batch = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    block = tl.program_id(2)
    k = block * BLOCK + tl.arange(0, BLOCK)
    mask = k < state_size
    grad = tl.load(dfinal_ptr + (batch * nheads + head) * state_size + k, mask=mask, other=0.0).to(tl.float32)
    for step in range(nchunks):
        chunk = nchunks - 1 - step
        offset = ((batch * nchunks + chunk) * nheads + head) * state_size + k
        from_output = tl.load(grads_ptr + offset, mask=mask, other=0.0)
        tl.store(grads_ptr + offset, grad, mask=mask)
        row = (batch * nheads + head) * nchunks + chunk
        a_last = tl.load(a_ptr + row * chunk_size + chunk_size - 1)
        decay = _carried_decay(seq_idx_ptr, batch, chunk, a_last, seqlen, chunk_size, HAS_SEQ_IDX)
        state = tl.load(states_ptr + offset, mask=mask, other=0.0)
        tl.store(da_last_partial_ptr + row * tl.num_programs(2) + block, decay * tl.sum(grad * state, axis=0))
        grad = decay * grad + from_output
    tl.store(dinitial_ptr + (batch * nheads + head) * state_size + k, grad, mask=mask)


@triton.jit
def _chunk_scan_fwd_kernel(
    x_ptr, dt_ptr, a_ptr, B_ptr, C_ptr, states_ptr, D_ptr, seq_idx_ptr, y_ptr,
    seqlen, nheads, ngroups, headdim, dstate, chunk_size,
    HAS_D: tl.constexpr, HAS_SEQ_IDX: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """y_i = exp(a_i) S_c C_i + sum_{j<=i} (C_i . B_j) exp(a_i - a_j) dt_j x_j + D x_i for a block of (i, p).

    HAS_SEQ_IDX: the S_c term only for i in the document of the token before the chunk, the sum
    only over j in i's document.
    """
    nchunks = tl.cdiv(seqlen, chunk_size)
    batch = (tl.program_id(0) // nchunks).to(tl.int64)
    chunk = tl.program_id(0) % nchunks
    head = tl.program_id(1)
    group = head // (nheads // ngroups)
    blocks_p = tl.cdiv(headdim, BLOCK_P)
    block_i = tl.program_id(2) // blocks_p
    i = block_i * BLOCK_Q + tl.arange(0, BLOCK_Q)
    p = (tl.program_id(2) % blocks_p) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    t_i = chunk * chunk_size + i
    valid_i = (i < chunk_size) & (t_i < seqlen)
    a_row = a_ptr + ((batch * nheads + head) * nchunks + chunk) * chunk_size
    a_i = tl.load(a_row + i, mask=i < chunk_size, other=0.0)
    from_start = tl.exp(a_i)
    if HAS_SEQ_IDX:
        doc_i = _doc(seq_idx_ptr, batch, t_i, seqlen)
        from_start = tl.where(doc_i == _doc(seq_idx_ptr, batch, chunk * chunk_size - 1, seqlen), from_start, 0.0)
    c_i = tl.load(  # (Q, N)
        C_ptr + ((batch * seqlen + t_i[:, None]) * ngroups + group) * dstate + n[None, :],
        mask=valid_i[:, None] & (n[None, :] < dstate), other=0.0,
    ).to(tl.float32)
    state_t = tl.load(  # (N, P): S_c transposed
        states_ptr + ((batch * nchunks + chunk) * nheads + head) * headdim * dstate + p[None, :] * dstate + n[:, None],
        mask=(n[:, None] < dstate) & (p[None, :] < headdim), other=0.0,
    )
    acc = tl.dot(c_i, state_t, input_precision=DOT_PRECISION) * from_start[:, None]
    for j0 in range(0, tl.minimum((block_i + 1) * BLOCK_Q, chunk_size), BLOCK_Q):
        j = j0 + tl.arange(0, BLOCK_Q)
        t_j = chunk * chunk_size + j
        valid_j = (j < chunk_size) & (t_j < seqlen)
        a_j = tl.load(a_row + j, mask=j < chunk_size, other=0.0)
        dt_j = tl.load(dt_ptr + (batch * seqlen + t_j) * nheads + head, mask=valid_j, other=0.0).to(tl.float32)
        b_t = tl.load(  # (N, Q): B_j transposed
            B_ptr + ((batch * seqlen + t_j[None, :]) * ngroups + group) * dstate + n[:, None],
            mask=valid_j[None, :] & (n[:, None] < dstate), other=0.0,
        ).to(tl.float32)
        x_j = tl.load(  # (Q, P)
            x_ptr + ((batch * seqlen + t_j[:, None]) * nheads + head) * headdim + p[None, :],
            mask=valid_j[:, None] & (p[None, :] < headdim), other=0.0,
        ).to(tl.float32)
        causal = (j[None, :] <= i[:, None]) & (i[:, None] < chunk_size)
        if HAS_SEQ_IDX:
            causal = causal & (doc_i[:, None] == _doc(seq_idx_ptr, batch, t_j, seqlen)[None, :])
        decay = tl.exp(tl.where(causal, a_i[:, None] - a_j[None, :], float("-inf")))
        scores = tl.dot(c_i, b_t, input_precision=DOT_PRECISION) * decay * dt_j[None, :]
        acc += tl.dot(scores, x_j, input_precision=DOT_PRECISION)
    x_offsets = ((batch * seqlen + t_i[:, None]) * nheads + head) * headdim + p[None, :]
    mask = valid_i[:, None] & (p[None, :] < headdim)
    if HAS_D:
        acc += tl.load(D_ptr + head).to(tl.float32) * tl.load(x_ptr + x_offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + x_offsets, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _chunk_scan_bwd_dx_kernel(
    x_ptr, dt_ptr, a_ptr, B_ptr, C_ptr, dy_ptr, grads_ptr, D_ptr, seq_idx_ptr,
    dx_ptr, ddt_direct_ptr, dB_heads_ptr, dD_partial_ptr, da_last_partial_ptr,
    seqlen, nheads, ngroups, headdim, dstate, chunk_size,
    HAS_D: tl.constexpr, HAS_SEQ_IDX: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Input side of the backward for a block of positions j: dx_j, x_j . r_j, dB_j (this head), dD, da_last.

    HAS_SEQ_IDX: the U_c terms only for j in the chunk's last document, the i terms only for i in j's.
    """
    nchunks = tl.cdiv(seqlen, chunk_size)
    batch = (tl.program_id(0) // nchunks).to(tl.int64)
    chunk = tl.program_id(0) % nchunks
    head = tl.program_id(1)
    group = head // (nheads // ngroups)
    block_j = tl.program_id(2)
    j = block_j * BLOCK_Q + tl.arange(0, BLOCK_Q)
    p = tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    t_j = chunk * chunk_size + j
    valid_j = (j < chunk_size) & (t_j < seqlen)
    row = (batch * nheads + head) * nchunks + chunk
    a_j = tl.load(a_ptr + row * chunk_size + j, mask=j < chunk_size, other=0.0)
    a_last = tl.load(a_ptr + row * chunk_size + chunk_size - 1)
    dt_j = tl.load(dt_ptr + (batch * seqlen + t_j) * nheads + head, mask=valid_j, other=0.0).to(tl.float32)
    x_offsets = ((batch * seqlen + t_j[:, None]) * nheads + head) * headdim + p[None, :]
    x_mask = valid_j[:, None] & (p[None, :] < headdim)
    x_j = tl.load(x_ptr + x_offsets, mask=x_mask, other=0.0).to(tl.float32)  # (Q, P)
    b_j = tl.load(  # (Q, N)
        B_ptr + ((batch * seqlen + t_j[:, None]) * ngroups + group) * dstate + n[None, :],
        mask=valid_j[:, None] & (n[None, :] < dstate), other=0.0,
    ).to(tl.float32)
    grad_offsets = ((batch * nchunks + chunk) * nheads + head) * headdim * dstate + p[:, None] * dstate + n[None, :]
    grad_state = tl.load(grads_ptr + grad_offsets, mask=(p[:, None] < headdim) & (n[None, :] < dstate), other=0.0)

    # What the chunk's own state T_c sends back: r_j^state and dB_j^state.
    decay_to_end = tl.exp(a_last - a_j)
    if HAS_SEQ_IDX:
        doc_j = _doc(seq_idx_ptr, batch, t_j, seqlen)
        last_doc = _doc(seq_idx_ptr, batch, chunk * chunk_size + chunk_size - 1, seqlen)
        decay_to_end = tl.where(doc_j == last_doc, decay_to_end, 0.0)
    r = tl.dot(b_j, tl.trans(grad_state), input_precision=DOT_PRECISION) * decay_to_end[:, None]  # (Q, P)
    da_last_share = tl.sum(dt_j * tl.sum(x_j * r, axis=1), axis=0)
    db = tl.dot(x_j, grad_state, input_precision=DOT_PRECISION) * decay_to_end[:, None]  # (Q, N)

    # What the outputs i >= j of this chunk send back.
    for i0 in range(block_j * BLOCK_Q, chunk_size, BLOCK_Q):
        i = i0 + tl.arange(0, BLOCK_Q)
        t_i = chunk * chunk_size + i
        valid_i = (i < chunk_size) & (t_i < seqlen)
        a_i = tl.load(a_ptr + row * chunk_size + i, mask=i < chunk_size, other=0.0)
        c_i = tl.load(  # (Q, N)
            C_ptr + ((batch * seqlen + t_i[:, None]) * ngroups + group) * dstate + n[None, :],
            mask=valid_i[:, None] & (n[None, :] < dstate), other=0.0,
        ).to(tl.float32)
        dy_i = tl.load(  # (Q, P)
            dy_ptr + ((batch * seqlen + t_i[:, None]) * nheads + head) * headdim + p[None, :],
            mask=valid_i[:, None] & (p[None, :] < headdim), other=0.0,
        ).to(tl.float32)
        causal = (i[None, :] >= j[:, None]) & (i[None, :] < chunk_size)
        if HAS_SEQ_IDX:
            causal = causal & (doc_j[:, None] == _doc(seq_idx_ptr, batch, t_i, seqlen)[None, :])
        decay = tl.exp(tl.where(causal, a_i[None, :] - a_j[:, None], float("-inf")))  # (Qj, Qi)
        scores = tl.dot(b_j, tl.trans(c_i), input_precision=DOT_PRECISION) * decay
        r += tl.dot(scores, dy_i, input_precision=DOT_PRECISION)
        x_dot_dy = tl.dot(x_j, tl.trans(dy_i), input_precision=DOT_PRECISION) * decay
        db += tl.dot(x_dot_dy, c_i, input_precision=DOT_PRECISION)

    dy_j = tl.load(dy_ptr + x_offsets, mask=x_mask, other=0.0).to(tl.float32)
    dx = dt_j[:, None] * r
    if HAS_D:
        dx += tl.load(D_ptr + head).to(tl.float32) * dy_j
    tl.store(dx_ptr + x_offsets, dx.to(dx_ptr.dtype.element_ty), mask=x_mask)
    tl.store(ddt_direct_ptr + row * chunk_size + j, tl.sum(x_j * r, axis=1), mask=j < chunk_size)
    tl.store(
        dB_heads_ptr + ((batch * seqlen + t_j[:, None]) * nheads + head) * dstate + n[None, :],
        dt_j[:, None] * db, mask=valid_j[:, None] & (n[None, :] < dstate),
    )
    partial = row * tl.num_programs(2) + block_j
    tl.store(dD_partial_ptr + partial, tl.sum(tl.sum(x_j * dy_j, axis=1), axis=0))
    tl.store(da_last_partial_ptr + partial, da_last_share)


@triton.jit
def _chunk_scan_bwd_dc_kernel(
    x_ptr, dt_ptr, a_ptr, B_ptr, C_ptr, dy_ptr, states_ptr, seq_idx_ptr, dC_heads_ptr, da_ptr,
    seqlen, nheads, ngroups, headdim, dstate, chunk_size,
    HAS_SEQ_IDX: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Output side of the backward for a block of positions i: dC_i (this head) and C_i . dC_i.

    HAS_SEQ_IDX: the S_c term only for i in the document of the token before the chunk, the j
    terms only for j in i's document (the forward's masks).
    """
    nchunks = tl.cdiv(seqlen, chunk_size)
    batch = (tl.program_id(0) // nchunks).to(tl.int64)
    chunk = tl.program_id(0) % nchunks
    head = tl.program_id(1)
    group = head // (nheads // ngroups)
    block_i = tl.program_id(2)
    i = block_i * BLOCK_Q + tl.arange(0, BLOCK_Q)
    p = tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    t_i = chunk * chunk_size + i
    valid_i = (i < chunk_size) & (t_i < seqlen)
    row = (batch * nheads + head) * nchunks + chunk
    a_i = tl.load(a_ptr + row * chunk_size + i, mask=i < chunk_size, other=0.0)
    dy_i = tl.load(  # (Q, P)
        dy_ptr + ((batch * seqlen + t_i[:, None]) * nheads + head) * headdim + p[None, :],
        mask=valid_i[:, None] & (p[None, :] < headdim), other=0.0,
    ).to(tl.float32)
    state = tl.load(  # (P, N)
        states_ptr + ((batch * nchunks + chunk) * nheads + head) * headdim * dstate + p[:, None] * dstate + n[None, :],
        mask=(p[:, None] < headdim) & (n[None, :] < dstate), other=0.0,
    )
    from_start = tl.exp(a_i)
    if HAS_SEQ_IDX:
        doc_i = _doc(seq_idx_ptr, batch, t_i, seqlen)
        from_start = tl.where(doc_i == _doc(seq_idx_ptr, batch, chunk * chunk_size - 1, seqlen), from_start, 0.0)
    dc = tl.dot(dy_i, state, input_precision=DOT_PRECISION) * from_start[:, None]  # (Q, N)
    for j0 in range(0, tl.minimum((block_i + 1) * BLOCK_Q, chunk_size), BLOCK_Q):
        j = j0 + tl.arange(0, BLOCK_Q)
        t_j = chunk * chunk_size + j
        valid_j = (j < chunk_size) & (t_j < seqlen)
        a_j = tl.load(a_ptr + row * chunk_size + j, mask=j < chunk_size, other=0.0)
        dt_j = tl.load(dt_ptr + (batch * seqlen + t_j) * nheads + head, mask=valid_j, other=0.0).to(tl.float32)
        x_j = tl.load(  # (Q, P)
            x_ptr + ((batch * seqlen + t_j[:, None]) * nheads + head) * headdim + p[None, :],
            mask=valid_j[:, None] & (p[None, :] < headdim), other=0.0,
        ).to(tl.float32)
        b_j = tl.load(  # (Q, N)
            B_ptr + ((batch * seqlen + t_j[:, None]) * ngroups + group) * dstate + n[None, :],
            mask=valid_j[:, None] & (n[None, :] < dstate), other=0.0,
        ).to(tl.float32)
        causal = (j[None, :] <= i[:, None]) & (i[:, None] < chunk_size)
        if HAS_SEQ_IDX:
            causal = causal & (doc_i[:, None] == _doc(seq_idx_ptr, batch, t_j, seqlen)[None, :])
        decay = tl.exp(tl.where(causal, a_i[:, None] - a_j[None, :], float("-inf")))  # (Qi, Qj)
        weights = tl.dot(dy_i, tl.trans(x_j), input_precision=DOT_PRECISION) * decay * dt_j[None, :]
        dc += tl.dot(weights, b_j, input_precision=DOT_PRECISION)
    c_i = tl.load(
        C_ptr + ((batch * seqlen + t_i[:, None]) * ngroups + group) * dstate + n[None, :],
        mask=valid_i[:, None] & (n[None, :] < dstate), other=0.0,
    ).to(tl.float32)
    tl.store(
        dC_heads_ptr + ((batch * seqlen + t_i[:, None]) * nheads + head) * dstate + n[None, :],
        dc, mask=valid_i[:, None] & (n[None, :] < dstate),
    )
    tl.store(da_ptr + row * chunk_size + i, tl.sum(c_i * dc, axis=1), mask=i < chunk_size)


def _blocks(chunk_size: int, headdim: int, dstate: int, max_q: int = 64) -> dict:
    """Tile sizes: whole head dim and state dim per program, chunk positions in tiles (tl.dot needs >= 16)."""
    return dict(
        BLOCK_Q=min(max_q, max(16, triton.next_power_of_2(chunk_size))),
        BLOCK_P=max(16, triton.next_power_of_2(headdim)),
        BLOCK_N=max(16, triton.next_power_of_2(dstate)),
    )


# The chunk-scan kernels hold several (Q, N) and (P, N) float32 tiles at once: 8 warps, and
# 32-row tiles in the backward, keep them in registers at P = 64, N = 128. Untuned starting
# points (no GPU was available when they were chosen): benchmarks/bench_kernels.py measures them.
_SCAN_WARPS = 8
_BWD_MAX_Q = 32


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


_STATE_BLOCK = 1024  # flattened (P * N) state elements per state-passing program


def _chunk_states(x, dt, A, B, chunk_size, initial_state, seq_idx):
    """Chunk cumsum a (b, h, c, Q), states entering each chunk S_c (b, c, h, p, n) and the final state.

    With ``seq_idx`` (b, l) the chunk states hold only their last document and S_c stops at a boundary.
    """
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2:]
    nchunks = triton.cdiv(seqlen, chunk_size)
    blocks = _blocks(chunk_size, headdim, dstate)
    a = torch.empty(batch, nheads, nchunks, chunk_size, device=x.device, dtype=torch.float32)
    _chunk_cumsum_fwd_kernel[(batch * nchunks, nheads)](
        dt, A, a, seqlen, nheads, chunk_size, BLOCK_Q=triton.next_power_of_2(chunk_size)
    )
    states = torch.empty(batch, nchunks, nheads, headdim, dstate, device=x.device, dtype=torch.float32)
    grid = (batch * nchunks, nheads, triton.cdiv(headdim, blocks["BLOCK_P"]) * triton.cdiv(dstate, blocks["BLOCK_N"]))
    _chunk_state_kernel[grid](
        x, B, dt, a, seq_idx, states, seqlen, nheads, ngroups, headdim, dstate, chunk_size,
        FROM_START=False, HAS_SEQ_IDX=seq_idx is not None, DOT_PRECISION=_dot_precision(x.dtype), **blocks,
    )
    final_state = torch.empty(batch, nheads, headdim, dstate, device=x.device, dtype=torch.float32)
    state_size = headdim * dstate
    _state_passing_fwd_kernel[(batch, nheads, triton.cdiv(state_size, _STATE_BLOCK))](
        states, a, seq_idx, initial_state, final_state, seqlen, nchunks, nheads, chunk_size, state_size,
        HAS_INITIAL=initial_state is not None, HAS_SEQ_IDX=seq_idx is not None, BLOCK=_STATE_BLOCK,
    )
    return a, states, final_state


def _ssd_fwd(x, dt, A, B, C, chunk_size, D, initial_state, seq_idx):
    """y (b, l, h, p) in x's dtype and the final state (b, h, p, n) float32; seq_idx (b, l) or None."""
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2:]
    a, states, final_state = _chunk_states(x, dt, A, B, chunk_size, initial_state, seq_idx)
    blocks = {**_blocks(chunk_size, headdim, dstate), "BLOCK_P": min(64, max(16, triton.next_power_of_2(headdim)))}
    y = torch.empty_like(x)
    nchunks = triton.cdiv(seqlen, chunk_size)
    grid = (
        batch * nchunks, nheads,
        triton.cdiv(chunk_size, blocks["BLOCK_Q"]) * triton.cdiv(headdim, blocks["BLOCK_P"]),
    )
    _chunk_scan_fwd_kernel[grid](
        x, dt, a, B, C, states, D, seq_idx, y, seqlen, nheads, ngroups, headdim, dstate, chunk_size,
        HAS_D=D is not None, HAS_SEQ_IDX=seq_idx is not None, DOT_PRECISION=_dot_precision(x.dtype),
        num_warps=_SCAN_WARPS, **blocks,
    )
    return y, final_state


def _ssd_bwd(dy, dfinal, x, dt, A, B, C, chunk_size, D, initial_state, seq_idx):
    """Gradients (dx, ddt, dA, dB, dC, dD, dinitial_state); chunk states are recomputed, not stored.

    ``seq_idx`` (b, l) or None is the forward's; every kernel applies the forward's document masks.
    """
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2:]
    nchunks = triton.cdiv(seqlen, chunk_size)
    blocks = _blocks(chunk_size, headdim, dstate)
    precision = _dot_precision(x.dtype)
    has_seq_idx = seq_idx is not None
    a, states, _ = _chunk_states(x, dt, A, B, chunk_size, initial_state, seq_idx)
    f32 = dict(device=x.device, dtype=torch.float32)

    # Gradient w.r.t. the chunk states: sum_i exp(a_i) dy_i C_i^T, then reverse state passing -> U_c.
    grads = torch.empty(batch, nchunks, nheads, headdim, dstate, **f32)
    grid = (batch * nchunks, nheads, triton.cdiv(headdim, blocks["BLOCK_P"]) * triton.cdiv(dstate, blocks["BLOCK_N"]))
    _chunk_state_kernel[grid](
        dy, C, dt, a, seq_idx, grads, seqlen, nheads, ngroups, headdim, dstate, chunk_size,
        FROM_START=True, HAS_SEQ_IDX=has_seq_idx, DOT_PRECISION=precision, **blocks,
    )
    state_size = headdim * dstate
    state_blocks = triton.cdiv(state_size, _STATE_BLOCK)
    dinitial = torch.empty(batch, nheads, headdim, dstate, **f32)
    da_last_from_passing = torch.empty(batch, nheads, nchunks, state_blocks, **f32)
    _state_passing_bwd_kernel[(batch, nheads, state_blocks)](
        grads, states, a, seq_idx, dfinal, dinitial, da_last_from_passing,
        seqlen, nchunks, nheads, chunk_size, state_size, HAS_SEQ_IDX=has_seq_idx, BLOCK=_STATE_BLOCK,
    )

    # Intra-chunk part, input side (dx, dB, x . r) and output side (dC, C . dC).
    blocks = _blocks(chunk_size, headdim, dstate, max_q=_BWD_MAX_Q)
    q_blocks = triton.cdiv(chunk_size, blocks["BLOCK_Q"])
    dx = torch.empty_like(x)
    ddt_direct = torch.empty(batch, nheads, nchunks, chunk_size, **f32)
    dB_heads = torch.empty(batch, seqlen, nheads, dstate, **f32)
    dD_partial = torch.empty(batch, nheads, nchunks, q_blocks, **f32)
    da_last_from_states = torch.empty(batch, nheads, nchunks, q_blocks, **f32)
    _chunk_scan_bwd_dx_kernel[(batch * nchunks, nheads, q_blocks)](
        x, dt, a, B, C, dy, grads, D, seq_idx, dx, ddt_direct, dB_heads, dD_partial, da_last_from_states,
        seqlen, nheads, ngroups, headdim, dstate, chunk_size,
        HAS_D=D is not None, HAS_SEQ_IDX=has_seq_idx, DOT_PRECISION=precision, num_warps=_SCAN_WARPS, **blocks,
    )
    dC_heads = torch.empty(batch, seqlen, nheads, dstate, **f32)
    da = torch.empty(batch, nheads, nchunks, chunk_size, **f32)
    _chunk_scan_bwd_dc_kernel[(batch * nchunks, nheads, q_blocks)](
        x, dt, a, B, C, dy, states, seq_idx, dC_heads, da, seqlen, nheads, ngroups, headdim, dstate, chunk_size,
        HAS_SEQ_IDX=has_seq_idx, DOT_PRECISION=precision, num_warps=_SCAN_WARPS, **blocks,
    )

    # Through the chunk cumsum into ddt and dA.
    da_last = (da_last_from_passing.sum(-1) + da_last_from_states.sum(-1)).contiguous()  # (b, h, c)
    ddt = torch.empty_like(dt)
    dA_partial = torch.empty(batch, nheads, nchunks, **f32)
    _chunk_cumsum_bwd_kernel[(batch * nchunks, nheads)](
        dt, A, da, ddt_direct, da_last, seq_idx, ddt, dA_partial, seqlen, nheads, chunk_size,
        HAS_SEQ_IDX=has_seq_idx, BLOCK_Q=triton.next_power_of_2(chunk_size),
    )
    heads_per_group = nheads // ngroups
    dB = dB_heads.view(batch, seqlen, ngroups, heads_per_group, dstate).sum(3).to(B.dtype)
    dC = dC_heads.view(batch, seqlen, ngroups, heads_per_group, dstate).sum(3).to(C.dtype)
    dA = dA_partial.sum((0, 2)).to(A.dtype)
    dD = dD_partial.sum((0, 2, 3)).to(D.dtype) if D is not None else None
    dinitial = dinitial.to(initial_state.dtype) if initial_state is not None else None
    return dx, ddt, dA, dB, dC, dD, dinitial


class SSDChunkScanFn(torch.autograd.Function):
    """Autograd wrapper; saves only the inputs (chunk states are recomputed in backward).

    ``seq_idx`` is an integer input without a gradient.
    """

    @staticmethod
    def forward(ctx, x, dt, A, B, C, chunk_size, D, initial_state, seq_idx):
        y, final_state = _ssd_fwd(x, dt, A, B, C, chunk_size, D, initial_state, seq_idx)
        ctx.save_for_backward(x, dt, A, B, C, D, initial_state, seq_idx)
        ctx.chunk_size = chunk_size
        return y, final_state

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, dt, A, B, C, D, initial_state, seq_idx = ctx.saved_tensors
        dx, ddt, dA, dB, dC, dD, dinitial = _ssd_bwd(
            dy.contiguous(), dfinal.contiguous(), x, dt, A, B, C, ctx.chunk_size, D, initial_state, seq_idx
        )
        return dx, ddt, dA, dB, dC, None, dD, dinitial, None


def ssd_chunked_triton(
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
    """Chunked selective scan in Triton; same contract as ``model.ssd.ssd_chunked``.

    Args:
        x: (b, l, h, p) float32/bfloat16/float16; dt: (b, l, h) positive; A: (h,) negative;
        B, C: (b, l, g, n) with h % g == 0; D: (h,) or None; initial_state: (b, h, p, n) or None.
        seq_idx: (b, l) integer, non-decreasing document index of each token, or None (one document
            per row). No state passes from one document to the next; the initial state belongs to
            the first token's document.

    Returns:
        y: (b, l, h, p) in x's dtype; final_state: (b, h, p, n) float32.
    """
    batch, seqlen, nheads, headdim = x.shape
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"ssd_chunked_triton: x has dtype {x.dtype}, expected float32, bfloat16 or float16")
    if B.shape[:2] != (batch, seqlen) or C.shape != B.shape or nheads % B.shape[2] != 0:
        raise ValueError(
            f"ssd_chunked_triton: B and C must both be (b={batch}, l={seqlen}, g, n) with heads ({nheads}) "
            f"a multiple of g; got B {tuple(B.shape)}, C {tuple(C.shape)}"
        )
    if dt.shape != (batch, seqlen, nheads) or A.shape != (nheads,):
        raise ValueError(f"ssd_chunked_triton: dt must be {(batch, seqlen, nheads)} and A ({nheads},); "
                         f"got dt {tuple(dt.shape)}, A {tuple(A.shape)}")
    if seq_idx is not None and (seq_idx.shape != (batch, seqlen) or seq_idx.is_floating_point()):
        raise ValueError(f"ssd_chunked_triton: seq_idx must be integer {(batch, seqlen)}; "
                         f"got {seq_idx.dtype} {tuple(seq_idx.shape)}")
    x, dt, A, B, C = (t.contiguous() for t in (x, dt, A, B, C))
    D = D.contiguous() if D is not None else None
    initial_state = initial_state.contiguous() if initial_state is not None else None
    seq_idx = seq_idx.contiguous() if seq_idx is not None else None
    return SSDChunkScanFn.apply(x, dt, A, B, C, chunk_size, D, initial_state, seq_idx)
