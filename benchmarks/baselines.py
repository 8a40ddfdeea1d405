"""Baselines the benchmarks measure our engine against.

Attention baselines, all with the signature of ``locore_kernels.attention_with_layout`` minus the
keywords, so they drop into ``LoCoRe.set_attention(fn)`` and into ``bench_attention.py`` alike:

    fn(q, k, v, q_global_gathered, k_global, v_global, layout) -> out      # [B, N, H, D]

* ``FlexAttentionBaseline``  - ``torch.nn.attention.flex_attention`` (compiled) with a block mask that
  implements exactly SPEC section 3's rule;
* ``DenseSDPABaseline``      - ``F.scaled_dot_product_attention`` with a dense boolean N x N mask;
* ``HFChunkedAttention``     - transformers' ``LongformerSelfAttention`` chunked driver (the code the
  published LoCoRE runs), fed our projections instead of computing its own.

Each computes the same function as ``locore_kernels.longformer_attention_reference``;
``tests/test_benchmarks.py`` holds them to it (a benchmark of a wrong baseline is worthless).

Latency baselines of the other re-rankers in the paper's Table 5, written from their papers'
configurations as plain modules with random weights (only their cost matters here):

* ``RRT``  - Reranking Transformers (Tan et al., ICCV 2021): 6 post-LN encoder layers, width 128,
  4 heads, FFN 1024, ReLU; one pair = [CLS, q global, 500 q local, SEP, g global, 500 g local]
  = 1004 tokens; a linear classifier on [CLS].
* ``AMES`` - AMES (Suma et al., ECCV 2024): 5 post-LN decoder layers (self-attention within each image,
  cross-attention to the other image, ReLU FFN), width 128, 2 heads, FFN 1024; one pair =
  [MTC, 600 query local, 50 gallery local] = 651 tokens; a linear classifier on [MTC].
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from locore_kernels import AttentionLayout

__all__ = [
    "AMES", "DenseSDPABaseline", "FlexAttentionBaseline", "HFChunkedAttention", "RRT",
    "ATTENTION_BASELINES", "make_attention_baseline", "overwrite_global_rows",
]


# --------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------

def overwrite_global_rows(out: Tensor, out_global: Tensor, layout: AttentionLayout) -> Tensor:
    """Write ``out_global`` [B, G, H, D] (rows in ``layout.global_idx`` order) into ``out`` [B, N, H, D].

    Unlike ``locore_kernels.scatter_global`` this needs no host sync (no boolean indexing), so a
    baseline pays no per-layer synchronisation our own kernels do not pay either: rows past
    ``num_global[b]`` are sent to a scratch row N that is cut off afterwards.
    """
    B, N = out.shape[:2]
    G = layout.max_global
    if G == 0:
        return out
    slot = torch.arange(G, device=out.device)[None, :]
    idx = torch.where(slot < layout.num_global[:, None], layout.global_idx.long(), N)  # [B, G]
    idx = idx.view(B, G, 1, 1).expand(-1, -1, out.shape[2], out.shape[3])
    padded = torch.cat([out, out.new_zeros((B, 1) + tuple(out.shape[2:]))], dim=1)
    padded.scatter_(1, idx, out_global.to(out.dtype))
    return padded[:, :N]


class _PerLayoutCache:
    """Masks derived from one layout, rebuilt when the model hands in a new layout (once per forward)."""

    def __init__(self):
        self._layout: Optional[AttentionLayout] = None
        self._value = None

    def get(self, layout: AttentionLayout, build):
        if self._layout is not layout:
            self._value = build(layout)
            self._layout = layout
        return self._value


# --------------------------------------------------------------------------------------------------
# FlexAttention
# --------------------------------------------------------------------------------------------------

_COMPILED_FLEX = None


def _compiled_flex():
    """One compiled flex_attention shared by every instance (compiling is the expensive part)."""
    global _COMPILED_FLEX
    if _COMPILED_FLEX is None:
        import torch._dynamo.config as dynamo_config
        from torch.nn.attention.flex_attention import flex_attention
        # A benchmark run meets many shapes (N per K, head dims, dtypes, batch); without a higher
        # limit dynamo would silently fall back to the unfused eager path after 8 of them.
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, max(getattr(dynamo_config, name), 256))
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX


class FlexAttentionBaseline:
    """SPEC section 3 attention with FlexAttention and a block mask that implements the same rule.

    Non-global rows: the keys are ``[global tokens (compacted, G of them) ; all N tokens]`` and the
    mask admits key slot ``s < G`` when ``s < num_global[b]`` and key slot ``s >= G`` (token
    ``j = s - G``) when ``j`` is a valid non-global token with ``|i - j| <= w``. Putting the globals
    in front keeps the block mask sparse (G dense columns + a band); with the globals left in place,
    LoCoRE's [SEP] every 50 tokens would make every block partial and flex as slow as dense attention,
    so this is the strongest honest use of FlexAttention for this layout.
    Global rows: ``q_global_gathered`` against every valid key with the global projections.
    Padded rows are zeroed. Block masks are built once per layout (i.e. once per forward), with a
    compiled ``create_block_mask`` when ``compile_masks`` is set (default: like ``compile``; a caller
    that builds them once, outside what it times, can spare itself that compilation).

    ``compile=True`` (the default) runs ``torch.compile(flex_attention)``: that is how FlexAttention
    is meant to be used (eager flex materialises the full score matrix). ``compile=False`` is for the
    correctness tests only.
    """

    name = "flex"

    def __init__(self, compile: bool = True, block_size: int = 128, compile_masks: Optional[bool] = None):
        self.compile = compile
        self.compile_masks = compile if compile_masks is None else compile_masks
        self.block_size = block_size
        self._masks = _PerLayoutCache()

    def _build_masks(self, layout: AttentionLayout):
        from torch.nn.attention.flex_attention import create_block_mask

        B, N = layout.is_global.shape
        G = layout.max_global
        w = layout.one_sided_window
        band_key, num_global, key_padding = layout.band_key, layout.num_global, layout.key_padding
        device = layout.is_global.device

        def local_rule(b, h, qi, kj):
            j = kj - G
            band = band_key[b, j.clamp(min=0)] & ((qi - j).abs() <= w)
            return torch.where(kj < G, kj < num_global[b], band)

        def global_rule(b, h, qi, kj):
            return ~key_padding[b, kj]

        local_mask = create_block_mask(local_rule, B, None, N, G + N, device=device,
                                       BLOCK_SIZE=self.block_size, _compile=self.compile_masks)
        global_mask = None
        if G > 0:
            global_mask = create_block_mask(global_rule, B, None, G, N, device=device,
                                            BLOCK_SIZE=self.block_size, _compile=self.compile_masks)
        return local_mask, global_mask

    def _flex(self):
        if self.compile:
            return _compiled_flex()
        from torch.nn.attention.flex_attention import flex_attention
        return flex_attention

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, q_global_gathered: Tensor, k_global: Tensor,
                 v_global: Tensor, layout: AttentionLayout) -> Tensor:
        local_mask, global_mask = self._masks.get(layout, self._build_masks)
        flex = self._flex()
        if layout.max_global > 0:
            k_all = torch.cat([layout.gather_global(k), k], dim=1)
            v_all = torch.cat([layout.gather_global(v), v], dim=1)
        else:
            k_all, v_all = k, v
        # flex wants [B, H, L, D]; transposes are views, flex accepts the strides.
        out = flex(q.transpose(1, 2), k_all.transpose(1, 2), v_all.transpose(1, 2),
                   block_mask=local_mask).transpose(1, 2)
        if global_mask is not None:
            out_global = flex(q_global_gathered.transpose(1, 2), k_global.transpose(1, 2),
                              v_global.transpose(1, 2), block_mask=global_mask).transpose(1, 2)
            out = overwrite_global_rows(out, out_global, layout)
        return out.masked_fill(layout.key_padding[:, :, None, None], 0.0)


# --------------------------------------------------------------------------------------------------
# Dense SDPA with a boolean mask
# --------------------------------------------------------------------------------------------------

class DenseSDPABaseline:
    """SPEC section 3 attention as two dense masked SDPA calls (O(N^2) mask and work).

    The [B, 1, N, N] boolean mask of the non-global rows and the [B, 1, 1, N] key mask of the
    global rows are built once per layout. Padded query rows are given every key (so no row is
    fully masked and SDPA returns no NaN) and zeroed afterwards.
    """

    name = "sdpa-dense"

    def __init__(self):
        self._masks = _PerLayoutCache()

    @staticmethod
    def _build_masks(layout: AttentionLayout):
        B, N = layout.is_global.shape
        pos = torch.arange(N, device=layout.is_global.device)
        in_band = (pos[:, None] - pos[None, :]).abs() <= layout.one_sided_window          # [N, N]
        allowed = (in_band[None] & layout.band_key[:, None, :]) | layout.is_global[:, None, :]
        allowed = allowed | layout.key_padding[:, :, None]                                # padded rows
        return allowed[:, None], (~layout.key_padding)[:, None, None, :]

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, q_global_gathered: Tensor, k_global: Tensor,
                 v_global: Tensor, layout: AttentionLayout) -> Tensor:
        local_mask, key_mask = self._masks.get(layout, self._build_masks)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=local_mask).transpose(1, 2)
        if layout.max_global > 0:
            out_global = F.scaled_dot_product_attention(
                q_global_gathered.transpose(1, 2), k_global.transpose(1, 2), v_global.transpose(1, 2),
                attn_mask=key_mask).transpose(1, 2)
            out = overwrite_global_rows(out, out_global, layout)
        return out.masked_fill(layout.key_padding[:, :, None, None], 0.0)


# --------------------------------------------------------------------------------------------------
# transformers' LongformerSelfAttention (chunked)
# --------------------------------------------------------------------------------------------------

class _Given(nn.Module):
    """Stands in for one of LongformerSelfAttention's projections: returns a tensor set beforehand.

    The library scales its two query projections in place, so those hand out a fresh copy per call.
    """

    def __init__(self, copy: bool):
        super().__init__()
        self.copy = copy
        self.value: Optional[Tensor] = None

    def forward(self, _hidden: Tensor) -> Tensor:
        return self.value.clone() if self.copy else self.value


class HFChunkedAttention:
    """Drives ``transformers``' ``LongformerSelfAttention.forward`` with our projections.

    The module's six Linear projections are replaced by ``_Given`` stand-ins that return the
    projections we pass, so everything else - the chunked sliding-window matmuls, the global-key
    concatenation, the separate global-row pass, the masks - is the library's own code, as the
    published LoCoRE runs it. The library needs N to be a multiple of the window 2w; like
    ``LongformerModel`` we pad with masked tokens (in ``prepare``, once, outside what is timed).
    """

    name = "hf-longformer"

    def __init__(self, num_heads: int, head_dim: int, one_sided_window: int):
        from transformers import LongformerConfig
        from transformers.models.longformer.modeling_longformer import LongformerSelfAttention

        config = LongformerConfig(hidden_size=num_heads * head_dim, num_attention_heads=num_heads,
                                  attention_window=[2 * one_sided_window], num_hidden_layers=1,
                                  attention_probs_dropout_prob=0.0)
        attn = LongformerSelfAttention(config, layer_id=0)
        for name in ("query", "key", "value", "query_global", "key_global", "value_global"):
            setattr(attn, name, _Given(copy=name.startswith("query")))
        self.attn = attn.eval()
        self.num_heads, self.head_dim, self.one_sided_window = num_heads, head_dim, one_sided_window

    def prepare(self, q: Tensor, k: Tensor, v: Tensor, q_global_gathered: Tensor, k_global: Tensor,
                v_global: Tensor, layout: AttentionLayout):
        """Pad to a window multiple and set the projections; returns ``run()`` -> out [B, N, H, D]."""
        if layout.one_sided_window != self.one_sided_window:
            raise ValueError(f"layout window {layout.one_sided_window} != driver window {self.one_sided_window}")
        B, N, H, D = q.shape
        E = H * D
        pad = (-N) % (2 * self.one_sided_window)

        def seq_first(t: Tensor) -> Tensor:          # [B, N, H, D] -> padded [Np, B, E]
            t = F.pad(t, (0, 0, 0, 0, 0, pad))
            return t.transpose(0, 1).reshape(N + pad, B, E).contiguous()

        is_global = F.pad(layout.is_global, (0, pad), value=False)
        is_masked = F.pad(layout.key_padding, (0, pad), value=True)
        # The library's extended mask: -10000 padding, 0 local, +10000 global (only "!= 0" is read here).
        attention_mask = torch.zeros(is_global.shape, dtype=q.dtype, device=q.device)
        attention_mask = attention_mask.masked_fill(is_masked, -10000.0).masked_fill(is_global, 10000.0)
        is_global_attn = bool(is_global.any())
        a = self.attn
        a.query.value, a.key.value, a.value.value = seq_first(q), seq_first(k), seq_first(v)
        a.key_global.value, a.value_global.value = seq_first(k_global), seq_first(v_global)
        G = layout.max_global
        a.query_global.value = q_global_gathered.transpose(0, 1).reshape(G, B, E).contiguous()
        hidden = torch.empty(B, N + pad, E, dtype=q.dtype, device=q.device)  # only its shape is read

        def run() -> Tensor:
            with torch.no_grad():
                out = a(hidden, attention_mask=attention_mask, is_index_masked=is_masked,
                        is_index_global_attn=is_global, is_global_attn=is_global_attn)[0]
            return out[:, :N].reshape(B, N, H, D)

        return run

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, q_global_gathered: Tensor, k_global: Tensor,
                 v_global: Tensor, layout: AttentionLayout) -> Tensor:
        return self.prepare(q, k, v, q_global_gathered, k_global, v_global, layout)()


ATTENTION_BASELINES = ("flex", "sdpa-dense", "hf-longformer")


def make_attention_baseline(name: str, *, num_heads: int = 12, head_dim: int = 64,
                            one_sided_window: int = 256, compile: bool = True,
                            compile_masks: Optional[bool] = None):
    if name == "flex":
        return FlexAttentionBaseline(compile=compile, compile_masks=compile_masks)
    if name == "sdpa-dense":
        return DenseSDPABaseline()
    if name == "hf-longformer":
        return HFChunkedAttention(num_heads, head_dim, one_sided_window)
    raise ValueError(f"unknown attention baseline {name!r}; choose one of {ATTENTION_BASELINES}")


# --------------------------------------------------------------------------------------------------
# RRT and AMES: plain post-LN transformer blocks
# --------------------------------------------------------------------------------------------------

class _Attention(nn.Module):
    """Multi-head attention (packed in-projection, SDPA) with an optional boolean "may attend" mask."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not a multiple of {heads} heads")
        self.heads = heads
        self.in_proj = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, allowed: Optional[Tensor]) -> Tensor:
        P, L, E = x.shape
        qkv = self.in_proj(x).view(P, L, 3, self.heads, E // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=allowed)
        return self.out_proj(out.transpose(1, 2).reshape(P, L, E))


class _FeedForward(nn.Sequential):
    def __init__(self, dim: int, hidden: int):
        super().__init__(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))


class _EncoderLayer(nn.Module):
    """Post-LN encoder layer: x = LN(x + SA(x)); x = LN(x + FFN(x))."""

    def __init__(self, dim: int, heads: int, ffn: int):
        super().__init__()
        self.attn, self.ffn = _Attention(dim, heads), _FeedForward(dim, ffn)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: Tensor, allowed: Optional[Tensor]) -> Tensor:
        x = self.norm1(x + self.attn(x, allowed))
        return self.norm2(x + self.ffn(x))


class RRT(nn.Module):
    """Reranking Transformer (Tan et al. 2021) at the paper's configuration, random weights.

    ``forward(query_global [B, Dg], query_local [B, L, d], query_scales [B, L], query_mask [B, L],
    gallery_global [B, K, Dg], gallery_local [B, K, L, d], gallery_scales, gallery_mask)`` -> [B, K]
    logits, one per (query, gallery image) pair; masks: True = padding. Each pair is one sequence
    [CLS, q global, q local x L, SEP, g global, g local x L] (1004 tokens at L = 500, d = 128).
    """

    def __init__(self, dim: int = 128, heads: int = 4, layers: int = 6, ffn: int = 1024,
                 global_dim: int = 2048, num_scales: int = 7):
        super().__init__()
        self.remap_global = nn.Linear(global_dim, dim)
        self.scale_embedding = nn.Embedding(num_scales, dim)
        self.segment_embedding = nn.Embedding(6, dim)   # q local, g local, CLS, SEP, q global, g global
        self.layers = nn.ModuleList(_EncoderLayer(dim, heads, ffn) for _ in range(layers))
        self.classifier = nn.Linear(dim, 1)

    @staticmethod
    def tokens_per_pair(local_per_image: int) -> int:
        return 2 * local_per_image + 4

    def forward(self, query_global: Tensor, query_local: Tensor, query_scales: Tensor, query_mask: Tensor,
                gallery_global: Tensor, gallery_local: Tensor, gallery_scales: Tensor,
                gallery_mask: Tensor) -> Tensor:
        B, K, L, d = gallery_local.shape
        seg = self.segment_embedding.weight

        def image_tokens(glob: Tensor, local: Tensor, scales: Tensor, seg_global: int, seg_local: int):
            glob = F.normalize(self.remap_global(glob), dim=-1) + seg[seg_global]
            local = F.normalize(local, dim=-1) + self.scale_embedding(scales) + seg[seg_local]
            return glob, local

        qg, ql = image_tokens(query_global, query_local, query_scales, 4, 0)     # [B, d], [B, L, d]
        gg, gl = image_tokens(gallery_global, gallery_local, gallery_scales, 5, 1)  # [B, K, d], [B, K, L, d]
        P = B * K

        def per_pair(t: Tensor) -> Tensor:  # query-side tensor [B, ...] -> [B*K, ...]
            return t[:, None].expand((B, K) + tuple(t.shape[1:])).reshape((P,) + tuple(t.shape[1:]))

        x = torch.cat([
            seg[2].expand(P, 1, d), per_pair(qg)[:, None], per_pair(ql),
            seg[3].expand(P, 1, d), gg.reshape(P, 1, d), gl.reshape(P, L, d)], dim=1)
        no_pad = query_mask.new_zeros((P, 2))
        padding = torch.cat([no_pad, per_pair(query_mask), no_pad, gallery_mask.reshape(P, L)], dim=1)
        allowed = (~padding.bool())[:, None, None, :]                                # [P, 1, 1, T]
        for layer in self.layers:
            x = layer(x, allowed)
        return self.classifier(x[:, 0]).view(B, K)


class _DecoderLayer(nn.Module):
    """AMES decoder layer, post-LN: LN(x + SA(x)); LN(x + CA(x)); LN(x + FFN(x)), one sequence per
    pair with masks that keep self-attention inside each image and cross-attention across them."""

    def __init__(self, dim: int, heads: int, ffn: int):
        super().__init__()
        self.self_attn, self.cross_attn = _Attention(dim, heads), _Attention(dim, heads)
        self.ffn = _FeedForward(dim, ffn)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: Tensor, self_allowed: Tensor, cross_allowed: Tensor) -> Tensor:
        x = self.norm1(x + self.self_attn(x, self_allowed))
        x = self.norm2(x + self.cross_attn(x, cross_allowed))
        return self.norm3(x + self.ffn(x))


class AMES(nn.Module):
    """AMES (Suma et al. 2024) at the paper's configuration (full-precision descriptors), random weights.

    ``forward(query_local [B, Q, Dl], query_mask [B, Q], gallery_local [B, K, T, Dl], gallery_mask
    [B, K, T])`` -> [B, K] logits; masks: True = padding. Each pair is one sequence
    [MTC, query local x Q, gallery local x T] (651 tokens at Q = 600, T = 50).
    """

    def __init__(self, dim: int = 128, heads: int = 2, layers: int = 5, ffn: int = 1024, local_dim: int = 768):
        super().__init__()
        self.match_token = nn.Parameter(torch.randn(dim) * 0.02)
        self.remap_local = nn.Sequential(nn.Linear(local_dim, dim), nn.LayerNorm(dim))
        self.layers = nn.ModuleList(_DecoderLayer(dim, heads, ffn) for _ in range(layers))
        self.classifier = nn.Linear(dim, 1)

    @staticmethod
    def tokens_per_pair(query_local: int, gallery_local: int) -> int:
        return 1 + query_local + gallery_local

    def forward(self, query_local: Tensor, query_mask: Tensor, gallery_local: Tensor,
                gallery_mask: Tensor) -> Tensor:
        B, K, T, _ = gallery_local.shape
        Q = query_local.shape[1]
        P = B * K
        q = self.remap_local(F.normalize(query_local, dim=-1))                      # [B, Q, d]
        g = self.remap_local(F.normalize(gallery_local, dim=-1))                    # [B, K, T, d]
        if not self.training:  # the published inference path rounds the database side to fp16
            g = g.half().to(q.dtype)
        d = q.shape[-1]
        q = q[:, None].expand(B, K, Q, d).reshape(P, Q, d)
        x = torch.cat([self.match_token.to(q.dtype).expand(P, 1, d), q, g.reshape(P, T, d)], dim=1)

        side = torch.cat([x.new_zeros(1, dtype=torch.long), x.new_ones(Q, dtype=torch.long),
                          x.new_full((T,), 2, dtype=torch.long)])                  # 0 MTC, 1 query, 2 gallery
        same = side[:, None] == side[None, :]
        touches_mtc = (side[:, None] == 0) | (side[None, :] == 0)
        self_struct = same | touches_mtc                                            # [L, L]
        cross_struct = ~same | touches_mtc
        padding = torch.cat([query_mask.bool()[:, None].expand(B, K, Q).reshape(P, Q),
                             gallery_mask.bool().reshape(P, T)], dim=1)
        key_ok = torch.cat([padding.new_ones(P, 1), ~padding], dim=1)[:, None, None, :]   # [P, 1, 1, L]
        self_allowed = self_struct[None, None] & key_ok
        cross_allowed = cross_struct[None, None] & key_ok
        for layer in self.layers:
            x = layer(x, self_allowed, cross_allowed)
        return self.classifier(x[:, 0]).view(B, K)
