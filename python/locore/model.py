"""The LoCoRE model: sequence assembly (SPEC section 2), encoder (section 3), image scores (section 4).

    model = LoCoRe.from_pretrained("locore_base.safetensors")            # or LoCoRe.preset("base")
    scores = model.score(query_local, query_scales, query_mask,
                         gallery_local, gallery_scales, gallery_mask)    # [B, K]

Fast-path choices (none changes what is computed):
* the five projections that run over every token (q, k, v, k_global, v_global) share one [5H, H]
  weight: one GEMM on CUDA, five GEMMs into one contiguous buffer on CPU (what the C++ kernel reads);
  the global query runs over the gathered global tokens only;
* the attention layout (global-token list, band keys) is built once per forward and shared by every
  layer; attention itself is ``locore_kernels.attention_with_layout`` (Triton on CUDA, C++ on CPU);
* bias + GELU and bias + residual + LayerNorm are fused Triton epilogues on CUDA;
* in the last layer only the rows a score mode reads need queries, attention, the out-projection,
  the FFN and the classifier (``max-start`` / ``max-end``: K non-global rows, so no global
  projections either); k and v are still computed for every token;
* CPU: safetensors read tensor by tensor, FFN in row chunks, glibc's mmap threshold pinned (peak RSS);
* fp32 models run with TF32 off ("exact"); bf16/fp16 models keep softmax and LayerNorm in fp32;
* ``score(..., cuda_graph=True)`` replays one captured CUDA graph per input shape.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from locore_kernels import (BACKENDS, AttentionLayout, attention_rows, attention_with_layout, bias_gelu,
                            bias_residual_layernorm, build_layout)

from .checkpoint import (check_keys, dropped_layer_prefixes, infer_config, load_into, open_checkpoint)
from .config import LoCoReConfig, ProjectionConfig, apply_overrides, preset_config

MODES = ("max-start", "max-end", "max-sum", "max-prod")
ArrayLike = Union[Tensor, np.ndarray]
AttentionFn = Callable[..., Tensor]  # fn(q, k, v, q_global_gathered, k_global, v_global, layout) -> [B, N, H, D]

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}


def as_dtype(dtype: Union[None, str, torch.dtype]) -> torch.dtype:
    """None -> float32; a floating torch.dtype or a name like "bfloat16" / "bf16" / "torch.float16"."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        key = dtype.lower().removeprefix("torch.")
        if key not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(_DTYPES)}")
        return _DTYPES[key]
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    raise ValueError(f"dtype must be a floating torch.dtype or its name, got {dtype!r}")


def as_device(device: Union[None, str, torch.device]) -> torch.device:
    """None -> CUDA when available, else CPU; strings like "cuda", "cuda:1", "cpu"."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"invalid device {device!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but CUDA is not available to torch")
    return device


def make_projection(p: ProjectionConfig, in_dim: int, hidden: int) -> nn.Module:
    """``local_to_lm`` / ``global_to_lm`` (module indices match the reference key names)."""
    if p.kind == "identity":
        return nn.Identity()
    if p.kind == "linear":
        return nn.Linear(in_dim, hidden, bias=p.bias)
    act = {None: [], "relu": [nn.ReLU()], "gelu": [nn.GELU()], "tanh": [nn.Tanh()]}[p.activation]
    return nn.Sequential(nn.Linear(in_dim, p.bottleneck_dim, bias=p.bias), *act,
                         nn.Linear(p.bottleneck_dim, hidden, bias=p.bias))


@functools.lru_cache(maxsize=None)
def _pin_malloc_mmap_threshold(nbytes: int = 4 << 20) -> None:
    """glibc serves allocations above a threshold with mmap and returns them to the OS on free; by
    default that threshold grows (up to 32 MB) each time such a block is freed, after which the CPU
    forward's 5-60 MB activations land on the heap and stay resident once freed (~100 MB of peak RSS
    at N = 5050). Pinning it at 4 MB keeps freed activations out of the resident set. Once per process,
    glibc only; elsewhere a no-op."""
    try:
        import ctypes

        ctypes.CDLL(None).mallopt(-3, nbytes)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


# ---------------------------------------------------------------------------------------------
# Encoder

class EncoderLayer(nn.Module):
    """Post-LayerNorm Longformer layer (SPEC section 3) with the projections fused."""

    def __init__(self, cfg: LoCoReConfig):
        super().__init__()
        H, I, eps = cfg.hidden, cfg.intermediate, cfg.layer_norm_eps
        self.heads = cfg.num_attention_heads
        self.qkv = nn.Linear(H, 5 * H)  # rows: query | key | value | key_global | value_global
        self.query_global = nn.Linear(H, H)
        self.out = nn.Linear(H, H)
        self.ln1 = nn.LayerNorm(H, eps=eps)
        self.ff1 = nn.Linear(H, I)
        self.ff2 = nn.Linear(I, H)
        self.ln2 = nn.LayerNorm(H, eps=eps)
        self.ffn_chunk_rows = 1024  # on CPU the FFN runs in row chunks: a [1024, I] intermediate, not [N, I]

    def project(self, x: Tensor) -> list[Tensor]:
        """q, k, v, k_global, v_global of every token, each [B, N, heads, head_dim].

        CUDA: one [H -> 5H] GEMM, the five are strided views of it (the Triton kernel takes strides).
        CPU: the same weight, written block by block into one [5, B, N, H] buffer, so the five come out
        contiguous and the C++ kernel reads them without copies.
        """
        B, N, H = x.shape
        if x.is_cuda:
            return list(F.linear(x, self.qkv.weight, self.qkv.bias).view(B, N, 5, self.heads, -1).unbind(2))
        out = x.new_empty(5, B * N, H)
        x2 = x.reshape(B * N, H)
        for i in range(5):
            torch.addmm(self.qkv.bias[i * H:(i + 1) * H], x2, self.qkv.weight[i * H:(i + 1) * H].T, out=out[i])
        return list(out.view(5, B, N, self.heads, -1).unbind(0))

    def forward(self, x: Tensor, layout: AttentionLayout, attend: AttentionFn) -> Tensor:
        B, N, H = x.shape
        q, k, v, kg, vg = self.project(x)
        qg = F.linear(layout.gather_global(x), self.query_global.weight, self.query_global.bias)
        a = attend(q, k, v, qg.view(B, -1, self.heads, H // self.heads), kg, vg, layout)
        del q, k, v, kg, vg, qg  # the [5, B, N, H] projections are dead: free them before the FFN
        h1 = self.post_attention(a.reshape(B, N, H), x)
        del a
        return self.feed_forward(h1)

    def forward_rows(self, x: Tensor, layout: AttentionLayout, rows: Tensor) -> Tensor:
        """Hidden states of ``rows`` only (non-global tokens): the last layer of a score that reads only them."""
        B, N, H = x.shape
        w, b = self.qkv.weight, self.qkv.bias
        k, v = F.linear(x, w[H:3 * H], b[H:3 * H]).view(B, N, 2, self.heads, -1).unbind(2)
        xr = x[:, rows]
        q = F.linear(xr, w[:H], b[:H]).view(B, -1, self.heads, H // self.heads)
        # O(len(rows) * N) dense rule on the read rows: same math as the attention op on those rows
        a = attention_rows(q, k, v, rows, layout)
        return self.feed_forward(self.post_attention(a.reshape(xr.shape), xr))

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


# ---------------------------------------------------------------------------------------------
# Inputs

@dataclass
class Batch:
    """Validated inputs on the model's device: images = query then its K gallery images."""

    local: Tensor             # [B, 1 + K, S, D] model dtype
    scales: Tensor            # [B, 1 + K, S] int64
    padding: Tensor           # [B, 1 + K, S] bool, True = padding
    glob: Optional[Tensor]    # [B, 1 + K, Dg] model dtype, or None: no global token

    @property
    def K(self) -> int:
        return self.local.shape[1] - 1

    @property
    def T(self) -> int:  # tokens per image
        return self.local.shape[2] + 1 + (self.glob is not None)

    @property
    def N(self) -> int:
        return (1 + self.K) * self.T


def _tensor(name: str, x: Any) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach()
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    raise ValueError(f"{name} must be a torch.Tensor or a numpy array, got {type(x).__name__}")


def _check_shape(name: str, t: Tensor, shape: tuple, what: str) -> None:
    if t.dim() != len(shape) or any(s is not None and a != s for a, s in zip(t.shape, shape)):
        dims = ", ".join("?" if s is None else str(s) for s in shape)
        raise ValueError(f"{name} must have shape {what} = [{dims}], got {list(t.shape)}")


def _descriptors(name: str, t: Tensor) -> Tensor:
    if not t.is_floating_point():
        raise ValueError(f"{name} must be floating point, got dtype {t.dtype}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return t


def _scale_indices(name: str, t: Tensor, num_scales: int) -> Tensor:
    if t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{name} must hold integer scale indices, got dtype {t.dtype}")
    if t.is_floating_point():  # AMES files store the scale column as float
        if not bool((t == t.round()).all()):
            raise ValueError(f"{name} must hold integer scale indices, got non-integer values")
    t = t.long()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_scales):
        raise ValueError(f"{name} values must lie in 0..{num_scales - 1} (the checkpoint has {num_scales} "
                         f"scales), got range {int(t.min())}..{int(t.max())}")
    return t


def _padding_mask(name: str, t: Tensor) -> Tensor:
    if t.dtype != torch.bool:
        if t.is_complex() or not bool(((t == 0) | (t == 1)).all()):
            raise ValueError(f"{name} must be 0/1 or bool (1 = padding, the AMES convention)")
        t = t != 0
    return t


# ---------------------------------------------------------------------------------------------
# Model

class LoCoRe(nn.Module):
    """LoCoRE re-ranker: descriptors of a query and its shortlist in, per-image scores out."""

    def __init__(self, config: LoCoReConfig):
        super().__init__()
        cfg = self.config = config
        H = cfg.hidden
        self.local_to_lm = make_projection(cfg.local_projection, cfg.local_dim, H)
        self.global_to_lm = (make_projection(cfg.global_projection, cfg.global_dim, H)
                             if cfg.global_dim is not None else None)
        self.scale_embedding = nn.Parameter(torch.empty(cfg.num_scales, H))
        self.sep_embedding = nn.Parameter(torch.empty(H))
        # The reference pads sequences to a multiple of the window with this; padding changes no valid
        # token, so the engine never pads. Kept so that checkpoints round-trip.
        self.register_buffer("pad_embedding", torch.empty(H))
        self.position_embeddings = nn.Parameter(torch.empty(cfg.max_position_embeddings, H))
        self.token_type_embeddings = nn.Parameter(torch.empty(cfg.type_vocab_size, H))
        self.embed_ln = nn.LayerNorm(H, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_layers))
        self.classifier = nn.Linear(H, 2)
        self.prune_last_layer = True   # last layer on the read rows only (max-start / max-end)
        self.allow_tf32 = False        # fp32 on CUDA is "exact" unless this is set
        self._attend: AttentionFn = functools.partial(attention_with_layout, backend=None)
        self._graphs: dict[tuple, _CapturedScore] = {}

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def _empty(cls, cfg: LoCoReConfig, device: Any, dtype: Any) -> "LoCoRe":
        device, dtype = as_device(device), as_dtype(dtype)
        with torch.device("meta"):
            model = cls(cfg).to(dtype=dtype)
        if device.type == "cpu":
            _pin_malloc_mmap_threshold()
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
        """The attention op: a backend name of ``attention_with_layout`` ("triton" | "cpu" | "reference" |
        None = best for the device) or a callable fn(q, k, v, q_global_gathered, k_global, v_global, layout)."""
        if callable(attention):
            self._attend = attention
        elif attention is None or attention in BACKENDS:
            self._attend = functools.partial(attention_with_layout, backend=attention)
        else:
            raise ValueError(f"attention must be one of {BACKENDS}, None or a callable, got {attention!r}")
        self._graphs.clear()
        return self

    # -- inputs --------------------------------------------------------------------------------

    def prepare(self, query_local: ArrayLike, query_scales: ArrayLike, query_mask: ArrayLike,
                gallery_local: ArrayLike, gallery_scales: ArrayLike, gallery_mask: ArrayLike,
                query_global: Optional[ArrayLike] = None, gallery_global: Optional[ArrayLike] = None) -> Batch:
        """Validate the inputs (AMES layout, mask 1 = padding) and move them to the model's device/dtype."""
        cfg = self.config
        ql, qs, qm = (_tensor(n, x) for n, x in (("query_local", query_local), ("query_scales", query_scales),
                                                  ("query_mask", query_mask)))
        gl, gs, gm = (_tensor(n, x) for n, x in (("gallery_local", gallery_local),
                                                  ("gallery_scales", gallery_scales), ("gallery_mask", gallery_mask)))
        _check_shape("query_local", ql, (None, None, cfg.local_dim), "[B, S, D_local]")
        B, S = ql.shape[:2]
        _check_shape("gallery_local", gl, (B, None, S, cfg.local_dim), "[B, K, S, D_local]")
        K = gl.shape[1]
        if B < 1 or K < 1 or S < 1:
            raise ValueError(f"need B >= 1 queries, K >= 1 gallery images and S >= 1 slots, got B={B} K={K} S={S}")
        _check_shape("query_scales", qs, (B, S), "[B, S]")
        _check_shape("query_mask", qm, (B, S), "[B, S]")
        _check_shape("gallery_scales", gs, (B, K, S), "[B, K, S]")
        _check_shape("gallery_mask", gm, (B, K, S), "[B, K, S]")
        local = torch.cat([_descriptors("query_local", ql).to(self.device, self.dtype)[:, None],
                           _descriptors("gallery_local", gl).to(self.device, self.dtype)], dim=1)
        scales = torch.cat([_scale_indices("query_scales", qs, cfg.num_scales).to(self.device)[:, None],
                            _scale_indices("gallery_scales", gs, cfg.num_scales).to(self.device)], dim=1)
        padding = torch.cat([_padding_mask("query_mask", qm).to(self.device)[:, None],
                             _padding_mask("gallery_mask", gm).to(self.device)], dim=1)
        glob = None
        if (query_global is None) != (gallery_global is None):
            raise ValueError("give both query_global and gallery_global, or neither")
        if query_global is not None:
            if cfg.global_dim is None:
                raise ValueError("this model takes no global descriptors (config.global_dim is None)")
            qg, gg = _tensor("query_global", query_global), _tensor("gallery_global", gallery_global)
            _check_shape("query_global", qg, (B, cfg.global_dim), "[B, D_global]")
            _check_shape("gallery_global", gg, (B, K, cfg.global_dim), "[B, K, D_global]")
            glob = torch.cat([_descriptors("query_global", qg).to(self.device, self.dtype)[:, None],
                              _descriptors("gallery_global", gg).to(self.device, self.dtype)], dim=1)
        batch = Batch(local, scales, padding, glob)
        limit = cfg.max_position_embeddings - 2
        if batch.N > limit:
            raise ValueError(f"sequence of {batch.N} tokens ((1 + K) * T = {1 + K} * {batch.T}) is longer than "
                             f"the position table allows ({cfg.max_position_embeddings} - 2 = {limit}); "
                             "score a shorter shortlist, or in sliding windows")
        return batch

    # -- forward pieces ------------------------------------------------------------------------

    def embed(self, batch: Batch) -> Tensor:
        """LayerNorm(token + position[2 + index] + token_type[0]) for [global] locals [SEP] per image (SPEC 2)."""
        cfg = self.config
        B, I, S, _ = batch.local.shape
        H, T, first = cfg.hidden, batch.T, int(batch.glob is not None)
        x = batch.local.new_empty(B, I, T, H)  # filled in place: one [B, N, H] buffer, few temporaries
        if batch.glob is not None:
            x[:, :, 0] = self._project(self.global_to_lm, batch.glob)
        locals_ = x[:, :, first:first + S]
        locals_.copy_(self._project(self.local_to_lm, batch.local))
        locals_ += self.scale_embedding[batch.scales]
        x[:, :, T - 1] = self.sep_embedding
        x = x.view(B, batch.N, H)
        x += self.position_embeddings[2:2 + batch.N]
        x += self.token_type_embeddings[0]
        return F.layer_norm(x, (H,), self.embed_ln.weight, self.embed_ln.bias, self.embed_ln.eps)

    def _project(self, proj: nn.Module, desc: Tensor) -> Tensor:
        out = proj(desc)
        return F.normalize(out, dim=-1) if self.config.l2_normalize else out

    def masks(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """(is_global, key_padding), bool [B, N]: every [SEP] is global, and with query_global_attention
        the query block's first T-1 tokens too; a padded token is never global."""
        B, I, S = batch.padding.shape
        T = batch.T
        always = batch.padding.new_zeros(B, I, 1)
        key_padding = torch.cat([always] * (batch.glob is not None) + [batch.padding, always], dim=2)
        is_global = torch.zeros_like(key_padding)
        is_global[:, :, T - 1] = True
        if self.config.query_global_attention:
            is_global[:, 0, :T - 1] = ~key_padding[:, 0, :T - 1]
        return is_global.reshape(B, -1), key_padding.reshape(B, -1)

    def build_layout(self, batch: Batch) -> AttentionLayout:
        return build_layout(*self.masks(batch), self.config.one_sided_window)

    def encode(self, x: Tensor, layout: AttentionLayout, rows: Optional[Tensor] = None) -> Tensor:
        """Encoder + classifier: logits [B, N, 2], or [B, len(rows), 2] for non-global ``rows`` only."""
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer.forward_rows(x, layout, rows) if (rows is not None and i == last) \
                else layer(x, layout, self._attend)
        return F.linear(x, self.classifier.weight, self.classifier.bias)

    @staticmethod
    def score_columns(mode: str, T: int) -> range:
        """Token columns of a gallery block that a score mode reads (the [SEP] column T-1 never)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        return {"max-start": range(0, 1), "max-end": range(T - 2, T - 1)}.get(mode, range(0, T - 1))

    def _scores(self, batch: Batch, layout: AttentionLayout, mode: str, softmax: bool) -> Tensor:
        K, T = batch.K, batch.T
        cols = self.score_columns(mode, T)
        # positions of the read tokens, built on the device (no host copy: this runs inside CUDA graph captures)
        rows = (torch.arange(1, K + 1, device=self.device)[:, None] * T
                + torch.arange(cols.start, cols.stop, device=self.device)).reshape(-1)
        prune = self.prune_last_layer and 4 * len(rows) <= batch.N  # max-start / max-end
        logits = self.encode(self.embed(batch), layout, rows if prune else None)
        if not prune:
            logits = logits[:, rows]
        return image_scores(logits.reshape(logits.shape[0], K, len(cols), 2), mode, softmax)

    @contextlib.contextmanager
    def _precision(self):
        """fp32 on CUDA without TF32 (the "exact" mode) unless ``allow_tf32``; inference mode."""
        exact = self.device.type == "cuda" and self.dtype == torch.float32 and not self.allow_tf32
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        try:
            if exact:
                torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
            with torch.inference_mode():
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
        self.score_columns(mode, 2)  # validates mode
        batch = self.prepare(query_local, query_scales, query_mask, gallery_local, gallery_scales, gallery_mask,
                             query_global, gallery_global)
        with self._precision():
            layout = self.build_layout(batch)
            if not cuda_graph:
                return self._scores(batch, layout, mode, bool(softmax))
            if self.device.type != "cuda":
                raise ValueError("cuda_graph=True needs a model on a CUDA device")
            # everything fixed at capture time is in the key, so a changed setting never replays a stale graph
            key = (tuple(batch.local.shape), batch.glob is not None, mode, bool(softmax), layout.max_global,
                   self.prune_last_layer, self.allow_tf32, self.device, self.dtype, self._attend)
            if key not in self._graphs:
                if len(self._graphs) >= 8:
                    self._graphs.clear()
                self._graphs[key] = _CapturedScore(self, batch, layout, mode, bool(softmax))
            return self._graphs[key](batch, layout)


def image_scores(logits: Tensor, mode: str, softmax: bool) -> Tensor:
    """logits [B, K, C, 2] of the columns ``LoCoRe.score_columns(mode, T)`` -> scores [B, K]."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    match = torch.softmax(logits, dim=-1)[..., 1] if softmax else logits[..., 1]
    if mode == "max-sum":
        return match.sum(-1)
    if mode == "max-prod":
        return match.prod(-1)
    return match[..., 0]  # max-start / max-end: the one column read


class _CapturedScore:
    """``LoCoRe._scores`` for one input shape, captured in a CUDA graph and replayed on new inputs.

    The masks change from call to call (query padding changes the global tokens), so the layout is
    rebuilt outside the graph and copied into the captured layout's tensors; the number of global
    tokens is part of the cache key.
    """

    def __init__(self, model: LoCoRe, batch: Batch, layout: AttentionLayout, mode: str, softmax: bool):
        self.batch = Batch(*(None if t is None else t.clone() for t in _fields(batch)))
        self.layout = dataclasses.replace(layout, **{f: getattr(layout, f).clone() for f in _LAYOUT_TENSORS})
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: Triton autotuning and cuBLAS handles outside the capture
            for _ in range(2):
                model._scores(self.batch, self.layout, mode, softmax)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: other threads' CUDA calls (rerank's descriptor loader copying the next batch to
        # the device, a cudaMalloc among them) must not invalidate the capture, as "global" mode lets them
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.out = model._scores(self.batch, self.layout, mode, softmax)

    def __call__(self, batch: Batch, layout: AttentionLayout) -> Tensor:
        for dst, src in zip(_fields(self.batch), _fields(batch)):
            if dst is not None:
                dst.copy_(src)
        for f in _LAYOUT_TENSORS:
            getattr(self.layout, f).copy_(getattr(layout, f))
        self.graph.replay()
        return self.out.clone()


_LAYOUT_TENSORS = ("is_global", "key_padding", "band_key", "global_idx", "num_global")


def _fields(obj: Any) -> list:
    """A dataclass's field values, not copied (``dataclasses.astuple`` deep-copies tensors)."""
    return [getattr(obj, f.name) for f in dataclasses.fields(obj)]
