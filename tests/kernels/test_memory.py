"""The Triton memory read (model/kernels/memory.py) matches model/memory.py::memory_read."""

import pytest
import torch

from model.kernels.memory import memory_read_triton
from model.memory import memory_read


def _inputs(b, nc, c, m, h, d, dtype, seed=0):
    """q, k, v in ``dtype``; some slots empty, chunk 0 of batch 0 with no valid slot at all."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, nc, rows, h, d, generator=gen).to(dtype) for rows in (c, m, m))
    valid = torch.rand(b, nc, m, generator=gen) > 0.3
    valid[0, 0] = False
    return q, k, v, valid


def _run(read, q, k, v, valid, dout, cast, device):
    """Output and the gradients of <out, dout> w.r.t. q, k, v."""
    leaves = [(t.to(cast) if cast else t).to(device).clone().requires_grad_() for t in (q, k, v)]
    out = read(*leaves, valid.to(device))
    (out * dout.to(device, out.dtype)).sum().backward()
    return {"out": out, "dq": leaves[0].grad, "dk": leaves[1].grad, "dv": leaves[2].grad}


SHAPES = {
    # 70 slots = two slot tiles of 64 (online softmax across tiles), 20 queries (ragged query tile).
    "two_slot_tiles": dict(b=2, nc=2, c=20, m=70, h=2, d=8),
    # Decoding calls the read with one chunk of one token.
    "decode": dict(b=3, nc=1, c=1, m=12, h=4, d=16),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_read_matches_reference_forward_and_backward(shape, dtype, device, check_rule):
    q, k, v, valid = _inputs(**SHAPES[shape], dtype=dtype)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    truth = _run(memory_read, q, k, v, valid, dout, torch.float64, torch.device("cpu"))
    same_dtype = _run(memory_read, q, k, v, valid, dout, None, torch.device("cpu"))
    kernel = _run(memory_read_triton, q, k, v, valid, dout, None, device)
    for name in truth:
        assert kernel[name].dtype == dtype, name
        check_rule(name, kernel[name], same_dtype[name], truth[name])


def test_chunk_without_notes_reads_zeros_and_sends_no_gradient(device):
    q, k, v, valid = _inputs(1, 2, 5, 6, 2, 4, torch.float32)
    q, k, v = (t.to(device).requires_grad_() for t in (q, k, v))
    out = memory_read_triton(q, k, v, valid.to(device))
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert out[0, 0].abs().max() == 0 and out[0, 1].abs().max() > 0
    assert q.grad[0, 0].abs().max() == 0 and k.grad[0, 0].abs().max() == 0 and v.grad[0, 0].abs().max() == 0


def test_invalid_slots_are_ignored(device):
    """Changing the keys/values of empty slots changes nothing (the mask is applied, not just the weights)."""
    q, k, v, valid = _inputs(1, 2, 7, 9, 2, 4, torch.float32)
    garbage = (~valid)[..., None, None]
    out = memory_read_triton(*(t.to(device) for t in (q, k, v, valid)))
    out_garbage = memory_read_triton(*(t.to(device) for t in (q, k + 100 * garbage, v - 50 * garbage, valid)))
    torch.testing.assert_close(out, out_garbage, rtol=0, atol=0)


def test_bad_shapes_are_rejected(device):
    q, k, v, valid = _inputs(1, 2, 4, 6, 2, 4, torch.float32)
    with pytest.raises(ValueError, match="valid must be"):
        memory_read_triton(q.to(device), k.to(device), v.to(device), valid[..., :5].to(device))
