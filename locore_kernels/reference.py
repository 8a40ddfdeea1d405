"""Dense masked reference for Longformer sliding-window + global-token attention.

Builds the full N x N score matrix, so it is O(N^2) in time and memory: it exists to define the
semantics (SPEC section 3) and to check every fast backend, not to be fast. Works in any floating
dtype; float16/bfloat16 inputs are computed in float32, float64 stays float64.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .layout import check_window


def longformer_attention_reference(
    q: Tensor, k: Tensor, v: Tensor,
    q_global: Tensor, k_global: Tensor, v_global: Tensor,
    is_global: Tensor, key_padding: Tensor, one_sided_window: int, dropout_p: float = 0.0,
) -> Tensor:
    """out[b, i] for q, k, v, *_global of shape [B, N, H, D]; masks [B, N] bool.

    * valid non-global row i: softmax over {global j} U {valid non-global j : |i - j| <= w}
      with q, k, v (one softmax over the union);
    * global row i: softmax over {valid j} with q_global, k_global, v_global;
    * padded row i: exactly 0.

    NaN or inf in the inputs propagates to the rows that see it (as in the C++ kernel): only rows with
    no key at all are defined as 0 rather than computed.

    ``dropout_p`` > 0 drops attention probabilities (inverted dropout, as Longformer's attention dropout
    in training); 0 = the semantics above.
    """
    B, N, H, D = q.shape
    out_dtype = q.dtype
    compute_dtype = _compute_dtype(q.dtype)
    q, k, v, q_global, k_global, v_global = (
        t.to(compute_dtype) for t in (q, k, v, q_global, k_global, v_global))
    is_global = is_global.bool()
    key_padding = key_padding.bool()

    out = local_rows_attention(q, k, v, torch.arange(N, device=q.device), is_global, key_padding,
                               one_sided_window, dropout_p)
    if bool(is_global.any()):
        global_allowed = (~key_padding)[:, None, :].expand(B, N, N)               # [B, Nq, Nk]
        out_global = _masked_attention(q_global, k_global, v_global, global_allowed, dropout_p)
        out = torch.where(is_global[:, :, None, None], out_global, out)
    out = out.masked_fill(key_padding[:, :, None, None], 0.0)
    return out.to(out_dtype)


def local_rows_attention(
    q_rows: Tensor, k: Tensor, v: Tensor, rows: Tensor,
    is_global: Tensor, key_padding: Tensor, one_sided_window: int, dropout_p: float = 0.0,
) -> Tensor:
    """The non-global rule for the rows ``rows`` [R] only, O(R * N): q_rows [B, R, H, D] are their
    queries, k, v [B, N, H, D] every token's. Row i attends to every global token and to the valid
    non-global tokens j with |i - j| <= w, one softmax; padded rows give exactly 0. Used by the
    reference (all rows) and by a model layer whose outputs are read at a few rows only."""
    cdt = _compute_dtype(q_rows.dtype)
    w = min(check_window(one_sided_window), k.shape[1])  # |i - j| < N always: same keys, no int64 overflow
    pos = torch.arange(k.shape[1], device=k.device)
    in_band = (rows[:, None] - pos[None, :]).abs() <= w                 # [R, N]
    band_key = ~key_padding & ~is_global                                              # [B, N] keys of the band
    allowed = (in_band[None] & band_key[:, None, :]) | is_global[:, None, :]          # [B, R, N]
    out = _masked_attention(q_rows.to(cdt), k.to(cdt), v.to(cdt), allowed, dropout_p)
    return out.masked_fill(key_padding[:, rows, None, None], 0.0).to(q_rows.dtype)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _masked_attention(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, dropout_p: float = 0.0) -> Tensor:
    """softmax(q k^T / sqrt(D), masked to ``allowed`` [B, Nq, Nk]) v; rows with no allowed key give 0.

    Only those rows are zeroed (their softmax is 0/0); a NaN from q or an allowed k stays NaN.
    ``dropout_p`` > 0 drops probabilities (training only).
    """
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    no_key = ~allowed.any(dim=-1)                                                     # [B, Nq]
    probs = probs.masked_fill(no_key[:, None, :, None], 0.0)
    if dropout_p > 0:
        probs = torch.nn.functional.dropout(probs, dropout_p)
    return torch.einsum("bhij,bjhd->bihd", probs, v)
