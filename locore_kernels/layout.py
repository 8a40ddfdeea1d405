"""The per-sequence attention layout: built once per forward, shared by every layer and backend.

LoCoRE's masks are the same in every layer, so everything derived from them (the compact list of
global tokens, which keys may sit in the band) is computed once here and reused.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass(frozen=True)
class AttentionLayout:
    """Masks and derived index tensors for one batch of sequences (all on the tensors' device).

    is_global:        [B, N] bool  - token attends everywhere with the global projections
    key_padding:      [B, N] bool  - True = padding: never attended to, output exactly 0
    band_key:         [B, N] bool  - valid and not global: may be attended to inside the band
    global_idx:       [B, G] int32 - positions of the global tokens of each item, ascending, then
                                     filled with 0 beyond ``num_global[b]`` (G >= max over the batch)
    num_global:       [B]    int32 - number of global tokens per item
    max_global:       int          - G (python int, so kernels can size grids without a sync): the
                                     batch maximum, or a static bound on it (``build_layout``)
    one_sided_window: int          - w: non-global rows see band keys j with |i - j| <= w
    """

    is_global: Tensor
    key_padding: Tensor
    band_key: Tensor
    global_idx: Tensor
    num_global: Tensor
    max_global: int
    one_sided_window: int

    def __post_init__(self) -> None:  # a hand-built layout gets the same window check as build_layout
        check_window(self.one_sided_window, "AttentionLayout.one_sided_window")

    @property
    def batch(self) -> int:
        return self.is_global.shape[0]

    @property
    def seq_len(self) -> int:
        return self.is_global.shape[1]

    def gather_global(self, x: Tensor) -> Tensor:
        """Rows of ``x`` [B, N, ...] at the global tokens -> [B, G, ...] (rows past num_global: garbage)."""
        idx = self.global_idx.long()
        idx = idx.view(idx.shape + (1,) * (x.dim() - 2)).expand((-1, -1) + x.shape[2:])
        return torch.gather(x, 1, idx)


def check_window(one_sided_window: int, name: str = "one_sided_window") -> int:
    """Accept any integer-like value (int, numpy or 0-d torch integer) but not bool; return a plain int.
    Any size is fine (a window wider than the sequence covers it); kernels clamp it to N."""
    if isinstance(one_sided_window, bool):
        raise ValueError(f"{name} must be a positive int, got {one_sided_window!r}")
    try:
        one_sided_window = operator.index(one_sided_window)
    except TypeError:
        raise ValueError(f"{name} must be a positive int, got {one_sided_window!r}") from None
    if one_sided_window < 1:
        raise ValueError(f"{name} must be >= 1, got {one_sided_window}")
    return one_sided_window


def require(ok: Tensor, message: str) -> None:
    """A check on tensor values (``ok`` a 0-d bool tensor). Eager: ValueError(message) when false (one
    host sync). Under ``torch.compile``: an assertion inside the graph (RuntimeError(message) at run
    time), so tracing needs no host sync and makes no graph break."""
    if torch.compiler.is_compiling():
        torch._assert_async(ok, message)
    elif not bool(ok):
        raise ValueError(message)


def build_layout(is_global: Tensor, key_padding: Tensor, one_sided_window: int,
                 max_global: Optional[int] = None) -> AttentionLayout:
    """Validate the masks and derive the layout; call once per forward.

    max_global: None = G is the batch's largest global-token count (one host sync); an int = a static
    bound on that count, used as G (no value-dependent shape: ``torch.compile`` traces the build).
    """
    one_sided_window = check_window(one_sided_window)
    for name, m in (("is_global", is_global), ("key_padding", key_padding)):
        if not isinstance(m, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(m).__name__}")
        if m.dtype != torch.bool:
            raise ValueError(f"{name} must be a bool tensor, got dtype {m.dtype}")
        if m.dim() != 2:
            raise ValueError(f"{name} must have shape [B, N], got {tuple(m.shape)}")
    if is_global.shape != key_padding.shape:
        raise ValueError(f"is_global {tuple(is_global.shape)} and key_padding {tuple(key_padding.shape)} differ in shape")
    if is_global.device != key_padding.device:
        raise ValueError(f"is_global is on {is_global.device} but key_padding on {key_padding.device}")
    require(~(is_global & key_padding).any(),
            "a padded token cannot be global: is_global & key_padding must be all False")

    B, N = is_global.shape
    num_global = is_global.sum(dim=1, dtype=torch.int32)
    if max_global is None:
        max_global = int(num_global.max()) if B > 0 else 0
    else:
        if not 0 <= max_global <= N:
            raise ValueError(f"max_global must lie in [0, N={N}], got {max_global}")
        require((num_global <= max_global).all(), f"more global tokens than max_global={max_global}")
    # Stable sort puts global positions first, in ascending order.
    order = torch.argsort((~is_global).to(torch.int8), dim=1, stable=True)
    global_idx = order[:, :max_global].to(torch.int32)
    keep = torch.arange(max_global, device=is_global.device)[None, :] < num_global[:, None]
    global_idx = torch.where(keep, global_idx, torch.zeros_like(global_idx)).contiguous()
    return AttentionLayout(
        is_global=is_global.contiguous(),
        key_padding=key_padding.contiguous(),
        band_key=(~key_padding & ~is_global).contiguous(),
        global_idx=global_idx,
        num_global=num_global.contiguous(),
        max_global=max_global,
        one_sided_window=one_sided_window,
    )


def scatter_global(layout: AttentionLayout, x_gathered: Tensor) -> Tensor:
    """Inverse of ``gather_global``: [B, G, ...] -> [B, N, ...], zeros at non-global rows."""
    B, N = layout.is_global.shape
    out = x_gathered.new_zeros((B, N) + tuple(x_gathered.shape[2:]))
    G = layout.max_global
    rows = torch.arange(G, device=x_gathered.device)[None, :] < layout.num_global[:, None]  # [B, G]
    b_idx = torch.arange(B, device=x_gathered.device)[:, None].expand(B, G)
    out[b_idx[rows], layout.global_idx.long()[rows]] = x_gathered[rows]
    return out
