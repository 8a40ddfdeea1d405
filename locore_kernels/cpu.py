"""CPU backend: the C++/OpenMP kernel ``locore_kernels._cpu`` (csrc/attention.cpp), fp32.

Inputs are handed over zero-copy as numpy views of contiguous fp32 CPU tensors; the kernel writes
every row of a freshly allocated output (padded rows exactly 0) and releases the GIL while it runs.
It uses ``torch.get_num_threads()`` OpenMP threads; results do not depend on the thread count.
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


def _check_inputs(tensors: tuple[Tensor, ...], layout: AttentionLayout) -> None:
    for name, t in zip(_NAMES, tensors):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, but {name} is on {t.device}")
        if t.dtype != torch.float32:
            raise ValueError(f"backend='cpu' computes in float32, but {name} has dtype {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape [B, N, H, D], got {tuple(t.shape)}")
    B, N, H, D = tensors[0].shape
    for name, t in zip(_NAMES, tensors):
        rows = layout.max_global if name == "q_global_gathered" else N
        if tuple(t.shape) != (B, rows, H, D):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {(B, rows, H, D)}")
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


def _np_f32(t: Tensor):
    return t.detach().contiguous().numpy()


def _np_mask(t: Tensor):
    return t.detach().contiguous().view(torch.uint8).numpy()


def cpu_attention(
    q: Tensor, k: Tensor, v: Tensor,
    q_global_gathered: Tensor, k_global: Tensor, v_global: Tensor,
    layout: AttentionLayout, *, out: Optional[Tensor] = None,
) -> Tensor:
    """Longformer attention on CPU in fp32 -> [B, N, H, D] fp32.

    q, k, v, k_global, v_global: [B, N, H, D] float32 CPU; q_global_gathered: [B, G, H, D], the global
    queries of the global tokens in ``layout.global_idx`` order (G = layout.max_global).
    ``out``: optional contiguous float32 [B, N, H, D] CPU tensor to write into (every element is
    overwritten; it must not share memory with an input). Returns ``out``.
    """
    tensors = (q, k, v, q_global_gathered, k_global, v_global)
    _check_inputs(tensors, layout)
    if out is None:
        out = torch.empty(q.shape, dtype=torch.float32)
    elif not (isinstance(out, Tensor) and out.dtype == torch.float32 and out.device.type == "cpu"
              and tuple(out.shape) == tuple(q.shape) and out.is_contiguous()):
        raise ValueError(f"out must be a contiguous float32 CPU tensor of shape {tuple(q.shape)}")
    if out.numel() == 0:
        return out
    arrays = [_np_f32(t) for t in tensors]
    N = q.shape[1]
    _ext().longformer_attention_fp32(
        *arrays, out.detach().numpy(),
        layout.global_idx.detach().to(torch.int32).contiguous().numpy(),
        layout.num_global.detach().to(torch.int32).contiguous().numpy(),
        _np_mask(layout.band_key), _np_mask(layout.key_padding), _np_mask(layout.is_global),
        min(int(layout.one_sided_window), N),
        torch.get_num_threads(),
    )
    return out
