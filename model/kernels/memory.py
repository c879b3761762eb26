"""Triton kernels for the memory read: block-sparse attention of each chunk's tokens over its pool.

The reference is ``model/memory.py::memory_read``; ``memory_read_triton`` has the same signature
and returns the same values. Chunk r (of b * nc) has c query tokens and m note slots of its own
(the notes visible to it, already gathered), so the attention is dense inside a chunk and absent
between chunks: the cost is O(L * m), never O(L^2). Per chunk, head and query i:

    s_ij = q_i . k_j / sqrt(d)  for valid slots j (else -inf)
    o_i  = sum_j softmax_j(s_ij) v_j,  o_i = 0 when the chunk has no valid slot

Forward is flash-attention style (online softmax over slot blocks, float32 statistics) and keeps
lse_i = log sum_j exp(s_ij) (+inf for a chunk with no valid slot, which makes every probability
exp(s - lse) exactly 0 in the backward). Backward, with delta_i = do_i . o_i:

    p_ij = exp(s_ij - lse_i);  dv_j = sum_i p_ij do_i;  ds_ij = p_ij (do_i . v_j - delta_i)
    dq_i = sum_j ds_ij k_j / sqrt(d);  dk_j = sum_i ds_ij q_i / sqrt(d)

dk/dv (loop over queries) and dq (loop over slots) are separate kernels: no atomics, deterministic.
All arithmetic accumulates in float32; fp32 inputs use exact ("ieee") dots, bf16/fp16 TF32 dots.
"""

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _load_rows(ptr, rows, nrows, nheads, head, cols, ncols):
    """(len(rows), len(cols)) float32 block of a (..., nrows, nheads, ncols) tensor at one head; 0 outside."""
    offsets = (rows[:, None] * nheads + head) * ncols + cols[None, :]
    return tl.load(ptr + offsets, mask=(rows[:, None] < nrows) & (cols[None, :] < ncols), other=0.0).to(tl.float32)


@triton.jit
def _memory_read_fwd_kernel(
    q_ptr, k_ptr, v_ptr, valid_ptr, out_ptr, lse_ptr,
    queries, slots, nheads, headdim, scale,
    DOT_PRECISION: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Output rows and lse for a block of queries of one chunk and head."""
    chunk = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    i = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    e = tl.arange(0, BLOCK_D)
    q_chunk = q_ptr + chunk * queries * nheads * headdim
    kv_offset = chunk * slots * nheads * headdim
    q = _load_rows(q_chunk, i, queries, nheads, head, e, headdim) * scale
    row_max = tl.full((BLOCK_C,), float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_C,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.float32)
    for j0 in range(0, slots, BLOCK_M):
        j = j0 + tl.arange(0, BLOCK_M)
        ok = tl.load(valid_ptr + chunk * slots + j, mask=j < slots, other=0) != 0
        k = _load_rows(k_ptr + kv_offset, j, slots, nheads, head, e, headdim)
        v = _load_rows(v_ptr + kv_offset, j, slots, nheads, head, e, headdim)
        s = tl.where(ok[None, :], tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION), float("-inf"))
        new_max = tl.maximum(row_max, tl.max(s, axis=1))
        # While a row has seen no valid slot its max stays -inf; shift by 0 then so that exp gives 0, not NaN.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        p = tl.exp(s - shift[:, None])
        rescale = tl.exp(row_max - shift)
        row_sum = row_sum * rescale + tl.sum(p, axis=1)
        acc = acc * rescale[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
        row_max = new_max
    has_slot = row_sum > 0
    safe_sum = tl.where(has_slot, row_sum, 1.0)
    out = tl.where(has_slot[:, None], acc / safe_sum[:, None], 0.0)
    offsets = (i[:, None] * nheads + head) * headdim + e[None, :]
    mask = (i[:, None] < queries) & (e[None, :] < headdim)
    tl.store(out_ptr + chunk * queries * nheads * headdim + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)
    lse = tl.where(has_slot, row_max + tl.log(safe_sum), float("inf"))
    tl.store(lse_ptr + (chunk * queries + i) * nheads + head, lse, mask=i < queries)


@triton.jit
def _memory_read_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, valid_ptr, dout_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    queries, slots, nheads, headdim, scale,
    DOT_PRECISION: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dk, dv for a block of slots of one chunk and head (loops over the chunk's queries)."""
    chunk = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    j = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    e = tl.arange(0, BLOCK_D)
    q_chunk = q_ptr + chunk * queries * nheads * headdim
    dout_chunk = dout_ptr + chunk * queries * nheads * headdim
    kv_offset = chunk * slots * nheads * headdim
    ok = tl.load(valid_ptr + chunk * slots + j, mask=j < slots, other=0) != 0
    k = _load_rows(k_ptr + kv_offset, j, slots, nheads, head, e, headdim)
    v = _load_rows(v_ptr + kv_offset, j, slots, nheads, head, e, headdim)
    dk = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for i0 in range(0, queries, BLOCK_C):
        i = i0 + tl.arange(0, BLOCK_C)
        q = _load_rows(q_chunk, i, queries, nheads, head, e, headdim)
        dout = _load_rows(dout_chunk, i, queries, nheads, head, e, headdim)
        lse = tl.load(lse_ptr + (chunk * queries + i) * nheads + head, mask=i < queries, other=float("inf"))
        delta = tl.load(delta_ptr + (chunk * queries + i) * nheads + head, mask=i < queries, other=0.0)
        s = tl.where(ok[None, :], tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale, float("-inf"))
        p = tl.exp(s - lse[:, None])  # (C, M)
        dv += tl.dot(tl.trans(p), dout, input_precision=DOT_PRECISION)
        ds = p * (tl.dot(dout, tl.trans(v), input_precision=DOT_PRECISION) - delta[:, None])
        dk += tl.dot(tl.trans(ds), q, input_precision=DOT_PRECISION)
    offsets = kv_offset + (j[:, None] * nheads + head) * headdim + e[None, :]
    mask = (j[:, None] < slots) & (e[None, :] < headdim)
    tl.store(dk_ptr + offsets, (dk * scale).to(dk_ptr.dtype.element_ty), mask=mask)
    tl.store(dv_ptr + offsets, dv.to(dv_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _memory_read_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, valid_ptr, dout_ptr, lse_ptr, delta_ptr, dq_ptr,
    queries, slots, nheads, headdim, scale,
    DOT_PRECISION: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dq for a block of queries of one chunk and head (loops over the chunk's slots)."""
    chunk = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    i = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    e = tl.arange(0, BLOCK_D)
    q_offset = chunk * queries * nheads * headdim
    kv_offset = chunk * slots * nheads * headdim
    q = _load_rows(q_ptr + q_offset, i, queries, nheads, head, e, headdim)
    dout = _load_rows(dout_ptr + q_offset, i, queries, nheads, head, e, headdim)
    lse = tl.load(lse_ptr + (chunk * queries + i) * nheads + head, mask=i < queries, other=float("inf"))
    delta = tl.load(delta_ptr + (chunk * queries + i) * nheads + head, mask=i < queries, other=0.0)
    dq = tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.float32)
    for j0 in range(0, slots, BLOCK_M):
        j = j0 + tl.arange(0, BLOCK_M)
        ok = tl.load(valid_ptr + chunk * slots + j, mask=j < slots, other=0) != 0
        k = _load_rows(k_ptr + kv_offset, j, slots, nheads, head, e, headdim)
        v = _load_rows(v_ptr + kv_offset, j, slots, nheads, head, e, headdim)
        s = tl.where(ok[None, :], tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale, float("-inf"))
        p = tl.exp(s - lse[:, None])
        ds = p * (tl.dot(dout, tl.trans(v), input_precision=DOT_PRECISION) - delta[:, None])
        dq += tl.dot(ds, k, input_precision=DOT_PRECISION)
    offsets = q_offset + (i[:, None] * nheads + head) * headdim + e[None, :]
    mask = (i[:, None] < queries) & (e[None, :] < headdim)
    tl.store(dq_ptr + offsets, (dq * scale).to(dq_ptr.dtype.element_ty), mask=mask)


def _launch_args(q: torch.Tensor, k: torch.Tensor) -> tuple[tuple, dict]:
    """Shared scalar arguments and tile sizes (tl.dot needs tiles >= 16)."""
    queries, nheads, headdim = q.shape[2:]
    slots = k.shape[2]
    scalars = (queries, slots, nheads, headdim, 1.0 / math.sqrt(headdim))
    blocks = dict(
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        BLOCK_C=min(64, max(16, triton.next_power_of_2(queries))),
        BLOCK_M=min(64, max(16, triton.next_power_of_2(slots))),
        BLOCK_D=max(16, triton.next_power_of_2(headdim)),
    )
    return scalars, blocks


def _memory_read_fwd(q, k, v, valid):
    """Output (b, nc, c, h, d) in q's dtype and lse (b, nc, c, h) float32."""
    batch, nchunks, queries, nheads, _ = q.shape
    scalars, blocks = _launch_args(q, k)
    out = torch.empty_like(q)
    lse = torch.empty(batch, nchunks, queries, nheads, device=q.device, dtype=torch.float32)
    grid = (batch * nchunks, nheads, triton.cdiv(queries, blocks["BLOCK_C"]))
    _memory_read_fwd_kernel[grid](q, k, v, valid, out, lse, *scalars, **blocks)
    return out, lse


def _memory_read_bwd(dout, q, k, v, valid, out, lse):
    """Gradients (dq, dk, dv), each in its input's dtype."""
    batch, nchunks, queries, nheads, _ = q.shape
    scalars, blocks = _launch_args(q, k)
    delta = (dout.float() * out.float()).sum(-1).contiguous()  # (b, nc, c, h)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    grid = (batch * nchunks, nheads, triton.cdiv(k.shape[2], blocks["BLOCK_M"]))
    _memory_read_bwd_dkdv_kernel[grid](q, k, v, valid, dout, lse, delta, dk, dv, *scalars, **blocks)
    grid = (batch * nchunks, nheads, triton.cdiv(queries, blocks["BLOCK_C"]))
    _memory_read_bwd_dq_kernel[grid](q, k, v, valid, dout, lse, delta, dq, *scalars, **blocks)
    return dq, dk, dv


class MemoryReadFn(torch.autograd.Function):
    """Autograd wrapper; saves the inputs, the output and lse (all O(L * d) or O(L))."""

    @staticmethod
    def forward(ctx, q, k, v, valid):
        out, lse = _memory_read_fwd(q, k, v, valid)
        ctx.save_for_backward(q, k, v, valid, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, valid, out, lse = ctx.saved_tensors
        dq, dk, dv = _memory_read_bwd(dout.contiguous(), q, k, v, valid, out, lse)
        return dq, dk, dv, None


def memory_read_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Multi-head attention of each chunk's tokens over that chunk's visible notes, in Triton.

    Same contract as ``model.memory.memory_read``.

    Args:
        q: (b, nc, c, h, d) queries; k, v: (b, nc, m, h, d) keys/values of each chunk's m slots;
        valid: (b, nc, m) bool, False for empty slots.

    Returns:
        (b, nc, c, h, d) in q's dtype; all zeros for a chunk with no valid slot.
    """
    batch, nchunks, _, nheads, headdim = q.shape
    if k.shape != v.shape or k.shape[:2] != (batch, nchunks) or k.shape[3:] != (nheads, headdim):
        raise ValueError(f"memory_read_triton: k and v must be (b={batch}, nc={nchunks}, m, h={nheads}, "
                         f"d={headdim}); got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if valid.shape != k.shape[:3]:
        raise ValueError(f"memory_read_triton: valid must be {tuple(k.shape[:3])}, got {tuple(valid.shape)}")
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"memory_read_triton: q has dtype {q.dtype}, expected float32, bfloat16 or float16")
    q, k, v = (t.contiguous() for t in (q, k, v))
    return MemoryReadFn.apply(q, k, v, valid.to(torch.int8).contiguous())
