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
