"""Dense masked reference for Longformer sliding-window + global-token attention.

Builds the full N x N score matrix, so it is O(N^2) in time and memory: it exists to define the
semantics (SPEC section 3) and to check every fast backend, not to be fast. Works in any floating
dtype; float16/bfloat16 inputs are computed in float32, float64 stays float64.
"""
from __future__ import annotations

import torch
from torch import Tensor


def longformer_attention_reference(
    q: Tensor, k: Tensor, v: Tensor,
    q_global: Tensor, k_global: Tensor, v_global: Tensor,
    is_global: Tensor, key_padding: Tensor, one_sided_window: int,
) -> Tensor:
    """out[b, i] for q, k, v, *_global of shape [B, N, H, D]; masks [B, N] bool.

    * valid non-global row i: softmax over {global j} U {valid non-global j : |i - j| <= w}
      with q, k, v (one softmax over the union);
    * global row i: softmax over {valid j} with q_global, k_global, v_global;
    * padded row i: exactly 0.
    """
    B, N, H, D = q.shape
    out_dtype = q.dtype
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = D ** -0.5
    q, k, v, q_global, k_global, v_global = (
        t.to(compute_dtype) for t in (q, k, v, q_global, k_global, v_global))
    is_global = is_global.bool()
    key_padding = key_padding.bool()
    valid = ~key_padding

    pos = torch.arange(N, device=q.device)
    in_band = (pos[:, None] - pos[None, :]).abs() <= one_sided_window            # [N, N]
    band_key = valid & ~is_global                                                # [B, N] keys of the band
    local_allowed = (in_band[None] & band_key[:, None, :]) | is_global[:, None, :]  # [B, Nq, Nk]
    global_allowed = valid[:, None, :].expand(B, N, N)                           # [B, Nq, Nk]

    def masked_attention(qq: Tensor, kk: Tensor, vv: Tensor, allowed: Tensor) -> Tensor:
        scores = torch.einsum("bihd,bjhd->bhij", qq, kk) * scale
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked rows (padding) -> 0, not NaN
        return torch.einsum("bhij,bjhd->bihd", probs, vv)

    out = masked_attention(q, k, v, local_allowed)
    if bool(is_global.any()):
        out_global = masked_attention(q_global, k_global, v_global, global_allowed)
        out = torch.where(is_global[:, :, None, None], out_global, out)
    out = out.masked_fill(key_padding[:, :, None, None], 0.0)
    return out.to(out_dtype)
