"""CPU backend: the C++/OpenMP kernels of ``locore_kernels._cpu`` (csrc/attention.cpp), fp32 arithmetic.

Inputs are handed over zero-copy as numpy views of contiguous fp32 CPU tensors; float16/bfloat16
inputs are converted to fp32 first and the result back to their dtype (the kernel is O(N * (G + w))
in every dtype: no dense fallback). The kernel writes every row of a freshly allocated output
(padded rows exactly 0) and releases the GIL while it runs. It uses ``torch.get_num_threads()``
OpenMP threads; results do not depend on the thread count.

Which dtypes/devices reach this module is decided by ``backends.CpuBackend``; the checks here are the
ones the extension needs not to crash (shapes, layout tensors).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .layout import AttentionLayout

_NAMES = ("q", "k", "v", "q_global_gathered", "k_global", "v_global")


def _ext():
    try:
        from . import _cpu
    except ImportError as e:  # pragma: no cover - only without a build
        raise RuntimeError("the C++ extension locore_kernels._cpu is not built; run `make build`") from e
    return _cpu


def _check_layout(layout: AttentionLayout, B: int, N: int) -> None:
    for name in ("is_global", "key_padding", "band_key"):
        m = getattr(layout, name)
        if tuple(m.shape) != (B, N):
            raise ValueError(f"layout.{name} has shape {tuple(m.shape)}, expected {(B, N)}")
        if m.device.type != "cpu":
            raise ValueError(f"layout.{name} is on {m.device}; backend='cpu' needs CPU masks")
        if m.dtype != torch.bool:
            raise ValueError(f"layout.{name} must be bool, got {m.dtype}")
    if tuple(layout.global_idx.shape) != (B, layout.max_global) or tuple(layout.num_global.shape) != (B,):
        raise ValueError(f"layout.global_idx {tuple(layout.global_idx.shape)} / num_global "
                         f"{tuple(layout.num_global.shape)} do not match B={B}, G={layout.max_global}")


def _check_tensors(named: dict[str, Tensor]) -> None:
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, but {name} is on {t.device}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape [B, N, H, D], got {tuple(t.shape)}")


def _np_f32(t: Tensor):
    return t.detach().to(torch.float32).contiguous().numpy()


def _np_mask(t: Tensor):
    return t.detach().contiguous().view(torch.uint8).numpy()


def _np_layout(layout: AttentionLayout, N: int) -> tuple:
    """global_idx, num_global, band_key, key_padding, is_global, window: the extension's layout arguments."""
    return (layout.global_idx.detach().to(torch.int32).contiguous().numpy(),
            layout.num_global.detach().to(torch.int32).contiguous().numpy(),
            _np_mask(layout.band_key), _np_mask(layout.key_padding), _np_mask(layout.is_global),
            min(int(layout.one_sided_window), max(N, 1)))


def cpu_attention(
    q: Tensor, k: Tensor, v: Tensor,
    q_global_gathered: Tensor, k_global: Tensor, v_global: Tensor,
    layout: AttentionLayout, *, out: Optional[Tensor] = None,
) -> Tensor:
    """Longformer attention on CPU, fp32 arithmetic -> [B, N, H, D] in q's dtype.

    q, k, v, k_global, v_global: [B, N, H, D] CPU; q_global_gathered: [B, G, H, D], the global
    queries of the global tokens in ``layout.global_idx`` order (G = layout.max_global).
    ``out``: optional contiguous float32 [B, N, H, D] CPU tensor to write into (fp32 inputs only;
    every element is overwritten; it must not share memory with an input). Returns ``out``.
    """
    tensors = (q, k, v, q_global_gathered, k_global, v_global)
    _check_tensors(dict(zip(_NAMES, tensors)))
    B, N, H, D = q.shape
    for name, t in zip(_NAMES, tensors):
        rows = layout.max_global if name == "q_global_gathered" else N
        if tuple(t.shape) != (B, rows, H, D):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {(B, rows, H, D)}")
    _check_layout(layout, B, N)
    if out is None:
        out = torch.empty(q.shape, dtype=torch.float32)
    elif not (isinstance(out, Tensor) and out.dtype == torch.float32 == q.dtype and out.device.type == "cpu"
              and tuple(out.shape) == tuple(q.shape) and out.is_contiguous()):
        raise ValueError(f"out must be a contiguous float32 CPU tensor of shape {tuple(q.shape)} (fp32 inputs)")
    if out.numel() > 0:
        _ext().longformer_attention_fp32(*(_np_f32(t) for t in tensors), out.detach().numpy(),
                                         *_np_layout(layout, N), torch.get_num_threads())
    return out if q.dtype == torch.float32 else out.to(q.dtype)


def cpu_rows_attention(q_rows: Tensor, k: Tensor, v: Tensor, rows: Tensor, layout: AttentionLayout) -> Tensor:
    """The non-global rule for ``rows`` [R] (any order, repeats allowed) -> [B, R, H, D] in q_rows' dtype.

    q_rows [B, R, H, D] are the rows' local queries, k, v [B, N, H, D] every token's (CPU).
    """
    _check_tensors({"q_rows": q_rows, "k": k, "v": v})
    B, N, H, D = k.shape
    R = rows.shape[0]
    if tuple(q_rows.shape) != (B, R, H, D) or tuple(v.shape) != (B, N, H, D):
        raise ValueError(f"q_rows {tuple(q_rows.shape)} / v {tuple(v.shape)} do not match k {(B, N, H, D)} "
                         f"and R={R} rows")
    _check_layout(layout, B, N)
    out = torch.empty((B, R, H, D), dtype=torch.float32)
    if out.numel() > 0:
        _ext().longformer_rows_fp32(_np_f32(q_rows), _np_f32(k), _np_f32(v),
                                    rows.detach().to(torch.int32).contiguous().numpy(), out.numpy(),
                                    *_np_layout(layout, N), torch.get_num_threads())
    return out if q_rows.dtype == torch.float32 else out.to(q_rows.dtype)
