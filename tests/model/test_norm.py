"""rms_norm (model/mamba2.py) equals the formula autograd differentiates, block by block, and gradchecks."""

import pytest
import torch
import torch.nn.functional as F

from model.mamba2 import _RMSNorm, rms_norm


def _formula(x, weight, group_size, eps, gate=None):
    """The norm written out (HF's Mamba2RMSNorm / MambaRMSNormGated), differentiated by autograd."""
    h = x.float() if gate is None else x.float() * F.silu(gate.float())
    grouped = h.view(*h.shape[:-1], -1, group_size)
    normed = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.view(h.shape).to(x.dtype)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("group_size", [12, 4])
def test_equals_the_formula_over_several_blocks(gated: bool, group_size: int, monkeypatch) -> None:
    monkeypatch.setattr(_RMSNorm, "BLOCK_ELEMENTS", 5 * 12)  # blocks of 5 tokens, the last one ragged
    gen = torch.Generator().manual_seed(0)
    x, gate = (torch.randn(2, 13, 12, generator=gen, requires_grad=True) for _ in range(2))
    weight = (torch.rand(12, generator=gen) + 0.5).requires_grad_()
    grad = torch.randn(2, 13, 12, generator=gen)
    ours = rms_norm(x, weight, group_size, 1e-5, gate=gate if gated else None)
    ref = _formula(x, weight, group_size, 1e-5, gate=gate if gated else None)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    inputs = (x, weight, gate) if gated else (x, weight)
    for a, b in zip(torch.autograd.grad(ours, inputs, grad), torch.autograd.grad(ref, inputs, grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_gradcheck_float64() -> None:
    gen = torch.Generator().manual_seed(1)
    x, gate = (torch.randn(3, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    weight = torch.randn(8, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: rms_norm(t[0], t[1], 4, 1e-5, gate=t[2]), (x, weight, gate))
    assert torch.autograd.gradcheck(lambda *t: rms_norm(t[0], t[1], 8, 1e-5), (x, weight))


def test_bf16_input_is_normalised_in_float32_like_hf() -> None:
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    weight = torch.rand(16) + 0.5
    out = rms_norm(x, weight, 16, 1e-5)
    assert out.dtype == torch.float32  # weight float32 times the bf16-cast normalised x, as HF
    torch.testing.assert_close(out, _formula(x, weight, 16, 1e-5), rtol=0, atol=0)
