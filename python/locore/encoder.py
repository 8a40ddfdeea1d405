"""One post-LayerNorm Longformer encoder layer (SPEC section 3) with the projections fused.

Letters: B batch, N tokens, C hidden size, I FFN width; in the attention tensors [B, N, heads, D].
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from locore_kernels import AttentionLayout, bias_gelu, bias_residual_layernorm

from .config import LoCoReConfig

AttentionFn = Callable[..., Tensor]      # fn(q, k, v, q_global_gathered, k_global, v_global, layout) -> [B, N, heads, D]
RowsAttentionFn = Callable[..., Tensor]  # fn(q_rows, k, v, rows, layout) -> [B, R, heads, D]


class EncoderLayer(nn.Module):
    """Post-LayerNorm Longformer layer (SPEC section 3) with the projections fused."""

    def __init__(self, cfg: LoCoReConfig):
        super().__init__()
        C, I, eps = cfg.hidden, cfg.intermediate, cfg.layer_norm_eps
        self.heads = cfg.num_attention_heads
        self.qkv = nn.Linear(C, 5 * C)  # rows: query | key | value | key_global | value_global
        self.query_global = nn.Linear(C, C)
        self.out = nn.Linear(C, C)
        self.ln1 = nn.LayerNorm(C, eps=eps)
        self.ff1 = nn.Linear(C, I)
        self.ff2 = nn.Linear(I, C)
        self.ln2 = nn.LayerNorm(C, eps=eps)
        self.ffn_chunk_rows = 1024  # on CPU the FFN runs in row chunks: a [1024, I] intermediate, not [N, I]

    def project(self, x: Tensor) -> list[Tensor]:
        """q, k, v, k_global, v_global of every token, each [B, N, heads, head_dim].

        CUDA: one [C -> 5C] GEMM, the five are strided views of it (the Triton kernel takes strides).
        CPU: the same weight, written block by block into one [5, B, N, C] buffer, so the five come out
        contiguous and the C++ kernel reads them without copies.
        """
        B, N, C = x.shape
        if x.is_cuda:
            return list(F.linear(x, self.qkv.weight, self.qkv.bias).view(B, N, 5, self.heads, -1).unbind(2))
        out = x.new_empty(5, B * N, C)
        x2 = x.reshape(B * N, C)
        for i in range(5):
            torch.addmm(self.qkv.bias[i * C:(i + 1) * C], x2, self.qkv.weight[i * C:(i + 1) * C].T, out=out[i])
        return list(out.view(5, B, N, self.heads, -1).unbind(0))

    def attention(self, x: Tensor, layout: AttentionLayout, attend: AttentionFn) -> Tensor:
        """Attention output of every token, [B, N, C] (before the out-projection)."""
        B, N, C = x.shape
        q, k, v, kg, vg = self.project(x)
        qg = F.linear(layout.gather_global(x), self.query_global.weight, self.query_global.bias)
        return attend(q, k, v, qg.view(B, -1, self.heads, C // self.heads), kg, vg, layout).reshape(B, N, C)

    def forward(self, x: Tensor, layout: AttentionLayout, attend: AttentionFn) -> Tensor:
        # the [5, B, N, C] projections die inside attention(): freed before the FFN
        a = self.attention(x, layout, attend)
        h1 = self.post_attention(a, x)
        del a
        return self.feed_forward(h1)

    def forward_rows(self, x: Tensor, layout: AttentionLayout, rows: Tensor, attend_rows: Optional[RowsAttentionFn],
                     attend: AttentionFn) -> Tensor:
        """Hidden states of ``rows`` only (non-global tokens): the last layer of a score that reads only them.

        ``attend_rows(q_rows, k, v, rows, layout)`` computes the rows alone (k and v still of every
        token; no global projections). Without one (a user's ``attend`` callable) the layer runs
        ``attend`` on the whole sequence and reads the rows; the out-projection and FFN run on the rows.
        """
        B, N, C = x.shape
        xr = x[:, rows]
        if attend_rows is None:
            a = self.attention(x, layout, attend)[:, rows]
        else:
            w, b = self.qkv.weight, self.qkv.bias
            k, v = F.linear(x, w[C:3 * C], b[C:3 * C]).view(B, N, 2, self.heads, -1).unbind(2)
            q = F.linear(xr, w[:C], b[:C]).view(B, -1, self.heads, C // self.heads)
            a = attend_rows(q, k, v, rows, layout).reshape(xr.shape)
        return self.feed_forward(self.post_attention(a, xr))

    def post_attention(self, a: Tensor, x: Tensor) -> Tensor:
        return bias_residual_layernorm(F.linear(a, self.out.weight), self.out.bias, x,
                                       self.ln1.weight, self.ln1.bias, self.ln1.eps)

    def feed_forward(self, h: Tensor) -> Tensor:
        """LayerNorm(W_2 gelu(W_1 h + b_1) + b_2 + h). On CPU the [rows, I] intermediate is built in
        chunks of ``ffn_chunk_rows`` rows (memory); W_2 writes each chunk straight into one output."""
        rows = h.reshape(-1, h.shape[-1])
        y = torch.empty_like(rows)
        step = max(rows.shape[0], 1) if h.is_cuda else self.ffn_chunk_rows
        for s in range(0, rows.shape[0], step):
            u = bias_gelu(F.linear(rows[s:s + step], self.ff1.weight), self.ff1.bias)
            torch.mm(u, self.ff2.weight.T, out=y[s:s + step])
        return bias_residual_layernorm(y, self.ff2.bias, rows, self.ln2.weight, self.ln2.bias,
                                       self.ln2.eps).view(h.shape)
