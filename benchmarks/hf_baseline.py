"""The library Longformer (transformers) with LoCoRE's sequence assembly and scores around it.

Two uses, never the engine's runtime path:
* the parity oracle of the tests: transformers' ``LongformerModel`` run in float64, fed by a plain
  implementation of SPEC sections 2 and 4 written independently of ``model.py`` (loops over images,
  the state dict read by its SPEC key names);
* the baseline of the benchmarks (same weights, fp32).

transformers is imported inside the functions, so importing this module costs nothing.
"""
from __future__ import annotations

import contextlib
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from locore.config import LoCoReConfig

LM = "language_model.longformer."


def random_reference_state_dict(cfg: LoCoReConfig, seed: int = 0) -> dict[str, Tensor]:
    """A random checkpoint in the reference layout (SPEC section 5), fp32, scaled like trained weights:
    matrices ~ N(0, 1/fan_in), biases ~ N(0, 0.02^2), LayerNorm ~ 1 + N(0, 0.05^2), embeddings ~ N(0, 0.1^2)."""
    g = torch.Generator().manual_seed(seed)
    H, I = cfg.hidden, cfg.intermediate
    sd: dict[str, Tensor] = {}

    def randn(*shape: int, std: float, mean: float = 0.0) -> Tensor:
        return torch.randn(shape, generator=g) * std + mean

    def linear(name: str, out_dim: int, in_dim: int, bias: bool = True) -> None:
        sd[name + ".weight"] = randn(out_dim, in_dim, std=in_dim ** -0.5)
        if bias:
            sd[name + ".bias"] = randn(out_dim, std=0.02)

    def layer_norm(name: str) -> None:
        sd[name + ".weight"] = randn(H, std=0.05, mean=1.0)
        sd[name + ".bias"] = randn(H, std=0.02)

    sd[LM + "sep_embedding"] = randn(H, std=0.1)
    sd[LM + "pad_embedding"] = randn(H, std=0.1)
    sd[LM + "embeddings.position_embeddings.weight"] = randn(cfg.max_position_embeddings, H, std=0.1)
    sd[LM + "embeddings.token_type_embeddings.weight"] = randn(cfg.type_vocab_size, H, std=0.1)
    layer_norm(LM + "embeddings.LayerNorm")
    for i in range(cfg.num_layers):
        p = f"{LM}encoder.layer.{i}."
        for name in ("query", "key", "value", "query_global", "key_global", "value_global"):
            linear(p + "attention.self." + name, H, H)
        linear(p + "attention.output.dense", H, H)
        layer_norm(p + "attention.output.LayerNorm")
        linear(p + "intermediate.dense", I, H)
        linear(p + "output.dense", H, I)
        layer_norm(p + "output.LayerNorm")
    linear("language_model.classifier", 2, H)
    sd["scale_encoder.weight"] = randn(cfg.num_scales, H, std=0.1)
    projections = [("local_to_lm", cfg.local_projection, cfg.local_dim)]
    if cfg.global_dim is not None:
        projections.append(("global_to_lm", cfg.global_projection, cfg.global_dim))
    for name, proj, dim in projections:
        if proj.kind == "linear":
            linear(name, H, dim, proj.bias)
        elif proj.kind == "bottleneck":
            linear(name + ".0", proj.bottleneck_dim, dim, proj.bias)
            linear(name + (".2" if proj.activation else ".1"), H, proj.bottleneck_dim, proj.bias)
    return sd


def build_hf_longformer(state_dict: dict[str, Tensor], cfg: LoCoReConfig, dtype: torch.dtype = torch.float64):
    """transformers' ``LongformerModel`` (no pooler) holding the checkpoint's encoder, in ``dtype``.

    Uses cfg's heads, window, eps and num_layers (layers past it are left out). The word embeddings
    exist only for the padding the library adds up to a multiple of the window: row 1 (the pad
    token) is the checkpoint's ``pad_embedding``; padded positions are masked and change nothing.
    """
    from transformers import LongformerConfig, LongformerModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the padding warning is expected
    H = cfg.hidden
    hf_cfg = LongformerConfig(
        hidden_size=H, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate, max_position_embeddings=cfg.max_position_embeddings,
        type_vocab_size=cfg.type_vocab_size, attention_window=cfg.attention_window,
        layer_norm_eps=cfg.layer_norm_eps, hidden_act="gelu", hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, vocab_size=2, pad_token_id=1, bos_token_id=0, eos_token_id=0,
        sep_token_id=0)
    model = LongformerModel(hf_cfg, add_pooling_layer=False)
    hf_sd = {"embeddings.word_embeddings.weight": torch.stack([torch.zeros(H), state_dict[LM + "pad_embedding"]])}
    for k, v in state_dict.items():
        if not k.startswith(LM + "e"):  # embeddings.* and encoder.*
            continue
        name = k[len(LM):]
        if name.startswith("encoder.layer.") and int(name.split(".")[2]) >= cfg.num_layers:
            continue
        hf_sd[name] = v
    model.load_state_dict(hf_sd, strict=True)
    return model.to(dtype).eval()


@contextlib.contextmanager
def _softmax_keeps_float64():
    """transformers' Longformer casts its attention softmax to float32 (``dtype=torch.float32``); a
    float64 oracle needs it in float64, so the module's ``nn.functional.softmax`` ignores that cast
    for float64 inputs while this context is open."""
    from transformers.models.longformer import modeling_longformer as ml

    class _Functional:
        def __getattr__(self, name: str) -> Any:
            return getattr(torch.nn.functional, name)

        @staticmethod
        def softmax(x: Tensor, dim: Optional[int] = None, dtype: Optional[torch.dtype] = None, **kw: Any) -> Tensor:
            return torch.nn.functional.softmax(x, dim=dim, dtype=None if x.dtype == torch.float64 else dtype, **kw)

    class _NN:
        functional = _Functional()

        def __getattr__(self, name: str) -> Any:
            return getattr(torch.nn, name)

    saved = ml.nn
    ml.nn = _NN()
    try:
        yield
    finally:
        ml.nn = saved


def _np(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


def _project(sd: dict[str, Tensor], name: str, x: Tensor, activation: Optional[str]) -> Tensor:
    """local_to_lm / global_to_lm read from the state dict: identity, Linear, or Linear [act] Linear."""
    def lin(p: str, t: Tensor) -> Tensor:
        out = t @ sd[p + ".weight"].to(t.dtype).T
        return out + sd[p + ".bias"].to(t.dtype) if p + ".bias" in sd else out

    if name + ".weight" in sd:
        return lin(name, x)
    if name + ".0.weight" not in sd:
        return x
    h = lin(name + ".0", x)
    if name + ".2.weight" in sd:
        h = {"relu": torch.relu, "gelu": torch.nn.functional.gelu, "tanh": torch.tanh}[activation](h)
        return lin(name + ".2", h)
    return lin(name + ".1", h)


def hf_logits(hf_model, state_dict: dict[str, Tensor], cfg: LoCoReConfig,
              query_local, query_scales, query_mask, gallery_local, gallery_scales, gallery_mask,
              query_global=None, gallery_global=None) -> Tensor:
    """Per-token logits [B, N, 2] in the model's dtype: SPEC section 2 assembled image by image."""
    dt = next(hf_model.parameters()).dtype
    sd = state_dict
    ql, qs, qm = _np(query_local), _np(query_scales), _np(query_mask)
    gl, gs, gm = _np(gallery_local), _np(gallery_scales), _np(gallery_mask)
    with_global = query_global is not None
    B, K, S = gl.shape[:3]
    T = S + 1 + int(with_global)
    N = (1 + K) * T
    sep = sd[LM + "sep_embedding"].to(dt)
    scale_table = sd["scale_encoder.weight"].to(dt)
    local_act = cfg.local_projection.activation
    global_act = cfg.global_projection.activation

    embeds = torch.zeros(B, N, cfg.hidden, dtype=dt)
    valid = torch.zeros(B, N, dtype=torch.long)
    glob_attn = torch.zeros(B, N, dtype=torch.long)
    for b in range(B):
        for img in range(1 + K):
            desc = torch.as_tensor(ql[b] if img == 0 else gl[b, img - 1], dtype=dt)
            scales = torch.as_tensor(qs[b] if img == 0 else gs[b, img - 1]).long()
            padded = torch.as_tensor(qm[b] if img == 0 else gm[b, img - 1]) != 0
            tokens = _project(sd, "local_to_lm", desc, local_act)
            if cfg.l2_normalize:
                tokens = tokens / tokens.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            tokens = tokens + scale_table[scales]
            is_valid = [not bool(p) for p in padded]
            rows = [tokens[s] for s in range(S)]
            if with_global:
                gdesc = torch.as_tensor(_np(query_global)[b] if img == 0 else _np(gallery_global)[b, img - 1], dtype=dt)
                gtok = _project(sd, "global_to_lm", gdesc, global_act)
                if cfg.l2_normalize:
                    gtok = gtok / gtok.norm().clamp_min(1e-12)
                rows = [gtok] + rows
                is_valid = [True] + is_valid
            rows.append(sep)
            is_valid.append(True)
            start = img * T
            for t in range(T):
                embeds[b, start + t] = rows[t]
                valid[b, start + t] = int(is_valid[t])
                is_sep = t == T - 1
                query_token = img == 0 and t < T - 1 and cfg.query_global_attention
                glob_attn[b, start + t] = int(is_valid[t] and (is_sep or query_token))

    position_ids = (2 + torch.arange(N)).expand(B, N)
    with (_softmax_keeps_float64() if dt == torch.float64 else contextlib.nullcontext()), torch.no_grad():
        hidden = hf_model(inputs_embeds=embeds, attention_mask=valid, global_attention_mask=glob_attn,
                          position_ids=position_ids, token_type_ids=torch.zeros(B, N, dtype=torch.long)
                          ).last_hidden_state
        return hidden @ sd["language_model.classifier.weight"].to(dt).T + sd["language_model.classifier.bias"].to(dt)


def scores_from_logits(logits: Tensor, K: int, T: int, mode: str, softmax: bool = False) -> Tensor:
    """SPEC section 4: [B, N, 2] per-token logits -> [B, K] image scores."""
    B = logits.shape[0]
    per_image = logits.reshape(B, 1 + K, T, 2)[:, 1:, :T - 1]       # drop the query block and [SEP]
    if softmax:
        match = torch.exp(per_image[..., 1]) / torch.exp(per_image).sum(-1)
    else:
        match = per_image[..., 1]
    if mode == "max-start":
        return match[:, :, 0]
    if mode == "max-end":
        return match[:, :, -1]
    if mode == "max-sum":
        return match.sum(-1)
    if mode == "max-prod":
        return match.prod(-1)
    raise ValueError(f"unknown mode {mode!r}")


def hf_score(hf_model, state_dict: dict[str, Tensor], cfg: LoCoReConfig,
             query_local, query_scales, query_mask, gallery_local, gallery_scales, gallery_mask,
             query_global=None, gallery_global=None, mode: str = "max-end", softmax: bool = False) -> Tensor:
    """Scores [B, K] of the library Longformer on LoCoRE's sequence (see ``hf_logits``)."""
    logits = hf_logits(hf_model, state_dict, cfg, query_local, query_scales, query_mask,
                       gallery_local, gallery_scales, gallery_mask, query_global, gallery_global)
    K, S = _np(gallery_mask).shape[1:]
    return scores_from_logits(logits, K, S + 1 + int(query_global is not None), mode, softmax)
