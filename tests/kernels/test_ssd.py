"""The Triton SSD scan (model/kernels/ssd.py) matches the reference model/ssd.py, forward and backward."""

import pytest
import torch

from model.kernels.ssd import ssd_chunked_triton
from model.ssd import ssd_chunked

GRAD_INPUTS = ("x", "dt", "A", "B", "C", "D", "initial_state")


def _inputs(shape: dict, dtype: torch.dtype, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Scan inputs as the mixer passes them: x, B, C in ``dtype``; dt, A, D, initial_state float32."""
    b, l, h, p, g, n = (shape[k] for k in "blhpgn")
    gen = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(b, l, h, p, generator=gen).to(dtype),
        dt=torch.rand(b, l, h, generator=gen) * 0.5 + 0.02,
        A=-(torch.rand(h, generator=gen) * 2 + 0.1),
        B=torch.randn(b, l, g, n, generator=gen).to(dtype),
        C=torch.randn(b, l, g, n, generator=gen).to(dtype),
        D=torch.randn(h, generator=gen),
        initial_state=torch.randn(b, h, p, n, generator=gen),
    )


def _run(scan, inputs: dict, cast: torch.dtype | None, device: torch.device, dy: torch.Tensor, dfinal: torch.Tensor,
         chunk_size: int, seq_idx: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """y, final state and the gradients of <y, dy> + <final, dfinal> w.r.t. every input."""
    leaves = {k: (v.to(cast) if cast else v).to(device).clone().requires_grad_() for k, v in inputs.items()}
    seq_idx = seq_idx.to(device) if seq_idx is not None else None
    y, final = scan(**leaves, chunk_size=chunk_size, seq_idx=seq_idx)
    ((y * dy.to(device, y.dtype)).sum() + (final * dfinal.to(device, final.dtype)).sum()).backward()
    return {"y": y, "final_state": final, **{f"d{k}": leaves[k].grad for k in GRAD_INPUTS}}


SHAPES = {
    # One head group, a ragged last chunk (40 = 2 x 16 + 8), head dim and state dim below the 16-wide tiles.
    "ragged": dict(b=1, l=40, h=2, p=8, g=1, n=4, chunk=16),
    # ngroups > 1 (two heads per group), batch 2, chunk not a power of two, ragged (50 = 2 x 24 + 2).
    "groups": dict(b=2, l=50, h=4, p=4, g=2, n=8, chunk=24),
    # A chunk longer than one position tile (64 forward, 32 backward): the tile loops inside a chunk run.
    "long_chunk": dict(b=1, l=100, h=2, p=4, g=1, n=4, chunk=80),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_scan_matches_reference_forward_and_backward(shape, dtype, device, check_rule):
    _compare_with_reference(SHAPES[shape], dtype, device, check_rule)


def _compare_with_reference(shape: dict, dtype, device, check_rule, seq_idx=None) -> None:
    """Outputs, final state and every gradient of the kernel against the reference (check_rule)."""
    inputs = _inputs(shape, dtype, device)
    gen = torch.Generator().manual_seed(1)
    dy = torch.randn(*inputs["x"].shape, generator=gen).to(dtype)
    dfinal = torch.randn(*inputs["initial_state"].shape, generator=gen)
    args = dict(dy=dy, dfinal=dfinal, chunk_size=shape["chunk"], seq_idx=seq_idx)
    truth = _run(ssd_chunked, inputs, torch.float64, torch.device("cpu"), **args)
    same_dtype = _run(ssd_chunked, inputs, None, torch.device("cpu"), **args)
    kernel = _run(ssd_chunked_triton, inputs, None, device, **args)
    for name in truth:
        assert kernel[name].dtype == same_dtype[name].dtype, name
        check_rule(name, kernel[name], same_dtype[name], truth[name])


# Document starts per row at l = 40, chunk 16 (chunks 0-15, 16-31 and a ragged 32-39). Row 0: a boundary
# inside chunk 0 (the initial state reaches tokens 0-4 only, the state leaving the chunk holds 5-15 only),
# one exactly on the edge of chunk 1 (no state enters that document) and one inside the ragged last chunk.
# Row 1: chunk 0 is one document (while row 0 crosses it), chunk 1 starts on its edge and has a boundary
# on its last token (the state leaving it holds that token alone), and the ragged chunk has one more.
DOC_STARTS = ((0, 5, 16, 35), (0, 16, 31, 38))
DOC_SHAPE = dict(b=2, l=40, h=4, p=4, g=2, n=4, chunk=16)


def _seq_idx(starts_per_row: tuple[tuple[int, ...], ...], seqlen: int) -> torch.Tensor:
    """(b, l) int64 document index of each token, from the first position of each document."""
    starts = torch.zeros(len(starts_per_row), seqlen, dtype=torch.int64)
    for row, row_starts in enumerate(starts_per_row):
        starts[row, list(row_starts[1:])] = 1
    return starts.cumsum(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("documents", [False, True], ids=["seq_idx_none", "seq_idx"])
def test_scan_with_documents_matches_reference(documents, dtype, device, check_rule):
    """seq_idx: outputs, final state and every gradient match the reference; seq_idx=None still does."""
    seq_idx = _seq_idx(DOC_STARTS, DOC_SHAPE["l"]) if documents else None
    _compare_with_reference(DOC_SHAPE, dtype, device, check_rule, seq_idx)


def test_no_gradient_crosses_a_document_boundary(device):
    """A loss on the last document of each row (its outputs and the final state) has exactly zero
    gradient w.r.t. every token of the earlier documents and w.r.t. the initial state."""
    inputs = _inputs(DOC_SHAPE, torch.float32, device)
    seq_idx = _seq_idx(DOC_STARTS, DOC_SHAPE["l"])
    in_last = seq_idx == seq_idx[:, -1:]  # (b, l)
    gen = torch.Generator().manual_seed(1)
    dy = torch.randn(*inputs["x"].shape, generator=gen) * in_last[..., None, None]
    dfinal = torch.randn(*inputs["initial_state"].shape, generator=gen)
    grads = _run(ssd_chunked_triton, inputs, None, device, dy=dy, dfinal=dfinal, chunk_size=DOC_SHAPE["chunk"],
                 seq_idx=seq_idx)
    earlier = ~in_last.to(device)
    for name in ("dx", "ddt", "dB", "dC"):
        assert grads[name][earlier].abs().max().item() == 0.0, name
        assert grads[name][~earlier].abs().max().item() > 0.0, name
    assert grads["dinitial_state"].abs().max().item() == 0.0


def test_scan_without_skip_or_initial_state(device):
    """D = None and initial_state = None take their own kernel branches; compare in float32."""
    inputs = _inputs(dict(b=1, l=33, h=2, p=4, g=2, n=4), torch.float32, device)
    inputs = {k: v.to(device).requires_grad_() for k, v in inputs.items() if k not in ("D", "initial_state")}
    y, final = ssd_chunked_triton(**inputs, chunk_size=16)
    (y.square().sum() + final.sum()).backward()
    ref = {k: v.detach().cpu().double().requires_grad_() for k, v in inputs.items()}
    y_ref, final_ref = ssd_chunked(**ref, chunk_size=16)
    (y_ref.square().sum() + final_ref.sum()).backward()
    torch.testing.assert_close(y.double().cpu(), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final.double().cpu(), final_ref, rtol=1e-5, atol=1e-5)
    for k in inputs:
        torch.testing.assert_close(inputs[k].grad.double().cpu(), ref[k].grad, rtol=1e-4, atol=1e-4, msg=k)


def test_rule_rejects_a_small_error(device, check_rule):
    """Negative control: a 0.1% error in any one output or gradient breaks the float32 tolerance rule."""
    shape = SHAPES["ragged"]
    inputs = _inputs(shape, torch.float32, device)
    gen = torch.Generator().manual_seed(1)
    args = dict(dy=torch.randn(*inputs["x"].shape, generator=gen),
                dfinal=torch.randn(*inputs["initial_state"].shape, generator=gen), chunk_size=shape["chunk"])
    truth = _run(ssd_chunked, inputs, torch.float64, torch.device("cpu"), **args)
    same_dtype = _run(ssd_chunked, inputs, None, torch.device("cpu"), **args)
    kernel = _run(ssd_chunked_triton, inputs, None, device, **args)
    for name in truth:
        check_rule(name, kernel[name], same_dtype[name], truth[name])
        with pytest.raises(AssertionError, match=name):
            check_rule(name, kernel[name] * 1.001, same_dtype[name], truth[name])


def test_bad_shapes_are_rejected(device):
    inputs = _inputs(dict(b=1, l=8, h=3, p=4, g=2, n=4), torch.float32, device)
    with pytest.raises(ValueError, match="multiple of g"):
        ssd_chunked_triton(**inputs, chunk_size=4)


@pytest.mark.gpu
def test_scan_matches_mamba_ssm():
    """Cross-check with mamba_ssm's mamba_chunk_scan_combined (optional GPU extra)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    mamba_ssd = pytest.importorskip("mamba_ssm.ops.triton.ssd_combined", reason="mamba_ssm (GPU extra) not installed")
    shape = dict(b=2, l=300, h=4, p=64, g=2, n=64)
    inputs = {k: v.cuda() for k, v in _inputs(shape, torch.float32, torch.device("cuda")).items()}
    y, final = ssd_chunked_triton(**inputs, chunk_size=64)
    y_m, final_m = mamba_ssd.mamba_chunk_scan_combined(
        inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"], chunk_size=64, D=inputs["D"],
        initial_states=inputs["initial_state"], return_final_states=True,
    )
    # mamba_ssm multiplies in TF32 by default; ours is exact in float32, so compare at TF32 precision.
    torch.testing.assert_close(y, y_m, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(final, final_m.float(), rtol=1e-2, atol=1e-2)
