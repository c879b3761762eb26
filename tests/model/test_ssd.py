"""The chunked SSD scan equals the per-token recurrence and has correct gradients."""

import pytest
import torch

from model.ssd import ssd_chunked, ssd_recurrent_step


def _inputs(batch, seqlen, nheads, headdim, ngroups, dstate, dtype, requires_grad=False):
    gen = torch.Generator().manual_seed(0)
    tensors = dict(
        x=torch.randn(batch, seqlen, nheads, headdim, generator=gen, dtype=dtype),
        dt=torch.rand(batch, seqlen, nheads, generator=gen, dtype=dtype) + 0.05,
        A=-torch.rand(nheads, generator=gen, dtype=dtype) * 2 - 0.1,
        B=torch.randn(batch, seqlen, ngroups, dstate, generator=gen, dtype=dtype),
        C=torch.randn(batch, seqlen, ngroups, dstate, generator=gen, dtype=dtype),
        D=torch.randn(nheads, generator=gen, dtype=dtype),
        initial_state=torch.randn(batch, nheads, headdim, dstate, generator=gen, dtype=dtype),
    )
    return {k: v.requires_grad_(requires_grad) for k, v in tensors.items()}


def _per_token(x, dt, A, B, C, D, initial_state, seq_idx=None):
    """The recurrence written out: h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, y_t = h_t C_t + D x_t;
    with seq_idx, h_{t-1} counts as 0 where t starts a new document."""
    heads_per_group = x.shape[2] // B.shape[2]
    B, C = B.repeat_interleave(heads_per_group, dim=2), C.repeat_interleave(heads_per_group, dim=2)  # (b, l, h, n)
    state, ys = initial_state.clone(), []
    for t in range(x.shape[1]):
        if seq_idx is not None and t > 0:
            state = state * (seq_idx[:, t] == seq_idx[:, t - 1]).to(state.dtype)[:, None, None, None]
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]  # (b, h, 1, 1)
        state = decay * state + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        y = torch.einsum("bhpn,bhn->bhp", state, C[:, t])
        ys.append(y if D is None else y + D[:, None] * x[:, t])
    return torch.stack(ys, dim=1), state


def test_decode_step_equals_the_recurrence():
    inputs = _inputs(2, 9, 4, 3, 2, 5, torch.float64)
    state = inputs["initial_state"].clone()
    ys = [ssd_recurrent_step(inputs["x"][:, t], inputs["dt"][:, t], inputs["A"], inputs["B"][:, t],
                             inputs["C"][:, t], state, inputs["D"]) for t in range(9)]
    y_ref, state_ref = _per_token(**inputs)
    torch.testing.assert_close(torch.stack(ys, dim=1), y_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(state, state_ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("seqlen,chunk_size", [(32, 8), (37, 8), (5, 16)])
def test_chunked_equals_per_token_recurrence(seqlen, chunk_size):
    inputs = _inputs(2, seqlen, 4, 3, 2, 5, torch.float64)
    y, final_state = ssd_chunked(**inputs, chunk_size=chunk_size)
    y_ref, state_ref = _per_token(**inputs)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(final_state, state_ref, rtol=0, atol=1e-10)


def test_zero_initial_state_and_no_skip():
    inputs = _inputs(1, 20, 2, 4, 1, 3, torch.float64)
    inputs["D"] = None
    y, _ = ssd_chunked(**{**inputs, "initial_state": None}, chunk_size=6)
    zero = torch.zeros_like(inputs["initial_state"])
    y_ref, _ = _per_token(**{**inputs, "initial_state": zero})
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-10)


def test_split_sequence_resumes_from_final_state():
    inputs = _inputs(1, 24, 2, 2, 1, 4, torch.float64)
    y_full, state_full = ssd_chunked(**inputs, chunk_size=8)
    first = {k: (v[:, :10] if v.dim() >= 3 and k != "initial_state" else v) for k, v in inputs.items()}
    second = {k: (v[:, 10:] if v.dim() >= 3 and k != "initial_state" else v) for k, v in inputs.items()}
    y1, mid_state = ssd_chunked(**first, chunk_size=8)
    y2, state2 = ssd_chunked(**{**second, "initial_state": mid_state}, chunk_size=8)
    torch.testing.assert_close(torch.cat([y1, y2], dim=1), y_full, rtol=0, atol=1e-10)
    torch.testing.assert_close(state2, state_full, rtol=0, atol=1e-10)


def test_low_precision_inputs_accumulate_in_float32():
    inputs = _inputs(1, 64, 2, 8, 1, 16, torch.float32)
    y32, state32 = ssd_chunked(**inputs, chunk_size=16)
    bf16 = {k: (v.bfloat16() if k in ("x", "B", "C") else v) for k, v in inputs.items()}
    y16, state16 = ssd_chunked(**bf16, chunk_size=16)
    assert y16.dtype == torch.bfloat16 and state16.dtype == torch.float32
    rel = (y16.float() - y32).norm() / y32.norm()
    assert rel < 2e-2, rel


def test_bf16_autocast_leaves_the_scan_in_float32():
    """Under bf16 autocast (how pretrain runs bf16) the scan still computes, and differentiates, in float32."""
    inputs = _inputs(1, 20, 2, 4, 1, 3, torch.float32, requires_grad=True)
    y, state = ssd_chunked(**inputs, chunk_size=8)
    want = torch.autograd.grad((y.sum(), state.sum()), list(inputs.values()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, state16 = ssd_chunked(**inputs, chunk_size=8)
    got = torch.autograd.grad((y16.sum(), state16.sum()), list(inputs.values()))
    assert torch.equal(y16, y) and torch.equal(state16, state)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_decays_below_the_smallest_float32_match_the_float64_recurrence():
    """Fast-decaying heads push exp(a_t - a_s) far below float32's smallest normal (the scan floors decays at eps**2)."""
    inputs = _inputs(1, 48, 2, 4, 1, 3, torch.float32)
    inputs["dt"] = inputs["dt"] * 4  # log-decay per token down to about -17, so -800 over a 48-token chunk
    inputs["A"] = torch.tensor([-4.0, -0.05])  # one fast head, one slow head
    leaves64 = {k: v.double().requires_grad_() for k, v in inputs.items()}
    leaves32 = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    y_ref, state_ref = _per_token(**leaves64)
    y, state = ssd_chunked(**leaves32, chunk_size=48)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state.double(), state_ref, rtol=1e-4, atol=1e-4)
    want = torch.autograd.grad((y_ref.sum(), state_ref.sum()), list(leaves64.values()))
    got = torch.autograd.grad((y.sum(), state.sum()), list(leaves32.values()))
    for name, a, b in zip(leaves32, got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-3, msg=f"gradient of {name}")


def test_gradcheck_float64():
    inputs = _inputs(1, 11, 2, 2, 1, 3, torch.float64, requires_grad=True)
    names = list(inputs)

    def scan(*tensors):
        return ssd_chunked(**dict(zip(names, tensors)), chunk_size=4)

    assert torch.autograd.gradcheck(scan, tuple(inputs.values()))


def test_heads_not_multiple_of_groups_is_rejected():
    inputs = _inputs(1, 8, 3, 2, 2, 3, torch.float32)
    with pytest.raises(ValueError, match="multiple of groups"):
        ssd_chunked(**inputs, chunk_size=4)


# Row 0: boundaries inside chunk 0 (at 3), two in chunk 1 (at 9 and 11); row 1: one on a chunk edge (at 8)
# and one in the ragged last chunk (at 17). Chunks of 4 and 8 tokens, 19 tokens.
DOCUMENTS = torch.tensor([[0] * 3 + [1] * 6 + [2] * 2 + [3] * 8,
                          [0] * 8 + [1] * 9 + [2] * 2])


@pytest.mark.parametrize("chunk_size", [4, 8])
def test_documents_reset_the_state(chunk_size):
    inputs = _inputs(2, 19, 4, 3, 2, 5, torch.float64)
    y, state = ssd_chunked(**inputs, chunk_size=chunk_size, seq_idx=DOCUMENTS)
    y_ref, state_ref = _per_token(**inputs, seq_idx=DOCUMENTS)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(state, state_ref, rtol=0, atol=1e-12)
    y_plain, _ = ssd_chunked(**inputs, chunk_size=chunk_size)
    assert (y_plain - y).abs().max() > 1e-3  # the boundaries change the result


def test_gradcheck_float64_with_documents():
    inputs = _inputs(2, 19, 2, 2, 1, 3, torch.float64, requires_grad=True)
    names = list(inputs)

    def scan(*tensors):
        return ssd_chunked(**dict(zip(names, tensors)), chunk_size=4, seq_idx=DOCUMENTS)

    assert torch.autograd.gradcheck(scan, tuple(inputs.values()))
