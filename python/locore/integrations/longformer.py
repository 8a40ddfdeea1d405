"""Drop-in fast attention for any transformers Longformer: ``patch_longformer(model)``.

Every ``LongformerSelfAttention`` found in ``model`` (a ``LongformerModel``, any ``LongformerFor*`` head,
the published LoCoRE wrapper, whatever wraps them) keeps its weights and its library ``forward``; the
patch puts a forward of ours in front of it, on the instance, that projects with the module's own
``query`` / ``key`` / ``value`` / ``query_global`` / ``key_global`` / ``value_global`` and computes the
attention with ``locore_kernels`` (C++ on CPU, Triton on CUDA). ``unpatch_longformer`` takes it away.

Why here and not in ``locore_kernels``: the kernels package knows no model. This module knows one
(the library's module layout, its attribute names and its mask encoding), so it sits in the product
package, above the kernels, and imports nothing but torch and ``locore_kernels``. It never imports
transformers: the modules are recognised by class name and attributes (a user who calls this has
built the model with transformers already).
"""
from __future__ import annotations

import inspect
import types
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from locore_kernels import BACKENDS, attention_with_layout, build_layout, resolve_backend

__all__ = ["patch_longformer", "unpatch_longformer", "patched_modules"]

_CLASS_NAME = "LongformerSelfAttention"
_PROJECTIONS = ("query", "key", "value", "query_global", "key_global", "value_global")
_ATTRIBUTES = _PROJECTIONS + ("num_heads", "head_dim", "embed_dim", "one_sided_attn_window_size")
_STATE = "_locore_patch"  # instance attribute holding the patch (absent when unpatched)

# Fast kernels per (device type, dtype) when backend=None; anything else runs the library path
# (our only other backend for it is the dense O(N^2) reference, slower than the library).
def _auto_backend(hidden_states: Tensor, head_dim: int) -> Optional[str]:
    """The kernel dispatch would pick for these inputs (the one registry decides), or None where only the
    dense O(N^2) reference fits: slower than the library, so the library path is kept."""
    try:
        name = resolve_backend(None, hidden_states.device, hidden_states.dtype, head_dim)
    except ValueError:
        return None
    return None if name == "reference" else name


_warned: set[str] = set()  # fallback reasons already warned about (one warning per reason per process)


@dataclass
class _Patch:
    backend: Optional[str]
    library_forward: Callable[..., Any]  # what ``module.forward`` was before the patch
    instance_forward: Optional[Any]      # the instance attribute it came from (None: the class method)
    signature: inspect.Signature         # of library_forward, to read its arguments by name


def _is_longformer_self_attention(module: nn.Module) -> bool:
    named = any(cls.__name__ == _CLASS_NAME for cls in type(module).__mro__)
    return named and all(hasattr(module, a) for a in _ATTRIBUTES)


def patched_modules(model: nn.Module) -> list[nn.Module]:
    """The ``LongformerSelfAttention`` modules of ``model`` that carry the patch."""
    return [m for m in model.modules() if _STATE in m.__dict__]


def patch_longformer(model: nn.Module, backend: Optional[str] = None) -> nn.Module:
    """Replace the attention of every ``LongformerSelfAttention`` in ``model`` with LoCoRE's kernels.

    In place; returns ``model``. Weights, parameters, buffers and the state dict are untouched.
    Honoured as the library does: each layer's own ``attention_window`` (one-sided window
    ``attention_window // 2``), the attention mask's 0 = padding / 1 = local / 2 = global convention
    (as ``LongformerModel`` hands it to its layers), and the padding of the sequence to a window
    multiple (the padded tokens come in masked and come out exactly 0, as in the library).

    backend: "cpu" (C++ kernel, fp32 CPU tensors), "triton" (CUDA; CPU tensors under
    TRITON_INTERPRET=1), "reference" (dense O(N^2) PyTorch, any float dtype: for checking), or None:
    the C++ kernel for fp32 on CPU, Triton for fp32 / fp16 / bf16 on CUDA, the library otherwise.
    Patching a patched model again only changes its backend.

    Inference only. A call the kernels cannot serve runs the library's own forward instead, with a
    warning the first time each reason occurs:
      * autograd would record it (grad enabled and the input or a weight requires grad): run under
        ``torch.inference_mode()`` / ``torch.no_grad()`` to get the fast path;
      * ``output_attentions=True`` (the kernels never materialise the probabilities);
      * training mode with attention dropout > 0, or a head mask (transformers 4.x's ``layer_head_mask``);
      * backend=None and no fast kernel for the input's device and dtype (e.g. float64).
    It raises ``ValueError`` instead where running the library would not be what was asked or is not
    possible: an explicit ``backend`` that cannot take the input (e.g. "cpu" with float64 or CUDA
    tensors, "triton" with an unsupported head dim), or a call without any attention mask.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS} or None")
    targets = [m for m in model.modules() if _is_longformer_self_attention(m)]
    if not targets:
        raise ValueError(f"patch_longformer: no {_CLASS_NAME} module found in {type(model).__name__}")
    for module in targets:
        state = module.__dict__.get(_STATE)
        if state is not None:
            state.backend = backend
            continue
        library_forward = module.forward
        module.__dict__[_STATE] = _Patch(backend=backend, library_forward=library_forward,
                                         instance_forward=module.__dict__.get("forward"),
                                         signature=inspect.signature(library_forward))
        module.forward = types.MethodType(_fast_forward, module)
    return model


def unpatch_longformer(model: nn.Module) -> nn.Module:
    """Undo ``patch_longformer``: every patched module gets back exactly the forward it had. In place;
    returns ``model``. A model that was never patched is returned as it is."""
    for module in patched_modules(model):
        state = module.__dict__.pop(_STATE)
        if state.instance_forward is None:
            del module.forward
        else:
            module.forward = state.instance_forward
    return model


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"patch_longformer: running the library attention instead of LoCoRE's kernels: {reason}",
                      RuntimeWarning, stacklevel=4)


def _fallback_reason(module: nn.Module, hidden_states: Tensor, args: dict[str, Any],
                     backend: Optional[str]) -> Optional[str]:
    if args.get("output_attentions"):
        return "output_attentions=True needs the attention probabilities, which the kernels never materialise"
    if args.get("layer_head_mask") is not None:
        return "a head mask (layer_head_mask) is not supported by the kernels"
    if module.training and float(getattr(module, "dropout", 0.0) or 0.0) > 0.0:
        return "training mode with attention dropout; call model.eval() for inference"
    if torch.is_grad_enabled() and (hidden_states.requires_grad
                                    or any(p.requires_grad for p in module.parameters())):
        return ("autograd is recording (the kernels are inference-only); run under torch.inference_mode() "
                "or torch.no_grad()")
    if backend is None and _auto_backend(hidden_states, module.head_dim) is None:
        return (f"no fast kernel for {hidden_states.dtype} on {hidden_states.device.type} "
                f"(pass backend='reference' to force the dense reference)")
    return None


def _fast_forward(self: nn.Module, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Any:
    """LongformerSelfAttention.forward on LoCoRE's kernels; returns ``(attn_output [B, N, E],)`` as the
    library does without attention outputs."""
    state: _Patch = self.__dict__[_STATE]
    call = state.signature.bind(hidden_states, *args, **kwargs)
    call.apply_defaults()
    arguments = call.arguments
    reason = _fallback_reason(self, hidden_states, arguments, state.backend)
    if reason is not None:
        _warn_once(reason)
        return state.library_forward(hidden_states, *args, **kwargs)

    key_padding, is_global = _masks(arguments)
    B, N, E = hidden_states.shape
    if E != self.embed_dim:
        raise ValueError(f"{_CLASS_NAME}: hidden_states have {E} features, the module expects {self.embed_dim}")
    if tuple(key_padding.shape) != (B, N):
        raise ValueError(f"{_CLASS_NAME}: attention mask has shape {tuple(key_padding.shape)}, "
                         f"hidden_states are [B={B}, N={N}, ...]")
    backend = state.backend or _auto_backend(hidden_states, self.head_dim)
    H, D = self.num_heads, self.head_dim

    def heads(x: Tensor) -> Tensor:  # [B, n, E] -> [B, n, H, D]
        return x.view(x.shape[0], x.shape[1], H, D)

    # A padded token is never global: the library's merged mask (mask * (global + 1)) makes it 0.
    layout = build_layout(is_global & ~key_padding, key_padding, self.one_sided_attn_window_size)
    q, k, v = heads(self.query(hidden_states)), heads(self.key(hidden_states)), heads(self.value(hidden_states))
    if layout.max_global > 0:
        # global queries for the global tokens only; global keys / values for every token
        q_global = heads(self.query_global(layout.gather_global(hidden_states)))
        k_global, v_global = heads(self.key_global(hidden_states)), heads(self.value_global(hidden_states))
    else:  # no global token in the batch: the global projections are never read
        q_global, k_global, v_global = q[:, :0], k, v
    # The op scales scores by 1/sqrt(D) itself (the library divides the queries instead).
    out = attention_with_layout(q, k, v, q_global, k_global, v_global, layout, backend=backend)
    return (out.reshape(B, N, E),)


def _masks(arguments: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """(key_padding, is_global), bool [B, N], from the library's arguments.

    ``LongformerEncoder`` passes them as ``is_index_masked`` / ``is_index_global_attn``; a direct
    call may give only ``attention_mask`` in the layers' encoding (< 0 padding, 0 local, > 0 global).
    """
    key_padding = arguments.get("is_index_masked")
    is_global = arguments.get("is_index_global_attn")
    attention_mask = arguments.get("attention_mask")
    if key_padding is None or is_global is None:
        if attention_mask is None:
            raise ValueError(f"{_CLASS_NAME} called without attention_mask or is_index_masked / "
                             f"is_index_global_attn: the patched attention needs the masks")
        mask = attention_mask.reshape(attention_mask.shape[0], -1)
        key_padding = mask < 0 if key_padding is None else key_padding
        is_global = mask > 0 if is_global is None else is_global
    return key_padding.bool(), is_global.bool()
