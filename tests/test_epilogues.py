"""Fused epilogues: the Triton kernels (interpreter on CPU, CUDA where present) against the PyTorch definitions."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from locore_kernels import epilogues
from locore_kernels.epilogues import bias_gelu, bias_residual_layernorm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(3, 37), (2, 5, 100), (4, 1030), (1, 768)]  # odd sizes, a row wider than one GELU block


def _tol(dtype):
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_bias_gelu_triton_matches_torch(shape, dtype):
    g = torch.Generator().manual_seed(0)
    y = (torch.randn(shape, generator=g) * 3).to(DEVICE, dtype)
    b = torch.randn(shape[-1], generator=g).to(DEVICE, dtype)
    out = bias_gelu(y.clone(), b, backend="triton")  # y is consumed
    assert out.dtype == dtype and out.shape == y.shape
    ref = F.gelu(y.double() + b.double())  # exact erf GELU
    torch.testing.assert_close(out.double(), ref, **_tol(dtype))
    torch.testing.assert_close(out, bias_gelu(y.clone(), b, backend="torch"), **_tol(dtype))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_bias_residual_layernorm_triton_matches_torch(shape, dtype):
    g = torch.Generator().manual_seed(1)
    n = shape[-1]
    y, r = ((torch.randn(shape, generator=g) * 2 + 0.5).to(DEVICE, dtype) for _ in range(2))
    b, w, lb = (torch.randn(n, generator=g).to(DEVICE, dtype) for _ in range(3))
    out = bias_residual_layernorm(y.clone(), b, r, w, lb, 1e-5, backend="triton")
    assert out.dtype == dtype and out.shape == y.shape
    ref = F.layer_norm(y.double() + b.double() + r.double(), (n,), w.double(), lb.double(), 1e-5)
    torch.testing.assert_close(out.double(), ref, **_tol(dtype))
    torch.testing.assert_close(out, bias_residual_layernorm(y.clone(), b, r, w, lb, 1e-5, backend="torch"),
                               **_tol(dtype))


def test_in_place_on_strided_rows_and_empty_input():
    base = torch.randn(6, 40, device=DEVICE)
    y = base[::2, :33]  # row stride 80, not contiguous
    r = torch.randn(3, 33, device=DEVICE)
    b, w, lb = torch.randn(33, device=DEVICE), torch.randn(33, device=DEVICE), torch.randn(33, device=DEVICE)
    ref = F.gelu(y + b)
    out = bias_gelu(y, b, backend="triton")
    torch.testing.assert_close(out, ref)
    assert out.data_ptr() == y.data_ptr() and torch.equal(y, out)  # written over y, no new buffer
    y = base[1::2, 2:35]
    ref = F.layer_norm(y + b + r, (33,), w, lb, 1e-6)
    out = bias_residual_layernorm(y, b, r, w, lb, 1e-6, backend="triton")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert out.data_ptr() == y.data_ptr()
    empty = torch.empty(0, 33, device=DEVICE)
    assert bias_gelu(empty, b, backend="triton").shape == (0, 33)


def test_auto_backend_and_errors():
    y = torch.randn(2, 8)
    b = torch.randn(8)
    assert not epilogues._use_triton(None, y, b)  # CPU tensors: the PyTorch path unless forced
    with pytest.raises(ValueError, match="backend must be"):
        bias_gelu(y, b, backend="cuda")
    with pytest.raises(ValueError, match="bias must have shape"):
        bias_gelu(y, torch.randn(7))
    with pytest.raises(ValueError, match="residual shape"):
        bias_residual_layernorm(y, b, torch.randn(2, 7), b, b, 1e-5)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        bias_gelu(y.double(), b.double(), backend="triton")  # float64 has no Triton path
    # the PyTorch path keeps float64 in float64 and computes half precision in fp32
    assert bias_gelu(y.double(), b.double()).dtype == torch.float64
    assert torch.equal(bias_gelu(y.clone(), b, backend="torch"), F.gelu(y + b))
    torch.testing.assert_close(bias_gelu(y.bfloat16(), b.bfloat16()).float(),
                               F.gelu(y.bfloat16().float() + b.bfloat16().float()).bfloat16().float())
