"""Public attention op and backend dispatch.

Every backend computes exactly ``reference.longformer_attention_reference``; the tests hold them to it.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from .layout import AttentionLayout, build_layout, scatter_global
from .reference import local_rows_attention, longformer_attention_reference

BACKENDS = ("triton", "cpu", "reference")
TRITON_HEAD_DIMS = (16, 32, 64, 128)


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: Optional[str], device: torch.device, dtype: torch.dtype) -> str:
    """None -> the fastest backend for the device: triton on CUDA, the C++ kernel for fp32 on CPU."""
    if backend is None:
        if device.type == "cuda":
            return "triton"
        return "cpu" if dtype == torch.float32 else "reference"
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS} or None")
    return backend


def _check_projections(named: dict[str, Tensor], n_rows: Optional[dict[str, int]] = None) -> None:
    first_name, first = next(iter(named.items()))
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape [B, N, H, D], got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        if t.dtype != first.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}")
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")
        expected = list(first.shape)
        if n_rows and name in n_rows:
            expected[1] = n_rows[name]
        if list(t.shape) != expected:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(expected)}")


def _check_layout(q: Tensor, layout: AttentionLayout) -> None:
    B, N = q.shape[:2]
    if tuple(layout.is_global.shape) != (B, N):
        raise ValueError(f"masks have shape {tuple(layout.is_global.shape)} but q is [B={B}, N={N}, ...]")
    if layout.is_global.device != q.device:
        raise ValueError(f"masks are on {layout.is_global.device} but q is on {q.device}")


def _check_backend(backend: str, q: Tensor) -> None:
    D = q.shape[-1]
    if backend == "triton":
        if q.device.type != "cuda" and not triton_interpreter_enabled():
            raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
        if D not in TRITON_HEAD_DIMS:
            raise ValueError(f"backend='triton' supports head dim D in {TRITON_HEAD_DIMS}, got D={D}")
        if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"backend='triton' supports float16/bfloat16/float32, got {q.dtype}")
    elif backend == "cpu":
        if q.device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got device {q.device}")
        if q.dtype != torch.float32:
            raise ValueError(f"backend='cpu' computes in float32, got {q.dtype}")


def attention_with_layout(
    q: Tensor, k: Tensor, v: Tensor,
    q_global_gathered: Tensor, k_global: Tensor, v_global: Tensor,
    layout: AttentionLayout, *, backend: Optional[str] = None, validate: bool = True,
) -> Tensor:
    """The model's hot-path entry: masks pre-digested into ``layout`` (built once per forward).

    q, k, v, k_global, v_global: [B, N, H, D]; q_global_gathered: [B, G, H, D], the global queries
    of the global tokens only, in ``layout.global_idx`` order (G = layout.max_global).
    ``validate=False`` skips the checks for callers that already validated the shapes once.
    """
    backend = resolve_backend(backend, q.device, q.dtype)
    if validate:
        _check_projections({"q": q, "k": k, "v": v, "q_global": q_global_gathered,
                            "k_global": k_global, "v_global": v_global},
                           n_rows={"q_global": layout.max_global})
        _check_layout(q, layout)
        _check_backend(backend, q)
    if backend == "reference":
        q_global = scatter_global(layout, q_global_gathered)
        return longformer_attention_reference(q, k, v, q_global, k_global, v_global,
                                              layout.is_global, layout.key_padding, layout.one_sided_window)
    if backend == "triton":
        from .triton_attention import triton_attention
        return triton_attention(q, k, v, q_global_gathered, k_global, v_global, layout)
    from .cpu import cpu_attention
    return cpu_attention(q, k, v, q_global_gathered, k_global, v_global, layout)


def longformer_attention(
    q: Tensor, k: Tensor, v: Tensor,
    q_global: Tensor, k_global: Tensor, v_global: Tensor,
    *, is_global: Tensor, key_padding: Tensor, one_sided_window: int,
    backend: Optional[str] = None,
) -> Tensor:
    """Longformer sliding-window + global-token attention (SPEC section 3), scores scaled by 1/sqrt(D).

    q, k, v: local projections; q_global, k_global, v_global: global projections; all [B, N, H, D],
    same dtype and device. is_global, key_padding: bool [B, N] (True = global / padding; a padded
    token is never global). Returns [B, N, H, D] in the inputs' dtype (fp32 accumulation).

    backend: "triton" (CUDA; CPU tensors under TRITON_INTERPRET=1), "cpu" (C++ kernel, fp32),
    "reference" (dense masked PyTorch, any float dtype), None = best for the device.
    """
    _check_projections({"q": q, "k": k, "v": v, "q_global": q_global, "k_global": k_global, "v_global": v_global})
    layout = build_layout(is_global, key_padding, one_sided_window)
    _check_layout(q, layout)
    backend = resolve_backend(backend, q.device, q.dtype)
    _check_backend(backend, q)
    if backend == "reference":  # the reference takes full-length global queries directly
        return longformer_attention_reference(q, k, v, q_global, k_global, v_global,
                                              is_global, key_padding, layout.one_sided_window)
    return attention_with_layout(q, k, v, layout.gather_global(q_global), k_global, v_global, layout,
                                 backend=backend, validate=False)


def attention_rows(
    q_rows: Tensor, k: Tensor, v: Tensor, rows: Tensor, layout: AttentionLayout,
    *, backend: Optional[str] = None,
) -> Tensor:
    """The non-global rule for the rows ``rows`` [R] only (non-global tokens): q_rows [B, R, H, D] are
    their local queries, k, v [B, N, H, D] every token's. Row i attends to every global token and to
    the valid non-global tokens j with |i - j| <= w (one softmax); padded rows give exactly 0.
    A model layer whose outputs are read at a few rows only (LoCoRE's pruned last layer) calls this.
    """
    resolve_backend(backend, q_rows.device, q_rows.dtype)
    return local_rows_attention(q_rows, k, v, rows, layout.is_global, layout.key_padding,
                                layout.one_sided_window)
