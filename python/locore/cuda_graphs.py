"""CUDA-graph replay of a scoring forward: one captured graph per input shape and setting.

The masks change from call to call (query padding changes the global tokens), so the layout is
rebuilt outside the graph and copied into the captured layout's tensors; the number of global
tokens is part of the cache key.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Hashable

import torch
from torch import Tensor

from locore_kernels import AttentionLayout

from .sequence import Batch

ScoreFn = Callable[[Batch, AttentionLayout], Tensor]
_LAYOUT_TENSORS = ("is_global", "key_padding", "band_key", "global_idx", "num_global")


def _fields(obj: Any) -> list:
    """A dataclass's field values, not copied (``dataclasses.astuple`` deep-copies tensors)."""
    return [getattr(obj, f.name) for f in dataclasses.fields(obj)]


class CapturedScore:
    """``score_fn(batch, layout)`` for one input shape, captured in a CUDA graph and replayed on new inputs."""

    def __init__(self, score_fn: ScoreFn, batch: Batch, layout: AttentionLayout):
        self.batch = Batch(*(None if t is None else t.clone() for t in _fields(batch)))
        self.layout = dataclasses.replace(layout, **{f: getattr(layout, f).clone() for f in _LAYOUT_TENSORS})
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: Triton autotuning and cuBLAS handles outside the capture
            for _ in range(2):
                score_fn(self.batch, self.layout)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: other threads' CUDA calls (rerank's descriptor loader copying the next batch to
        # the device, a cudaMalloc among them) must not invalidate the capture, as "global" mode lets them
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.out = score_fn(self.batch, self.layout)

    def __call__(self, batch: Batch, layout: AttentionLayout) -> Tensor:
        for dst, src in zip(_fields(self.batch), _fields(batch)):
            if dst is not None:
                dst.copy_(src)
        for f in _LAYOUT_TENSORS:
            getattr(self.layout, f).copy_(getattr(layout, f))
        self.graph.replay()
        return self.out.clone()


class GraphCache:
    """Captured graphs by key; the key holds everything fixed at capture time, so a changed setting
    never replays a stale graph. At most ``capacity`` graphs (each holds its own activations)."""

    def __init__(self, capacity: int = 8):
        self.capacity = capacity
        self.graphs: dict[Hashable, CapturedScore] = {}

    def __call__(self, key: Hashable, score_fn: ScoreFn, batch: Batch, layout: AttentionLayout) -> Tensor:
        if key not in self.graphs:
            if len(self.graphs) >= self.capacity:
                self.graphs.clear()
            self.graphs[key] = CapturedScore(score_fn, batch, layout)
        return self.graphs[key](batch, layout)

    def clear(self) -> None:
        self.graphs.clear()

    def __len__(self) -> int:
        return len(self.graphs)
