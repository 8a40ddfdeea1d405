"""The torch.library custom ops locore::attention and locore::attention_rows: opcheck (schema, fake
implementation, dispatch) on small cases, and torch.compile(fullgraph=True) through the public ops on
CPU (C++ backend) gives the eager result."""
from __future__ import annotations

import pytest
import torch

import locore_kernels  # noqa: F401  (registers the ops)
from locore_kernels import attention_rows, attention_with_layout, build_layout
from locore_kernels.custom_ops import layout_tensors


def small_case(B=2, N=23, H=2, D=16, w=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    pad = torch.rand(B, N, generator=g) < 0.2
    glob = (torch.rand(B, N, generator=g) < 0.15) & ~pad
    layout = build_layout(glob, pad, w)
    x = [torch.randn(B, N, H, D, generator=g) for _ in range(6)]
    x[3] = layout.gather_global(x[3])
    return x, layout


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_opcheck_attention(backend):
    x, layout = small_case()
    args = (*x, *layout_tensors(layout), layout.one_sided_window, backend)
    torch.library.opcheck(torch.ops.locore.attention.default, args)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_opcheck_attention_rows(backend):
    x, layout = small_case()
    rows = torch.tensor([22, 0, 5, 5, 11])
    args = (x[0][:, rows], x[1], x[2], rows, *layout_tensors(layout), layout.one_sided_window, backend)
    torch.library.opcheck(torch.ops.locore.attention_rows.default, args)


def test_opcheck_half_precision_on_cpu():
    x, layout = small_case()
    x = [t.to(torch.bfloat16) for t in x]
    torch.library.opcheck(torch.ops.locore.attention.default,
                          (*x, *layout_tensors(layout), layout.one_sided_window, "cpu"))


def test_op_equals_the_public_eager_path():
    x, layout = small_case()
    direct = attention_with_layout(*x, layout, backend="cpu")
    via_op = torch.ops.locore.attention(*x, *layout_tensors(layout), layout.one_sided_window, "cpu")
    assert torch.equal(direct, via_op)


def test_compile_fullgraph_matches_eager():
    """One function calling both public ops, compiled without graph breaks, gives the eager result."""
    torch._dynamo.reset()
    x, layout = small_case(B=1, N=40, seed=1)
    rows = torch.tensor([39, 3, 20])

    def fn(q, k, v, qg, kg, vg, layout, rows):
        full = attention_with_layout(q, k, v, qg, kg, vg, layout, backend="cpu")
        part = attention_rows(q[:, rows], k, v, rows, layout, backend="cpu")
        return full * 2.0, part + 1.0

    eager = fn(*x, layout, rows)
    compiled = torch.compile(fn, fullgraph=True, backend="inductor")(*x, layout, rows)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, atol=1e-6, rtol=1e-6)
    # None = dispatch, resolved while tracing, to the same C++ kernel
    dispatched = torch.compile(lambda *a: attention_with_layout(*a), fullgraph=True)(*x, layout)
    torch.testing.assert_close(dispatched, eager[0] / 2.0, atol=1e-6, rtol=1e-6)
