"""Attention backends and their dispatch, in the style of xformers' fmha dispatch.

Each backend declares what it runs on (devices, dtypes, head dims) and answers
``not_supported_reasons(device, dtype, head_dim)``; dispatch walks ``PRIORITY`` and takes the first
backend with no reason against the call. When none fits, ONE error lists every backend's reasons; a
backend named explicitly that does not fit raises its own reasons. This is the only place that knows
which backend supports what: adding a backend means adding one class to ``REGISTRY``.

Every backend implements both ops with the same math (SPEC section 3):
  * ``attention``: every row of the sequence (``ops.attention_with_layout``);
  * ``rows``: the non-global rule for a list of rows only (``ops.attention_rows``; the model's pruned
    last layer).
Inputs reaching a backend have been validated by ``ops`` (shapes, devices, layout); the kernels'
own modules check only what they need not to crash.
"""
from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from typing import Optional

import torch
from torch import Tensor

from .env import triton_interpreter_enabled
from .layout import AttentionLayout, scatter_global
from .reference import local_rows_attention, longformer_attention_reference

TRITON_HEAD_DIMS = (16, 32, 64, 128)
HALF_AND_SINGLE = (torch.float16, torch.bfloat16, torch.float32)


class AttentionBackend(ABC):
    """One implementation of the attention op and the rows op."""

    name: str = ""
    devices: tuple[str, ...] = ()                 # device types it picks automatically
    dtypes: tuple[torch.dtype, ...] = ()
    head_dims: Optional[tuple[int, ...]] = None   # None: any D >= 1
    runs: str = ""                                # what actually runs (README backend table)

    def devices_for(self, explicit: bool) -> tuple[str, ...]:
        """Device types accepted; ``explicit``: the caller named this backend."""
        return self.devices

    def unavailable(self) -> list[str]:
        """Reasons this backend cannot run at all in this process (a missing build or package)."""
        return []

    def not_supported_reasons(self, device: torch.device, dtype: torch.dtype, head_dim: Optional[int] = None,
                              *, explicit: bool = True) -> list[str]:
        """Why this backend cannot run a call with these inputs ([] = it can). ``head_dim=None``: not checked."""
        reasons = []
        devices = self.devices_for(explicit)
        if device.type not in devices:
            reasons.append(self.device_reason(device, devices))
        if dtype not in self.dtypes:
            reasons.append(self.dtype_reason(dtype))
        if head_dim is not None and self.head_dims is not None and head_dim not in self.head_dims:
            reasons.append(f"backend={self.name!r} supports head dim D in {self.head_dims}, got D={head_dim}")
        return reasons + self.unavailable()

    def dtype_reason(self, dtype: torch.dtype) -> str:
        names = "/".join(str(d).replace("torch.", "") for d in self.dtypes)
        return f"backend={self.name!r} supports {names}, got {dtype}"

    def device_reason(self, device: torch.device, devices: tuple[str, ...]) -> str:
        return f"backend={self.name!r} needs {'/'.join(d.upper() for d in devices)} tensors, got device {device}"

    @abstractmethod
    def attention(self, q: Tensor, k: Tensor, v: Tensor, q_global_gathered: Tensor, k_global: Tensor,
                  v_global: Tensor, layout: AttentionLayout) -> Tensor:
        """Every row of the op, [B, N, H, D] in q's dtype."""

    @abstractmethod
    def rows(self, q_rows: Tensor, k: Tensor, v: Tensor, rows: Tensor, layout: AttentionLayout) -> Tensor:
        """The non-global rule for the listed rows only, [B, R, H, D]."""


class TritonBackend(AttentionBackend):
    name = "triton"
    devices = ("cuda",)
    dtypes = HALF_AND_SINGLE
    head_dims = TRITON_HEAD_DIMS
    runs = ("two fused kernels + a combine (triton_attention.py); rows op: a row-list variant of the local "
            "kernel. CPU tensors only in the Triton interpreter (TRITON_INTERPRET=1, by name only)")

    def devices_for(self, explicit: bool) -> tuple[str, ...]:
        # The interpreter is a test vehicle, far slower than the C++ kernel: never picked automatically.
        return ("cuda", "cpu") if explicit and triton_interpreter_enabled() else ("cuda",)

    def device_reason(self, device: torch.device, devices: tuple[str, ...]) -> str:
        if device.type == "cpu" and triton_interpreter_enabled():
            return "backend='triton' runs CPU tensors in the Triton interpreter only when named explicitly"
        return f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got device {device}"

    def unavailable(self) -> list[str]:
        return [] if _module_exists("triton") else ["backend='triton' needs the triton package"]

    def attention(self, q, k, v, q_global_gathered, k_global, v_global, layout):
        from .triton_attention import triton_attention
        return triton_attention(q, k, v, q_global_gathered, k_global, v_global, layout)

    def rows(self, q_rows, k, v, rows, layout):
        from .triton_attention import triton_rows_attention
        return triton_rows_attention(q_rows, k, v, rows, layout)


class CpuBackend(AttentionBackend):
    name = "cpu"
    devices = ("cpu",)
    dtypes = HALF_AND_SINGLE
    head_dims = None
    runs = ("C++/OpenMP kernel (csrc/attention.cpp), fp32 arithmetic; float16/bfloat16 inputs are converted "
            "to fp32 and the result back to the input dtype")

    def dtype_reason(self, dtype: torch.dtype) -> str:
        return f"backend='cpu' computes in float32 (inputs float32/float16/bfloat16), got {dtype}"

    def unavailable(self) -> list[str]:
        return [] if _cpu_extension_built() else [
            "backend='cpu' needs the C++ extension locore_kernels._cpu (not built: run `make build`)"]

    def attention(self, q, k, v, q_global_gathered, k_global, v_global, layout):
        from .cpu import cpu_attention
        return cpu_attention(q, k, v, q_global_gathered, k_global, v_global, layout)

    def rows(self, q_rows, k, v, rows, layout):
        from .cpu import cpu_rows_attention
        return cpu_rows_attention(q_rows, k, v, rows, layout)


class ReferenceBackend(AttentionBackend):
    name = "reference"
    devices = ("cpu", "cuda")
    dtypes = HALF_AND_SINGLE + (torch.float64,)
    head_dims = None
    runs = ("dense masked PyTorch, O(N^2) time and memory (reference.py): the definition the others are "
            "tested against; float64 stays float64, others compute in fp32")

    def attention(self, q, k, v, q_global_gathered, k_global, v_global, layout):
        q_global = scatter_global(layout, q_global_gathered)
        return longformer_attention_reference(q, k, v, q_global, k_global, v_global,
                                              layout.is_global, layout.key_padding, layout.one_sided_window)

    def rows(self, q_rows, k, v, rows, layout):
        return local_rows_attention(q_rows, k, v, rows, layout.is_global, layout.key_padding,
                                    layout.one_sided_window)


REGISTRY: dict[str, AttentionBackend] = {b.name: b for b in (TritonBackend(), CpuBackend(), ReferenceBackend())}
PRIORITY: tuple[str, ...] = ("triton", "cpu", "reference")   # automatic dispatch order
BACKENDS: tuple[str, ...] = tuple(REGISTRY)


def select_backend(backend: Optional[str], device: torch.device, dtype: torch.dtype,
                   head_dim: Optional[int] = None) -> AttentionBackend:
    """The backend for a call: ``backend`` by name (checked), or None = the first of ``PRIORITY`` that fits."""
    if backend is not None:
        if backend not in REGISTRY:
            raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS} or None")
        chosen = REGISTRY[backend]
        reasons = chosen.not_supported_reasons(device, dtype, head_dim, explicit=True)
        if reasons:
            raise ValueError("; ".join(reasons))
        return chosen
    every_reason = []
    for name in PRIORITY:
        reasons = REGISTRY[name].not_supported_reasons(device, dtype, head_dim, explicit=False)
        if not reasons:
            return REGISTRY[name]
        every_reason += reasons
    raise ValueError(f"no attention backend runs {dtype} tensors on {device} with head dim D={head_dim}: "
                     + "; ".join(every_reason))


def backend_table() -> list[dict[str, str]]:
    """One row per backend (the README's table is written from this)."""
    def fmt(xs):
        return "any" if xs is None else ", ".join(str(x).replace("torch.", "") for x in xs)
    return [{"backend": b.name, "devices": fmt(b.devices), "dtypes": fmt(b.dtypes), "head dims": fmt(b.head_dims),
             "runs": b.runs} for b in (REGISTRY[n] for n in PRIORITY)]


_AVAILABLE: dict[str, bool] = {}   # probed once per process (a plain dict: torch.compile traces it as is)


def _module_exists(name: str) -> bool:
    if name not in _AVAILABLE:
        _AVAILABLE[name] = importlib.util.find_spec(name) is not None
    return _AVAILABLE[name]


def _cpu_extension_built() -> bool:
    if "_cpu" not in _AVAILABLE:
        try:
            from . import _cpu  # noqa: F401
            _AVAILABLE["_cpu"] = True
        except ImportError:
            _AVAILABLE["_cpu"] = False
    return _AVAILABLE["_cpu"]
