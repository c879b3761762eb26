"""The depthwise causal conv of the mixer (model/mamba2.py) equals torch's Conv1d and has exact gradients."""

import pytest
import torch
import torch.nn.functional as F

from model.mamba2 import CausalConv1d, causal_conv1d


@pytest.mark.parametrize("seqlen", [37, 2])  # 2: shorter than the kernel
def test_equals_torch_conv1d_forward_and_backward(seqlen: int) -> None:
    torch.manual_seed(0)
    conv = CausalConv1d(12, 4)
    x = torch.randn(2, seqlen, 12, requires_grad=True)
    grad = torch.randn(2, seqlen, 12)
    ours = conv(x)
    # What HF Mamba2 computes: Conv1d over (B, C, L) with left padding, cut to L.
    ref = F.conv1d(x.transpose(1, 2), conv.weight, conv.bias, padding=3, groups=12)[..., :seqlen].transpose(1, 2)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    params = (x, conv.weight, conv.bias)
    for a, b in zip(torch.autograd.grad(ours, params, grad), torch.autograd.grad(ref, params, grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_gradcheck_float64() -> None:
    gen = torch.Generator().manual_seed(0)
    inputs = (torch.randn(2, 6, 3, generator=gen), torch.randn(3, 4, generator=gen), torch.randn(3, generator=gen))
    assert torch.autograd.gradcheck(causal_conv1d, tuple(t.double().requires_grad_() for t in inputs))


def test_documents_are_convolved_apart() -> None:
    """With seq_idx, each document's conv equals that document convolved alone (gradients included)."""
    gen = torch.Generator().manual_seed(0)
    conv = CausalConv1d(3, 4)
    x = torch.randn(1, 11, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    seq_idx = torch.tensor([[0] * 2 + [1] * 6 + [2] * 3])  # a document shorter than the kernel
    conv.double()
    packed = conv(x, seq_idx)
    alone = torch.cat([conv(x[:, a:b]) for a, b in ((0, 2), (2, 8), (8, 11))], dim=1)
    torch.testing.assert_close(packed, alone, rtol=0, atol=0)
    grad = torch.randn(packed.shape, generator=gen, dtype=torch.float64)
    params = (x, conv.weight, conv.bias)
    for a, b in zip(torch.autograd.grad(packed, params, grad), torch.autograd.grad(alone, params, grad)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    weight = conv.weight[:, 0].detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda *t: causal_conv1d(*t, seq_idx), (x, weight, conv.bias))
