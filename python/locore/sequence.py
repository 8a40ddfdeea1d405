"""The input sequence (SPEC section 2): validated inputs, token embeddings and the attention masks.

Per image: [global] S local tokens [SEP]; the query block first, then the K gallery blocks:
N = (1 + K) * T tokens, T = S + 1 (+ 1 with the global token). Also the dtype / device names.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Optional, Protocol, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from locore_kernels.layout import require

from .config import LoCoReConfig, ProjectionConfig

ArrayLike = Union[Tensor, np.ndarray]

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


@functools.lru_cache(maxsize=None)
def pin_malloc_mmap_threshold(nbytes: int = 4 << 20) -> None:
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
        if x.device.type == "meta":
            raise ValueError(f"{name} is a meta-device tensor (a shape without values); pass real data")
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
    require(torch.isfinite(t).all(), f"{name} contains NaN or infinite values")
    return t


def _scale_indices(name: str, t: Tensor, num_scales: int) -> Tensor:
    if t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{name} must hold integer scale indices, got dtype {t.dtype}")
    if t.is_floating_point():  # AMES files store the scale column as float
        require((t == t.round()).all(), f"{name} must hold integer scale indices, got non-integer values")
    t = t.long()
    if t.numel():
        expected = f"{name} values must lie in 0..{num_scales - 1} (the checkpoint has {num_scales} scales)"
        if torch.compiler.is_compiling():  # the range found needs host syncs: eager message only
            require(((t >= 0) & (t < num_scales)).all(), expected)
        elif int(t.min()) < 0 or int(t.max()) >= num_scales:
            raise ValueError(f"{expected}, got range {int(t.min())}..{int(t.max())}")
    return t


def _padding_mask(name: str, t: Tensor) -> Tensor:
    if t.dtype != torch.bool:
        message = f"{name} must be 0/1 or bool (1 = padding, the AMES convention)"
        if t.is_complex():
            raise ValueError(message)
        require(((t == 0) | (t == 1)).all(), message)
        t = t != 0
    return t


def prepare_batch(cfg: LoCoReConfig, device: torch.device, dtype: torch.dtype,
                  query_local: ArrayLike, query_scales: ArrayLike, query_mask: ArrayLike,
                  gallery_local: ArrayLike, gallery_scales: ArrayLike, gallery_mask: ArrayLike,
                  query_global: Optional[ArrayLike] = None, gallery_global: Optional[ArrayLike] = None) -> Batch:
    """Validate the inputs (AMES layout, mask 1 = padding) once and move them to ``device`` / ``dtype``."""
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
    local = torch.cat([_descriptors("query_local", ql).to(device, dtype)[:, None],
                       _descriptors("gallery_local", gl).to(device, dtype)], dim=1)
    scales = torch.cat([_scale_indices("query_scales", qs, cfg.num_scales).to(device)[:, None],
                        _scale_indices("gallery_scales", gs, cfg.num_scales).to(device)], dim=1)
    padding = torch.cat([_padding_mask("query_mask", qm).to(device)[:, None],
                         _padding_mask("gallery_mask", gm).to(device)], dim=1)
    glob = None
    if (query_global is None) != (gallery_global is None):
        raise ValueError("give both query_global and gallery_global, or neither")
    if query_global is not None:
        if cfg.global_dim is None:
            raise ValueError("this model takes no global descriptors (config.global_dim is None)")
        qg, gg = _tensor("query_global", query_global), _tensor("gallery_global", gallery_global)
        _check_shape("query_global", qg, (B, cfg.global_dim), "[B, D_global]")
        _check_shape("gallery_global", gg, (B, K, cfg.global_dim), "[B, K, D_global]")
        glob = torch.cat([_descriptors("query_global", qg).to(device, dtype)[:, None],
                          _descriptors("gallery_global", gg).to(device, dtype)], dim=1)
    batch = Batch(local, scales, padding, glob)
    limit = cfg.max_position_embeddings - 2
    if batch.N > limit:
        raise ValueError(f"sequence of {batch.N} tokens ((1 + K) * T = {1 + K} * {batch.T}) is longer than "
                         f"the position table allows ({cfg.max_position_embeddings} - 2 = {limit}); "
                         "score a shorter shortlist, or in sliding windows")
    return batch


# ---------------------------------------------------------------------------------------------
# Embedding and masks

def make_projection(p: ProjectionConfig, in_dim: int, hidden: int) -> nn.Module:
    """``local_to_lm`` / ``global_to_lm`` (module indices match the reference key names)."""
    if p.kind == "identity":
        return nn.Identity()
    if p.kind == "linear":
        return nn.Linear(in_dim, hidden, bias=p.bias)
    act = {None: [], "relu": [nn.ReLU()], "gelu": [nn.GELU()], "tanh": [nn.Tanh()]}[p.activation]
    return nn.Sequential(nn.Linear(in_dim, p.bottleneck_dim, bias=p.bias), *act,
                         nn.Linear(p.bottleneck_dim, hidden, bias=p.bias))


class TokenEmbeddings(Protocol):
    """The embedding weights (attributes of ``LoCoRe``: their names are the checkpoint's key names)."""

    config: LoCoReConfig
    local_to_lm: nn.Module
    global_to_lm: Optional[nn.Module]
    scale_embedding: Tensor       # [num_scales, C]
    sep_embedding: Tensor         # [C]
    position_embeddings: Tensor   # [max_position_embeddings, C]
    token_type_embeddings: Tensor  # [type_vocab_size, C]
    embed_ln: nn.LayerNorm


def embed(w: TokenEmbeddings, batch: Batch) -> Tensor:
    """LayerNorm(token + position[2 + index] + token_type[0]) for [global] locals [SEP] per image -> [B, N, C]."""
    cfg = w.config
    B, I, S, _ = batch.local.shape
    C, T, first = cfg.hidden, batch.T, int(batch.glob is not None)

    def project(proj: nn.Module, desc: Tensor) -> Tensor:
        out = proj(desc)
        return F.normalize(out, dim=-1) if cfg.l2_normalize else out

    x = batch.local.new_empty(B, I, T, C)  # filled in place: one [B, N, C] buffer, few temporaries
    if batch.glob is not None:
        x[:, :, 0] = project(w.global_to_lm, batch.glob)
    locals_ = x[:, :, first:first + S]
    locals_.copy_(project(w.local_to_lm, batch.local))
    locals_ += w.scale_embedding[batch.scales]
    x[:, :, T - 1] = w.sep_embedding
    x = x.view(B, batch.N, C)
    x += w.position_embeddings[2:2 + batch.N]
    x += w.token_type_embeddings[0]
    return F.layer_norm(x, (C,), w.embed_ln.weight, w.embed_ln.bias, w.embed_ln.eps)


def masks(batch: Batch, query_global_attention: bool) -> tuple[Tensor, Tensor]:
    """(is_global, key_padding), bool [B, N]: every [SEP] is global, and with query_global_attention
    the query block's first T-1 tokens too; a padded token is never global."""
    B, I, S = batch.padding.shape
    T = batch.T
    always = batch.padding.new_zeros(B, I, 1)
    key_padding = torch.cat([always] * (batch.glob is not None) + [batch.padding, always], dim=2)
    is_global = torch.zeros_like(key_padding)
    is_global[:, :, T - 1] = True
    if query_global_attention:
        is_global[:, 0, :T - 1] = ~key_padding[:, 0, :T - 1]
    return is_global.reshape(B, -1), key_padding.reshape(B, -1)


def max_global_tokens(batch: Batch, query_global_attention: bool) -> int:
    """The most global tokens ``masks`` can give an item, from shapes alone: every [SEP], and with
    query_global_attention the query block's T-1 other tokens (a static bound for torch.compile)."""
    return 1 + batch.K + (batch.T - 1) * query_global_attention


def read_rows(K: int, T: int, columns: range, device: torch.device) -> Tensor:
    """Sequence positions of ``columns`` of each gallery block, [K * len(columns)], built on the device
    (no host copy: this runs inside CUDA graph captures)."""
    return (torch.arange(1, K + 1, device=device)[:, None] * T
            + torch.arange(columns.start, columns.stop, device=device)).reshape(-1)
