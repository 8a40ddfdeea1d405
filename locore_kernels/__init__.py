"""Longformer sliding-window + global-token attention: Triton (GPU), C++ (CPU), dense reference.

No model knowledge lives here: the op takes projected q/k/v tensors and two boolean masks.
"""
from .layout import AttentionLayout, build_layout, scatter_global
from .epilogues import bias_gelu, bias_residual_layernorm
from .ops import BACKENDS, attention_rows, attention_with_layout, longformer_attention, resolve_backend
from .reference import longformer_attention_reference
from .autograd import register_custom_op_autograd

# The public ops are differentiable: a call that autograd records goes through torch.ops.locore.attention,
# whose backward is the flash-style kernel backward (C++ on CPU, Triton on GPU; locore_kernels.autograd).
register_custom_op_autograd("locore::attention")

__all__ = [
    "AttentionLayout", "BACKENDS", "attention_rows", "attention_with_layout", "bias_gelu",
    "bias_residual_layernorm", "build_layout", "longformer_attention",
    "longformer_attention_reference", "resolve_backend", "scatter_global",
]
