"""The attention ops as ``torch.library`` custom ops (namespace ``locore``), so ``torch.compile`` traces
through them without graph breaks: each op has a real implementation (the named backend of the
registry) and a fake one (output shape and dtype only, for tracing).

The layout travels as its tensors plus the window, never as the dataclass (ops take tensors and
scalars only). The backend is resolved by the caller (``ops``) and passed by name.

An autograd formula can be attached later with ``torch.library.register_autograd("locore::attention",
backward, setup_context=...)`` from its own module; nothing here needs to change for it.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .backends import REGISTRY
from .layout import AttentionLayout


def layout_from_tensors(is_global: Tensor, key_padding: Tensor, band_key: Tensor, global_idx: Tensor,
                        num_global: Tensor, one_sided_window: int) -> AttentionLayout:
    return AttentionLayout(is_global=is_global, key_padding=key_padding, band_key=band_key,
                           global_idx=global_idx, num_global=num_global, max_global=global_idx.shape[1],
                           one_sided_window=one_sided_window)


def layout_tensors(layout: AttentionLayout) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The op arguments that carry ``layout`` (followed by ``layout.one_sided_window``)."""
    return layout.is_global, layout.key_padding, layout.band_key, layout.global_idx, layout.num_global


@torch.library.custom_op("locore::attention", mutates_args=())
def attention_op(q: Tensor, k: Tensor, v: Tensor, q_global_gathered: Tensor, k_global: Tensor, v_global: Tensor,
                 is_global: Tensor, key_padding: Tensor, band_key: Tensor, global_idx: Tensor, num_global: Tensor,
                 one_sided_window: int, backend: str) -> Tensor:
    """Every row: [B, N, H, D] in q's dtype (see ``ops.attention_with_layout``)."""
    layout = layout_from_tensors(is_global, key_padding, band_key, global_idx, num_global, one_sided_window)
    out = REGISTRY[backend].attention(q, k, v, q_global_gathered, k_global, v_global, layout)
    return out.contiguous()


@attention_op.register_fake
def _attention_fake(q, k, v, q_global_gathered, k_global, v_global, is_global, key_padding, band_key,
                    global_idx, num_global, one_sided_window, backend):
    return q.new_empty(q.shape)


@torch.library.custom_op("locore::attention_rows", mutates_args=())
def attention_rows_op(q_rows: Tensor, k: Tensor, v: Tensor, rows: Tensor,
                      is_global: Tensor, key_padding: Tensor, band_key: Tensor, global_idx: Tensor,
                      num_global: Tensor, one_sided_window: int, backend: str) -> Tensor:
    """The non-global rule for ``rows`` only: [B, R, H, D] in q_rows' dtype (see ``ops.attention_rows``)."""
    layout = layout_from_tensors(is_global, key_padding, band_key, global_idx, num_global, one_sided_window)
    out = REGISTRY[backend].rows(q_rows, k, v, rows, layout)
    return out.contiguous()


@attention_rows_op.register_fake
def _attention_rows_fake(q_rows, k, v, rows, is_global, key_padding, band_key, global_idx, num_global,
                         one_sided_window, backend):
    return q_rows.new_empty(q_rows.shape)
