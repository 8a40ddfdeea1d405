"""The LoCoRE model: a short facade over sequence (SPEC section 2), encoder (section 3) and scoring (section 4).

    model = LoCoRe.from_pretrained("locore_base.safetensors")            # or LoCoRe.preset("base")
    scores = model.score(query_local, query_scales, query_mask,
                         gallery_local, gallery_scales, gallery_mask)    # [B, K]

Where things live: ``sequence.py`` (input validation, Batch, embedding, masks, dtype/device names),
``encoder.py`` (EncoderLayer), ``scoring.py`` (the table of score modes), ``cuda_graphs.py``.

Fast-path choices (none changes what is computed):
* the five projections that run over every token (q, k, v, k_global, v_global) share one [5C, C]
  weight: one GEMM on CUDA, five GEMMs into one contiguous buffer on CPU (what the C++ kernel reads);
  the global query runs over the gathered global tokens only;
* the attention layout (global-token list, band keys) is built once per forward and shared by every
  layer; attention itself is ``locore_kernels.attention_with_layout`` (Triton on CUDA, C++ on CPU);
* bias + GELU and bias + residual + LayerNorm are fused Triton epilogues on CUDA;
* in the last layer only the rows a score mode reads need queries, attention, the out-projection,
  the FFN and the classifier (``max-start`` / ``max-end``: K non-global rows, so no global
  projections either; ``locore_kernels.attention_rows``); k and v are still computed for every token;
* CPU: safetensors read tensor by tensor, FFN in row chunks, glibc's mmap threshold pinned (peak RSS);
* fp32 models run with TF32 off ("exact"); bf16/fp16 models keep softmax and LayerNorm in fp32;
* ``score(..., cuda_graph=True)`` replays one captured CUDA graph per input shape.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from locore_kernels import BACKENDS, AttentionLayout, attention_rows, attention_with_layout, build_layout

from .checkpoint import check_keys, dropped_layer_prefixes, infer_config, load_into, open_checkpoint
from .config import LoCoReConfig, apply_overrides, preset_config
from .cuda_graphs import GraphCache
from .encoder import AttentionFn, EncoderLayer, RowsAttentionFn
from .scoring import MODE_NAMES, score_mode
from .sequence import (ArrayLike, Batch, as_device, as_dtype, embed, make_projection, masks, max_global_tokens,
                       pin_malloc_mmap_threshold, prepare_batch, read_rows)

MODES = MODE_NAMES  # the score modes (names of scoring.SCORE_MODES)

__all__ = ["LoCoRe", "MODES", "Batch", "EncoderLayer", "as_device", "as_dtype", "image_scores"]


class LoCoRe(nn.Module):
    """LoCoRE re-ranker: descriptors of a query and its shortlist in, per-image scores out.

    Attribute names are the checkpoint's key names (``checkpoint.key_map``)."""

    def __init__(self, config: LoCoReConfig):
        super().__init__()
        cfg = self.config = config
        C = cfg.hidden
        self.local_to_lm = make_projection(cfg.local_projection, cfg.local_dim, C)
        self.global_to_lm = (make_projection(cfg.global_projection, cfg.global_dim, C)
                             if cfg.global_dim is not None else None)
        self.scale_embedding = nn.Parameter(torch.empty(cfg.num_scales, C))
        self.sep_embedding = nn.Parameter(torch.empty(C))
        # The reference pads sequences to a multiple of the window with this; padding changes no valid
        # token, so the engine never pads. Kept so that checkpoints round-trip.
        self.register_buffer("pad_embedding", torch.empty(C))
        self.position_embeddings = nn.Parameter(torch.empty(cfg.max_position_embeddings, C))
        self.token_type_embeddings = nn.Parameter(torch.empty(cfg.type_vocab_size, C))
        self.embed_ln = nn.LayerNorm(C, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_layers))
        self.classifier = nn.Linear(C, 2)
        self.prune_last_layer = True   # last layer on the read rows only (score modes marked prunable)
        self.allow_tf32 = False        # fp32 on CUDA is "exact" unless this is set
        self._graphs = GraphCache()
        self.set_attention(None)

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def _empty(cls, cfg: LoCoReConfig, device: Any, dtype: Any) -> "LoCoRe":
        device, dtype = as_device(device), as_dtype(dtype)
        with torch.device("meta"):
            model = cls(cfg).to(dtype=dtype)
        if device.type == "cpu":
            pin_malloc_mmap_threshold()
        model.to_empty(device=device)
        return model.requires_grad_(False).eval()

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], device: Any = None, dtype: Any = None,
                        **overrides: Any) -> "LoCoRe":
        """Load a reference-layout checkpoint (SPEC section 5): ``.safetensors``, torch ``.pt/.pth/.bin``
        (read with ``weights_only=True``), or a folder with ``model.safetensors`` + ``config.json``.

        overrides (Longformer config names): num_attention_heads, attention_window, layer_norm_eps,
        query_global_attention, num_layers (keep the first n layers); also projection_activation
        (bottleneck with an activation: relu | gelu | tanh, default relu) and l2_normalize.
        """
        src = open_checkpoint(path)
        cfg = infer_config(src.shapes, src.config_json, overrides)
        truncating = "num_layers" in overrides or "num_hidden_layers" in overrides
        entries = check_keys(cfg, src.shapes,
                             ignore=dropped_layer_prefixes(src.shapes, cfg.num_layers) if truncating else ())
        model = cls._empty(cfg, device, dtype)
        load_into(model, src, entries)
        return model

    @classmethod
    def preset(cls, name: str, device: Any = None, dtype: Any = None, seed: int = 0, **overrides: Any) -> "LoCoRe":
        """A random model of a preset size ("tiny", "small", "base"), weights scaled like trained ones.

        overrides: any LoCoReConfig field (e.g. num_layers=2, local_dim=512) or a from_pretrained override.
        """
        fields = {f.name for f in dataclasses.fields(LoCoReConfig)}
        cfg = preset_config(name).replace(**{k: v for k, v in overrides.items() if k in fields})
        cfg = apply_overrides(cfg, {k: v for k, v in overrides.items() if k not in fields})
        model = cls._empty(cfg, device, dtype)
        model.init_random(seed)
        return model

    @torch.no_grad()
    def init_random(self, seed: int = 0) -> None:
        """Linear weights ~ N(0, 1/fan_in), biases ~ N(0, 0.02^2), LayerNorm ~ 1 + N(0, 0.05^2),
        embeddings ~ N(0, 0.1^2); drawn on the CPU so every device gets the same weights."""
        g = torch.Generator().manual_seed(seed)

        def fill(t: Tensor, std: float, mean: float = 0.0) -> None:
            t.copy_(torch.randn(t.shape, generator=g) * std + mean)

        for m in self.modules():
            if isinstance(m, nn.Linear):
                fill(m.weight, m.in_features ** -0.5)
                if m.bias is not None:
                    fill(m.bias, 0.02)
            elif isinstance(m, nn.LayerNorm):
                fill(m.weight, 0.05, 1.0)
                fill(m.bias, 0.02)
        for t in (self.scale_embedding, self.sep_embedding, self.pad_embedding, self.position_embeddings,
                  self.token_type_embeddings):
            fill(t, 0.1)

    @property
    def device(self) -> torch.device:
        return self.sep_embedding.device

    @property
    def dtype(self) -> torch.dtype:
        return self.sep_embedding.dtype

    def set_attention(self, attention: Union[None, str, AttentionFn]) -> "LoCoRe":
        """The attention op of every layer, the pruned last layer included.

        A backend name ("triton" | "cpu" | "reference" | None = best for the device): every layer runs
        ``locore_kernels.attention_with_layout(..., backend=name)``, the pruned last layer
        ``locore_kernels.attention_rows(..., backend=name)`` on its read rows.
        A callable fn(q, k, v, q_global_gathered, k_global, v_global, layout) -> [B, N, heads, D]: every
        layer calls it; the pruned last layer calls it on the whole sequence and reads its rows (the
        out-projection and FFN still run on those rows only).
        """
        if callable(attention):
            self._attend: AttentionFn = attention
            self._attend_rows: Optional[RowsAttentionFn] = None
        elif attention is None or attention in BACKENDS:
            self._attend = functools.partial(attention_with_layout, backend=attention)
            self._attend_rows = functools.partial(attention_rows, backend=attention)
        else:
            raise ValueError(f"attention must be one of {BACKENDS}, None or a callable, got {attention!r}")
        self._graphs.clear()
        return self

    # -- inputs --------------------------------------------------------------------------------

    def prepare(self, query_local: ArrayLike, query_scales: ArrayLike, query_mask: ArrayLike,
                gallery_local: ArrayLike, gallery_scales: ArrayLike, gallery_mask: ArrayLike,
                query_global: Optional[ArrayLike] = None, gallery_global: Optional[ArrayLike] = None) -> Batch:
        """Validate the inputs (AMES layout, mask 1 = padding) and move them to the model's device/dtype."""
        return prepare_batch(self.config, self.device, self.dtype, query_local, query_scales, query_mask,
                             gallery_local, gallery_scales, gallery_mask, query_global, gallery_global)

    # -- forward pieces ------------------------------------------------------------------------

    def embed(self, batch: Batch) -> Tensor:
        """LayerNorm(token + position[2 + index] + token_type[0]) for [global] locals [SEP] per image (SPEC 2)."""
        return embed(self, batch)

    def masks(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """(is_global, key_padding), bool [B, N] (see ``sequence.masks``)."""
        return masks(batch, self.config.query_global_attention)

    def build_layout(self, batch: Batch) -> AttentionLayout:
        # Eager: G = the largest global-token count (one host sync). Traced by torch.compile: a bound
        # from the shapes (no value-dependent size; the kernels skip the slots past each num_global).
        bound = max_global_tokens(batch, self.config.query_global_attention) \
            if torch.compiler.is_compiling() else None
        return build_layout(*self.masks(batch), self.config.one_sided_window, max_global=bound)

    def encode(self, x: Tensor, layout: AttentionLayout, rows: Optional[Tensor] = None) -> Tensor:
        """Encoder + classifier: logits [B, N, 2], or [B, len(rows), 2] for non-global ``rows`` only."""
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer.forward_rows(x, layout, rows, self._attend_rows, self._attend) \
                if (rows is not None and i == last) else layer(x, layout, self._attend)
        return F.linear(x, self.classifier.weight, self.classifier.bias)

    @staticmethod
    def score_columns(mode: str, T: int) -> range:
        """Token columns of a gallery block that a score mode reads (the [SEP] column T-1 never)."""
        return score_mode(mode).columns(T)

    def _scores(self, batch: Batch, layout: AttentionLayout, mode: str, softmax: bool) -> Tensor:
        K, T, spec = batch.K, batch.T, score_mode(mode)
        cols = spec.columns(T)
        rows = read_rows(K, T, cols, self.device)
        prune = self.prune_last_layer and spec.prunable and 4 * len(rows) <= batch.N
        logits = self.encode(self.embed(batch), layout, rows if prune else None)
        if not prune:
            logits = logits[:, rows]
        return image_scores(logits.reshape(logits.shape[0], K, len(cols), 2), mode, softmax)

    @contextlib.contextmanager
    def _precision(self):
        """fp32 on CUDA without TF32 (the "exact" mode) unless ``allow_tf32``; inference mode (no_grad
        while torch.compile traces: its in-place buffer writes cannot run on inference tensors)."""
        exact = self.device.type == "cuda" and self.dtype == torch.float32 and not self.allow_tf32
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        try:
            if exact:
                torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
            with torch.no_grad() if torch.compiler.is_compiling() else torch.inference_mode():
                yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved

    # -- public calls --------------------------------------------------------------------------

    def forward(self, query_local: ArrayLike, query_scales: ArrayLike, query_mask: ArrayLike,
                gallery_local: ArrayLike, gallery_scales: ArrayLike, gallery_mask: ArrayLike,
                query_global: Optional[ArrayLike] = None, gallery_global: Optional[ArrayLike] = None) -> Tensor:
        """Per-token logits [B, N, 2] of the whole sequence (query block, then the K gallery blocks)."""
        batch = self.prepare(query_local, query_scales, query_mask, gallery_local, gallery_scales, gallery_mask,
                             query_global, gallery_global)
        with self._precision():
            return self.encode(self.embed(batch), self.build_layout(batch))

    def score(self, query_local: ArrayLike, query_scales: ArrayLike, query_mask: ArrayLike,
              gallery_local: ArrayLike, gallery_scales: ArrayLike, gallery_mask: ArrayLike,
              query_global: Optional[ArrayLike] = None, gallery_global: Optional[ArrayLike] = None,
              mode: str = "max-end", softmax: bool = False, cuda_graph: bool = False) -> Tensor:
        """Scores [B, K] of each query's K gallery images (SPEC section 4).

        Shapes: query_local [B, S, D], query_scales/mask [B, S], gallery_local [B, K, S, D],
        gallery_scales/mask [B, K, S], query_global [B, Dg], gallery_global [B, K, Dg]; masks
        1 = padding (AMES). mode: max-start | max-end | max-sum | max-prod; softmax: score with
        softmax(logits)[..., 1] instead of the raw match logit. cuda_graph: replay a CUDA graph
        captured once per input shape (CUDA models only). Returns float32 (float64 for fp64 models).
        """
        score_mode(mode)  # validates mode before any work
        softmax = bool(softmax)
        batch = self.prepare(query_local, query_scales, query_mask, gallery_local, gallery_scales, gallery_mask,
                             query_global, gallery_global)
        with self._precision():
            layout = self.build_layout(batch)
            if not cuda_graph:
                return self._scores(batch, layout, mode, softmax)
            if self.device.type != "cuda":
                raise ValueError("cuda_graph=True needs a model on a CUDA device")
            # everything fixed at capture time is in the key, so a changed setting never replays a stale graph
            key = (tuple(batch.local.shape), batch.glob is not None, mode, softmax, layout.max_global,
                   self.prune_last_layer, self.allow_tf32, self.device, self.dtype, self._attend)
            return self._graphs(key, lambda b, lay: self._scores(b, lay, mode, softmax), batch, layout)


def image_scores(logits: Tensor, mode: str, softmax: bool) -> Tensor:
    """logits [B, K, cols, 2] of the columns ``LoCoRe.score_columns(mode, T)`` -> scores [B, K]."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    match = torch.softmax(logits, dim=-1)[..., 1] if softmax else logits[..., 1]
    return score_mode(mode).reduce(match)
