"""The rows op ``attention_rows`` (the model's pruned last layer) on every backend against the dense
float64 rule ``reference.local_rows_attention``: odd lengths, padding and globals anywhere (or none),
rows anywhere (unsorted, repeated, padded, global), windows wider than the sequence."""
from __future__ import annotations

import pytest
import torch

from locore_kernels import attention_rows, attention_with_layout, build_layout
from locore_kernels.reference import local_rows_attention

BACKENDS_UNDER_TEST = ["cpu", "triton", "reference"]   # triton: CUDA, or the interpreter on CPU tensors
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_case(B, N, H, D, w, p_glob, p_pad, rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    pad = torch.rand(B, N, generator=g) < p_pad
    glob = (torch.rand(B, N, generator=g) < p_glob) & ~pad
    rows = torch.as_tensor(rows, dtype=torch.int64)
    q = torch.randn(B, len(rows), H, D, generator=g, dtype=torch.float64) * 1.5
    k = torch.randn(B, N, H, D, generator=g, dtype=torch.float64) * 1.5
    v = torch.randn(B, N, H, D, generator=g, dtype=torch.float64)
    return q, k, v, rows, glob, pad, w


def run(backend, case, dtype=torch.float32):
    q, k, v, rows, glob, pad, w = case
    layout = build_layout(glob.to(DEVICE), pad.to(DEVICE), w)
    out = attention_rows(*(t.to(DEVICE, dtype) for t in (q, k, v)), rows.to(DEVICE), layout, backend=backend)
    assert out.dtype == dtype and out.shape == q.shape
    return out.cpu()


def check(backend, case, dtype=torch.float32, atol=2e-5):
    q, k, v, rows, glob, pad, w = case
    ref = local_rows_attention(q, k, v, rows, glob, pad, w)
    out = run(backend, case, dtype)
    assert torch.isfinite(out).all()
    assert (out[pad[:, rows]] == 0).all(), "padded rows must be exactly 0"
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=atol)


CASES = {
    # name: (B, N, H, D, w, p_glob, p_pad, rows)
    "odd-N-rows-unsorted-repeated": (2, 77, 2, 16, 5, 0.1, 0.2, [76, 3, 3, 40, 0, 50, 51, 52, 10, 60, 61, 5]),
    "no-globals": (1, 53, 2, 32, 4, 0.0, 0.2, [52, 0, 26, 13, 39]),
    "all-rows-one-block-more": (1, 45, 1, 16, 3, 0.15, 0.15, list(range(44, -1, -1))),
    "window-wider-than-N": (2, 31, 2, 16, 10_000, 0.1, 0.1, [0, 30, 15, 7]),
    "no-padding-sparse-rows": (1, 140, 1, 16, 6, 0.05, 0.0, [139, 99, 49, 0]),
    "mostly-padding": (1, 60, 2, 16, 4, 0.05, 0.85, list(range(0, 60, 3))),
    "all-global": (1, 20, 1, 16, 2, 1.0, 0.0, [0, 19, 7]),
    "one-row": (1, 9, 1, 16, 1, 0.2, 0.2, [4]),
}


@pytest.mark.parametrize("backend", BACKENDS_UNDER_TEST)
@pytest.mark.parametrize("name", list(CASES))
def test_rows_match_dense_rule(backend, name):
    check(backend, make_case(*CASES[name], seed=len(name)))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_rows_with_globals_and_padding_listed(backend):
    B, N = 2, 70
    case = make_case(B, N, 2, 16, 6, 0.15, 0.2, [0], seed=3)
    glob, pad = case[4], case[5]
    # every kind of row: global, padded and plain positions of item 0 (item 1 sees them as whatever they are)
    rows = [int(glob[0].nonzero()[0]), int(pad[0].nonzero()[0]), 33, int(glob[0].nonzero()[-1]), 69, 0]
    case = make_case(B, N, 2, 16, 6, 0.15, 0.2, rows, seed=3)
    check(backend, case)


@pytest.mark.parametrize("dtype, atol", [(torch.float16, 3e-3), (torch.bfloat16, 2.5e-2)])
def test_cpu_rows_half_precision(dtype, atol):
    q, k, v, rows, glob, pad, w = make_case(1, 90, 2, 16, 7, 0.1, 0.2, [3, 89, 45, 46])
    q, k, v = (t.to(dtype).double() for t in (q, k, v))  # the reference on the rounded inputs
    check("cpu", (q, k, v, rows, glob, pad, w), dtype=dtype, atol=atol)


def test_cpu_rows_agree_with_the_attention_op():
    """The rows op on every non-global row equals the full op's output there (same C++ rule)."""
    B, N, H, D, w = 1, 100, 2, 32, 9
    g = torch.Generator().manual_seed(5)
    pad = torch.rand(B, N, generator=g) < 0.2
    glob = (torch.rand(B, N, generator=g) < 0.1) & ~pad
    x = [torch.randn(B, N, H, D, generator=g) for _ in range(6)]
    layout = build_layout(glob, pad, w)
    full = attention_with_layout(x[0], x[1], x[2], layout.gather_global(x[3]), x[4], x[5], layout, backend="cpu")
    rows = (~glob[0]).nonzero()[:, 0]
    out = attention_rows(x[0][:, rows], x[1], x[2], rows, layout, backend="cpu")
    torch.testing.assert_close(out, full[:, rows], atol=1e-6, rtol=1e-6)


def test_empty_rows():
    case = make_case(1, 10, 1, 16, 2, 0.1, 0.1, [])
    for backend in ("cpu", "reference"):
        assert run(backend, case).shape == (1, 0, 1, 16)


@pytest.mark.parametrize("rows, message", [
    (torch.tensor([0, 10]), r"rows must lie in \[0, N=10\), got values in \[0, 10\]"),
    (torch.tensor([-1]), r"rows must lie in \[0, N=10\)"),
    (torch.tensor([0.5]), r"rows must be a 1-D int32/int64 tensor"),
    (torch.tensor([[1]]), r"rows must be a 1-D int32/int64 tensor"),
    ([1, 2], r"rows must be a 1-D int32/int64 tensor of positions, got list"),
])
def test_bad_rows(rows, message):
    layout = build_layout(torch.zeros(1, 10, dtype=torch.bool), torch.zeros(1, 10, dtype=torch.bool), 2)
    k = torch.zeros(1, 10, 1, 16)
    n = len(rows) if not isinstance(rows, torch.Tensor) else rows.shape[0]
    with pytest.raises(ValueError, match=message):
        attention_rows(torch.zeros(1, n, 1, 16), k, k, rows, layout, backend="cpu")


def test_extension_checks_rows_itself():
    from locore_kernels import _cpu
    layout = build_layout(torch.zeros(1, 10, dtype=torch.bool), torch.zeros(1, 10, dtype=torch.bool), 2)
    k = torch.zeros(1, 10, 1, 16).numpy()
    m = layout.band_key.view(torch.uint8).numpy()
    with pytest.raises(ValueError, match=r"rows\[1\]=12 is outside \[0, N=10\)"):
        _cpu.longformer_rows_fp32(torch.zeros(1, 2, 1, 16).numpy(), k, k, torch.tensor([3, 12], dtype=torch.int32).numpy(),
                                  torch.zeros(1, 2, 1, 16).numpy(), layout.global_idx.numpy(),
                                  layout.num_global.numpy(), m, layout.key_padding.view(torch.uint8).numpy(),
                                  layout.is_global.view(torch.uint8).numpy(), 2)
