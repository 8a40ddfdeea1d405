"""Public attention ops: validation at the boundary, then the backend registry, then the custom op.

Every backend computes exactly ``reference.longformer_attention_reference``; the tests hold them to it.
The flow of a call: check shapes/devices/layout once -> ``backends.select_backend`` (by name, or the
first that fits) -> the backend, through the custom op ``torch.ops.locore.attention`` /
``attention_rows`` (``custom_ops``) whenever it matters: under ``torch.compile`` (one graph node, no
graph break) and when autograd records (so a registered backward applies). A plain eager call
(inference) runs the same backend function directly: no dispatcher round trip, and no one-time
import of ``torch._dynamo`` that the custom-op wrapper triggers on its first call (seconds).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .backends import BACKENDS, select_backend
from .custom_ops import attention_op, attention_rows_op, layout_tensors
from .layout import AttentionLayout, build_layout, check_window
from .reference import longformer_attention_reference

__all__ = ["BACKENDS", "attention_rows", "attention_with_layout", "longformer_attention", "resolve_backend"]


def resolve_backend(backend: Optional[str], device: torch.device, dtype: torch.dtype,
                    head_dim: Optional[int] = None) -> str:
    """The backend name a call would run: ``backend`` if it supports the inputs (else a ValueError with
    its reasons), None -> the first of ``backends.PRIORITY`` that does (triton on CUDA, C++ on CPU)."""
    return select_backend(backend, torch.device(device), dtype, head_dim).name


def _through_custom_op(*tensors: Tensor) -> bool:
    return torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


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


def _check_layout(x: Tensor, layout: AttentionLayout) -> None:
    if not isinstance(layout, AttentionLayout):
        raise ValueError(f"layout must be an AttentionLayout (build_layout), got {type(layout).__name__}")
    check_window(layout.one_sided_window, "layout.one_sided_window")
    B = x.shape[0]
    N = layout.seq_len
    for name in ("is_global", "key_padding", "band_key"):
        m = getattr(layout, name)
        if m.dtype != torch.bool or tuple(m.shape) != (B, N):
            raise ValueError(f"layout.{name} must be bool [B={B}, N={N}], got {m.dtype} {tuple(m.shape)}")
    G = layout.max_global
    if tuple(layout.global_idx.shape) != (B, G) or tuple(layout.num_global.shape) != (B,):
        raise ValueError(f"layout.global_idx {tuple(layout.global_idx.shape)} / num_global "
                         f"{tuple(layout.num_global.shape)} do not match B={B}, G={G}")
    for name in ("is_global", "key_padding", "band_key", "global_idx", "num_global"):
        if getattr(layout, name).device != x.device:
            raise ValueError(f"layout.{name} is on {getattr(layout, name).device} but the inputs are on {x.device}")


def attention_with_layout(
    q: Tensor, k: Tensor, v: Tensor,
    q_global_gathered: Tensor, k_global: Tensor, v_global: Tensor,
    layout: AttentionLayout, *, backend: Optional[str] = None, validate: bool = True,
) -> Tensor:
    """The model's hot-path entry: masks pre-digested into ``layout`` (built once per forward).

    q, k, v, k_global, v_global: [B, N, H, D]; q_global_gathered: [B, G, H, D], the global queries
    of the global tokens only, in ``layout.global_idx`` order (G = layout.max_global).
    ``validate=False`` skips the shape checks for callers that already validated them once (the
    backend's device/dtype/head-dim fit is always checked).
    """
    if validate:
        _check_projections({"q": q, "k": k, "v": v, "q_global": q_global_gathered,
                            "k_global": k_global, "v_global": v_global},
                           n_rows={"q_global": layout.max_global})
        if q.shape[1] != layout.seq_len:
            raise ValueError(f"layout is for N={layout.seq_len} tokens but q has N={q.shape[1]}")
        _check_layout(q, layout)
    chosen = select_backend(backend, q.device, q.dtype, q.shape[-1])
    if _through_custom_op(q, k, v, q_global_gathered, k_global, v_global):
        return attention_op(q, k, v, q_global_gathered, k_global, v_global, *layout_tensors(layout),
                            layout.one_sided_window, chosen.name)
    return chosen.attention(q, k, v, q_global_gathered, k_global, v_global, layout)


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

    backend: a name of ``backends.REGISTRY`` ("triton", "cpu", "reference") or None = the first that
    fits (README, "Attention backends").
    """
    _check_projections({"q": q, "k": k, "v": v, "q_global": q_global, "k_global": k_global, "v_global": v_global})
    layout = build_layout(is_global, key_padding, one_sided_window)
    if tuple(layout.is_global.shape) != tuple(q.shape[:2]):
        raise ValueError(f"masks have shape {tuple(layout.is_global.shape)} but q is "
                         f"[B={q.shape[0]}, N={q.shape[1]}, ...]")
    if layout.is_global.device != q.device:
        raise ValueError(f"masks are on {layout.is_global.device} but q is on {q.device}")
    name = select_backend(backend, q.device, q.dtype, q.shape[-1]).name
    if name == "reference":  # the reference takes full-length global queries directly
        return longformer_attention_reference(q, k, v, q_global, k_global, v_global,
                                              is_global, key_padding, layout.one_sided_window)
    return attention_with_layout(q, k, v, layout.gather_global(q_global), k_global, v_global, layout,
                                 backend=name, validate=False)


def attention_rows(
    q_rows: Tensor, k: Tensor, v: Tensor, rows: Tensor, layout: AttentionLayout,
    *, backend: Optional[str] = None,
) -> Tensor:
    """The non-global rule for the rows ``rows`` [R] only: q_rows [B, R, H, D] are their local queries,
    k, v [B, N, H, D] every token's. Row i attends to every global token and to the valid non-global
    tokens j with |i - j| <= w (one softmax); padded rows give exactly 0. Rows may come in any order
    and repeat. A model layer whose outputs are read at a few rows only (LoCoRE's pruned last layer)
    calls this; it dispatches like ``attention_with_layout``. Returns [B, R, H, D] in q_rows' dtype.
    """
    if not isinstance(rows, Tensor) or rows.dim() != 1 or rows.dtype not in (torch.int32, torch.int64):
        raise ValueError("rows must be a 1-D int32/int64 tensor of positions, got "
                         + (f"{rows.dtype} {tuple(rows.shape)}" if isinstance(rows, Tensor) else type(rows).__name__))
    _check_projections({"k": k, "v": v, "q_rows": q_rows}, n_rows={"q_rows": rows.shape[0]})
    if rows.device != k.device:
        raise ValueError(f"rows is on {rows.device} but k is on {k.device}")
    if k.shape[1] != layout.seq_len:
        raise ValueError(f"layout is for N={layout.seq_len} tokens but k has N={k.shape[1]}")
    _check_layout(k, layout)
    N = layout.seq_len
    capturing = rows.is_cuda and torch.cuda.is_current_stream_capturing()
    if rows.numel() and not torch.compiler.is_compiling() and not capturing:  # data-dependent: eager only
        lo, hi = int(rows.min()), int(rows.max())
        if lo < 0 or hi >= N:
            raise ValueError(f"rows must lie in [0, N={N}), got values in [{lo}, {hi}]")
    chosen = select_backend(backend, k.device, k.dtype, k.shape[-1])
    if _through_custom_op(q_rows, k, v):
        return attention_rows_op(q_rows, k, v, rows, *layout_tensors(layout), layout.one_sided_window, chosen.name)
    return chosen.rows(q_rows, k, v, rows, layout)
