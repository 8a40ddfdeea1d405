"""Fused GEMM epilogues: ``gelu(y + bias)`` and ``LayerNorm(y + bias + residual)``.

``y`` is the output of a bias-free matmul and is consumed: the Triton kernels read each row once and
write the result over it (no new allocation), instead of the three or four passes of separate
PyTorch ops; the PyTorch fallback, which defines the ops, also works in place where it can
(LayerNorm's output is a new tensor). Always use the returned tensor. Each op has a Triton kernel
(CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``); ``backend=None`` picks Triton for CUDA
tensors and PyTorch otherwise. Math in fp32 (fp64 stays fp64 on the PyTorch path), result in
``y``'s dtype. No model knowledge lives here.

Triton is imported only where a kernel can run (CUDA visible, or the interpreter on), so CPU-only
processes never pay for importing it.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .env import triton_interpreter_enabled as _interpreting

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


try:
    _TRITON = torch.cuda.is_available() or _interpreting()
    if _TRITON:
        import triton
        import triton.language as tl
except ImportError:  # pragma: no cover - a CUDA machine without triton: PyTorch path only
    _TRITON = False

if _TRITON:
    @triton.jit
    def _bias_gelu_kernel(Y, Bias, n_cols, stride_y, BLOCK: tl.constexpr):  # in place on Y
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n_cols
        x = tl.load(Y + row * stride_y + offs, mask=m, other=0.0).to(tl.float32)
        x += tl.load(Bias + offs, mask=m, other=0.0).to(tl.float32)
        out = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))  # exact (erf) GELU
        tl.store(Y + row * stride_y + offs, out.to(Y.dtype.element_ty), mask=m)

    @triton.jit
    def _bias_residual_layernorm_kernel(Y, Bias, Res, W, B, n_cols, stride_y, stride_r, eps,
                                        BLOCK: tl.constexpr):  # in place on Y: the row is loaded before the store
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        m = offs < n_cols
        x = tl.load(Y + row * stride_y + offs, mask=m, other=0.0).to(tl.float32)
        x += tl.load(Bias + offs, mask=m, other=0.0).to(tl.float32)
        x += tl.load(Res + row * stride_r + offs, mask=m, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=0) / n_cols
        xc = tl.where(m, x - mean, 0.0)
        var = tl.sum(xc * xc, axis=0) / n_cols
        out = xc * (1.0 / tl.sqrt(var + eps))
        out = out * tl.load(W + offs, mask=m, other=0.0).to(tl.float32) \
            + tl.load(B + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(Y + row * stride_y + offs, out.to(Y.dtype.element_ty), mask=m)


def _use_triton(backend: Optional[str], *tensors: Tensor) -> bool:
    if backend not in (None, "triton", "torch"):
        raise ValueError(f"epilogue backend must be 'triton', 'torch' or None, got {backend!r}")
    if backend == "torch":
        return False
    ok = _TRITON and all(t.dtype in _TRITON_DTYPES for t in tensors) and \
        all(t.is_cuda or _interpreting() for t in tensors)
    if backend == "triton" and not ok:
        raise ValueError("epilogue backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1) "
                         f"of dtype {_TRITON_DTYPES}")
    return ok if backend == "triton" else ok and tensors[0].is_cuda


def _rows(x: Tensor, n: int) -> Tensor:
    x = x.reshape(-1, n)
    return x if x.stride(-1) == 1 else x.contiguous()


def bias_gelu(y: Tensor, bias: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """gelu(y + bias) with the exact erf GELU; y [..., n] (consumed), bias [n]."""
    n = y.shape[-1]
    if bias.shape != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    if not _use_triton(backend, y, bias):
        if y.dtype in (torch.float16, torch.bfloat16):
            return F.gelu(y.float() + bias.float()).to(y.dtype)
        return torch.ops.aten.gelu_(y.add_(bias))
    y2 = _rows(y, n)
    if y2.shape[0]:
        block = min(1024, triton.next_power_of_2(n))
        _bias_gelu_kernel[(y2.shape[0], triton.cdiv(n, block))](
            y2, bias.contiguous(), n, y2.stride(0), BLOCK=block)
    return y2.view(y.shape)


def bias_residual_layernorm(y: Tensor, bias: Tensor, residual: Tensor, weight: Tensor, ln_bias: Tensor,
                            eps: float, *, backend: Optional[str] = None) -> Tensor:
    """LayerNorm(y + bias + residual) * weight + ln_bias over the last dim; y (consumed), residual [..., n]."""
    n = y.shape[-1]
    if residual.shape != y.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} differs from y {tuple(y.shape)}")
    for name, t in (("bias", bias), ("weight", weight), ("ln_bias", ln_bias)):
        if t.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
    if not _use_triton(backend, y, bias, residual, weight, ln_bias):
        if y.dtype in (torch.float16, torch.bfloat16):
            x = y.float() + bias.float() + residual.float()
            return F.layer_norm(x, (n,), weight.float(), ln_bias.float(), eps).to(y.dtype)
        return F.layer_norm(y.add_(residual).add_(bias), (n,), weight, ln_bias, eps)
    y2, r2 = _rows(y, n), _rows(residual, n)
    if y2.shape[0]:
        block = triton.next_power_of_2(n)
        _bias_residual_layernorm_kernel[(y2.shape[0],)](
            y2, bias.contiguous(), r2, weight.contiguous(), ln_bias.contiguous(), n,
            y2.stride(0), r2.stride(0), float(eps), BLOCK=block,
            num_warps=4 if block <= 2048 else 8)
    return y2.view(y.shape)
