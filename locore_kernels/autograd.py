"""Differentiable Longformer attention for training: autograd over the C++ and Triton kernels.

The forward runs the backend's kernel and also keeps the per-row log-sum-exp ``lse`` [B, H, N]; the
backward recomputes the probabilities tile by tile from q, k, v, the global projections, the output
and ``lse`` (flash-attention style). Saved state is O(N * H * D); nothing O(N^2) is ever built, unlike
the dense reference's autograd (which saves [B, H, N, N] probabilities twice per call).

    out = longformer_attention(q, k, v, q_global, k_global, v_global, is_global=..., key_padding=...,
                               one_sided_window=w, backend="cpu")    # differentiable
    out.sum().backward()

backend: "cpu" (C++, float32 or float64), "triton" (CUDA; CPU tensors under TRITON_INTERPRET=1),
"reference" (dense PyTorch autograd, any float dtype), None = the best for the device.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .layout import AttentionLayout, build_layout, scatter_global
from .backends import TRITON_HEAD_DIMS
from .env import triton_interpreter_enabled
from .ops import _check_layout, _check_projections, resolve_backend
from .reference import longformer_attention_reference


def _trainable_backend(backend: Optional[str], q: Tensor) -> str:
    """The backend a training call runs: the kernels' backward takes float32/float64 on CPU (float64 for
    gradcheck, which the inference registry does not list) and the registry's choice elsewhere."""
    if backend is None:
        if q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64):
            return "cpu"
        return resolve_backend(None, q.device, q.dtype, q.shape[-1])
    if backend not in ("cpu", "triton", "reference"):
        resolve_backend(backend, q.device, q.dtype, q.shape[-1])  # raises, naming the backends
    return backend


def _check_trainable_backend(backend: str, q: Tensor) -> None:
    if backend == "cpu":
        if q.device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got device {q.device}")
        if q.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"backend='cpu' trains in float32 or float64, got {q.dtype}")
    elif backend == "triton":
        if q.device.type != "cuda" and not triton_interpreter_enabled():
            raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
        if q.shape[-1] not in TRITON_HEAD_DIMS:
            raise ValueError(f"backend='triton' supports head dim D in {TRITON_HEAD_DIMS}, got D={q.shape[-1]}")
        if q.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise ValueError(f"backend='triton' supports float16/bfloat16/float32/float64, got {q.dtype}")


def _forward_with_lse(backend: str, inputs: tuple[Tensor, ...], layout: AttentionLayout) -> tuple[Tensor, Tensor]:
    if backend == "cpu":
        from .cpu_backward import cpu_attention_with_lse
        return cpu_attention_with_lse(*inputs, layout)
    from .triton_backward import triton_attention_with_lse
    return triton_attention_with_lse(*inputs, layout)


def _backward(backend: str, saved: tuple[Tensor, ...], grad_out: Tensor, layout: AttentionLayout):
    if backend == "cpu":
        from .cpu_backward import cpu_attention_backward
        return cpu_attention_backward(*saved, grad_out, layout)
    from .triton_backward import triton_attention_backward
    return triton_attention_backward(*saved, grad_out, layout)


class LongformerAttentionFunction(torch.autograd.Function):
    """Autograd node over a kernel backend: inputs (q, k, v, q_global_gathered, k_global, v_global),
    then the layout and the backend name (not differentiable)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, q_global_gathered: Tensor, k_global: Tensor,
                v_global: Tensor, layout: AttentionLayout, backend: str) -> Tensor:
        inputs = tuple(t.contiguous() for t in (q, k, v, q_global_gathered, k_global, v_global))
        out, lse = _forward_with_lse(backend, inputs, layout)
        ctx.save_for_backward(*inputs, out, lse)
        ctx.layout = layout
        ctx.backend = backend
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grads = _backward(ctx.backend, ctx.saved_tensors, grad_out.contiguous(), ctx.layout)
        return (*grads, None, None)


def attention_with_layout_trainable(
    q: Tensor, k: Tensor, v: Tensor,
    q_global_gathered: Tensor, k_global: Tensor, v_global: Tensor,
    layout: AttentionLayout, *, backend: Optional[str] = None, validate: bool = True,
) -> Tensor:
    """Differentiable ``ops.attention_with_layout`` (same arguments): the model's training entry."""
    backend = _trainable_backend(backend, q)
    if validate:
        _check_projections({"q": q, "k": k, "v": v, "q_global": q_global_gathered,
                            "k_global": k_global, "v_global": v_global},
                           n_rows={"q_global": layout.max_global})
        _check_layout(q, layout)
        _check_trainable_backend(backend, q)
    if backend == "reference":
        return longformer_attention_reference(q, k, v, scatter_global(layout, q_global_gathered), k_global,
                                              v_global, layout.is_global, layout.key_padding,
                                              layout.one_sided_window)
    return LongformerAttentionFunction.apply(q, k, v, q_global_gathered, k_global, v_global, layout, backend)


def longformer_attention(
    q: Tensor, k: Tensor, v: Tensor,
    q_global: Tensor, k_global: Tensor, v_global: Tensor,
    *, is_global: Tensor, key_padding: Tensor, one_sided_window: int,
    backend: Optional[str] = None,
) -> Tensor:
    """Differentiable ``ops.longformer_attention`` (same arguments and result; SPEC section 3).

    Gradients flow into all six projections; q_global receives gradient at the global tokens only
    (its other rows are never read). backend=None picks "cpu" for float32/float64 CPU tensors and
    "triton" on CUDA.
    """
    _check_projections({"q": q, "k": k, "v": v, "q_global": q_global, "k_global": k_global, "v_global": v_global})
    layout = build_layout(is_global, key_padding, one_sided_window)
    _check_layout(q, layout)
    backend = _trainable_backend(backend, q)
    _check_trainable_backend(backend, q)
    if backend == "reference":
        return longformer_attention_reference(q, k, v, q_global, k_global, v_global,
                                              is_global, key_padding, layout.one_sided_window)
    return attention_with_layout_trainable(q, k, v, layout.gather_global(q_global), k_global, v_global, layout,
                                           backend=backend, validate=False)


# ----------------------------------------------------------------------------------------------
# torch.library registration
# ----------------------------------------------------------------------------------------------

def _op_setup_context(ctx, inputs, output) -> None:
    *tensors, one_sided_window, backend = inputs
    ctx.save_for_backward(*tensors)
    ctx.one_sided_window = one_sided_window
    ctx.backend = backend


def _op_backward(ctx, grad_out: Tensor):
    q, k, v, qg, kg, vg, is_global, key_padding, band_key, global_idx, num_global = ctx.saved_tensors
    layout = AttentionLayout(is_global=is_global, key_padding=key_padding, band_key=band_key,
                             global_idx=global_idx, num_global=num_global, max_global=global_idx.shape[1],
                             one_sided_window=ctx.one_sided_window)
    inputs = tuple(t.contiguous() for t in (q, k, v, qg, kg, vg))
    if ctx.backend == "triton" or (q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64)):
        backend = "triton" if ctx.backend == "triton" else "cpu"
        # the op returns out only: recompute out and lse (one forward, O(N) memory), then the backward
        out, lse = _forward_with_lse(backend, inputs, layout)
        grads = _backward(backend, (*inputs, out, lse), grad_out.contiguous(), layout)
    else:  # dtypes / devices without a kernel backward: the dense reference's autograd
        with torch.enable_grad():
            xs = [t.detach().requires_grad_() for t in inputs]
            out = longformer_attention_reference(xs[0], xs[1], xs[2], scatter_global(layout, xs[3]), xs[4], xs[5],
                                                 is_global, key_padding, layout.one_sided_window)
            grads = torch.autograd.grad(out, xs, grad_out, allow_unused=True, materialize_grads=True)
    return (*grads, None, None, None, None, None, None, None)


def register_custom_op_autograd(op_name: str = "locore::attention") -> None:
    """Attach the backward to a ``torch.library`` op with the signature
    ``(q, k, v, q_global_gathered, k_global, v_global, is_global, key_padding, band_key, global_idx,
    num_global, one_sided_window: int, backend: str) -> out``. The op's output carries no
    log-sum-exp, so the backward recomputes the forward once (with LSE) before the kernel backward:
    about one forward more than ``LongformerAttentionFunction``, same O(N) memory."""
    torch.library.register_autograd(op_name, _op_backward, setup_context=_op_setup_context)
