"""CPU training path: the C++ forward that also returns the log-sum-exp, and the C++ backward
(csrc/attention_backward.cpp), float32 and float64.

The backward is flash-style: it reads q, k, v, the gathered global queries, k_global, v_global, the
forward output and the per-row log-sum-exp ``lse`` [B, H, N], and recomputes the probabilities tile
by tile, so its memory is O(N * H * D) plus per-thread tiles, never O(N^2). Every gradient row is
written by one task in a fixed order: bit-identical results run to run and for any thread count.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .cpu import _ext, _np_mask
from .layout import AttentionLayout

CPU_GRAD_DTYPES = (torch.float32, torch.float64)


def _arrays(tensors: tuple[Tensor, ...]):
    return [t.detach().contiguous().numpy() for t in tensors]


def _layout_arrays(layout: AttentionLayout, n: int) -> tuple:
    return (
        layout.global_idx.detach().to(torch.int32).contiguous().numpy(),
        layout.num_global.detach().to(torch.int32).contiguous().numpy(),
        _np_mask(layout.band_key), _np_mask(layout.key_padding), _np_mask(layout.is_global),
        min(int(layout.one_sided_window), n),
        torch.get_num_threads(),
    )


def cpu_attention_with_lse(
    q: Tensor, k: Tensor, v: Tensor,
    q_global_gathered: Tensor, k_global: Tensor, v_global: Tensor,
    layout: AttentionLayout,
) -> tuple[Tensor, Tensor]:
    """Forward -> (out [B, N, H, D], lse [B, H, N]); lse_i = log sum_j exp(q_i . k_j / sqrt(D)) over row
    i's keys (0 at padded rows). float32 runs the fast kernel of ``cpu_attention``; float64 a plain
    two-pass kernel (for float64 gradient checks). Inputs as ``cpu_attention``; one dtype throughout."""
    B, N, H, D = q.shape
    out = torch.empty((B, N, H, D), dtype=q.dtype)
    lse = torch.zeros((B, H, N), dtype=q.dtype)
    if out.numel() == 0:
        return out.zero_(), lse
    fn = _ext().longformer_attention_lse_fp32 if q.dtype == torch.float32 else _ext().longformer_attention_forward_lse
    fn(*_arrays((q, k, v, q_global_gathered, k_global, v_global)), out.numpy(), lse.numpy(),
       *_layout_arrays(layout, N))
    return out, lse


def cpu_attention_backward(
    q: Tensor, k: Tensor, v: Tensor,
    q_global_gathered: Tensor, k_global: Tensor, v_global: Tensor,
    out: Tensor, lse: Tensor, grad_out: Tensor, layout: AttentionLayout,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dq_global_gathered, dk_global, dv_global) from the saved forward state."""
    B, N, H, D = q.shape
    grads = [torch.empty_like(t, memory_format=torch.contiguous_format)
             for t in (q, k, v, q_global_gathered, k_global, v_global)]
    if q.numel() == 0:
        return tuple(g.zero_() for g in grads)
    _ext().longformer_attention_backward(
        *_arrays((q, k, v, q_global_gathered, k_global, v_global, out, lse, grad_out)),
        *(g.numpy() for g in grads), *_layout_arrays(layout, N))
    return tuple(grads)
