"""Fixtures for the kernel tests.

Without CUDA the top-level tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported, and
the kernels run on CPU tensors under Triton's interpreter; with CUDA they are compiled and run on
the GPU at the same shapes.

Tolerance rule (after mamba_ssm's test_layernorm_gated.py), for every output and gradient:
    max|kernel - truth| <= 2 * max|torch_same_dtype - truth| + atol,   atol = ATOL_ULPS[dtype] * eps(dtype) * max|truth|
where truth is the float64 reference on the same (already rounded) inputs and dtype is the
kernel output's. ATOL_ULPS:
- bfloat16: 1 ulp at the output's scale. Triton 3.9's interpreter casts float32 -> bfloat16 by
  truncation (the GPU rounds to nearest), so a bf16 kernel output can sit one ulp from torch's.
- float32: 16 ulps (2e-6 of the largest value). The kernels sum in another order and through
  other, algebraically equal formulas (dA = sum of dt times reverse cumsums of C.dC - dt x.r);
  the worst case seen over seeds was 6.4 ulps beyond twice torch's error, for dA. Scaling
  by 0.9 of one term of da (the chunk-end term) makes ddt miss this bound by a factor of 10^4.
"""

import os
from collections.abc import Callable

import pytest
import torch

ATOL_ULPS = {torch.float32: 16.0, torch.bfloat16: 1.0, torch.float16: 1.0}


@pytest.fixture(scope="session")
def device() -> torch.device:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("kernel tests need CUDA or TRITON_INTERPRET=1 (tests/conftest.py sets it without CUDA)")
    return torch.device("cuda")


def _check_rule(name: str, kernel: torch.Tensor, same_dtype: torch.Tensor, truth: torch.Tensor) -> None:
    """Assert the tolerance rule above for one tensor; the message gives all three numbers."""
    truth = truth.detach().double().cpu()
    kernel_err = (kernel.detach().double().cpu() - truth).abs().max().item()
    torch_err = (same_dtype.detach().double().cpu() - truth).abs().max().item()
    atol = ATOL_ULPS[kernel.dtype] * torch.finfo(kernel.dtype).eps * truth.abs().max().item()
    bound = 2 * torch_err + atol
    assert kernel_err <= bound, (
        f"{name}: kernel error {kernel_err:.3g} > 2 x torch error {torch_err:.3g} + atol {atol:.3g}"
    )


@pytest.fixture
def check_rule() -> Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor], None]:
    return _check_rule
