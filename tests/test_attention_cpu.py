"""The C++ CPU backend (locore_kernels._cpu via locore_kernels.cpu) against the float64 dense reference.

Inputs are drawn in float64, the reference runs on them directly and the CPU kernel on their float32
rounding, so the comparison measures the kernel's fp32 error (expected ~1e-6) and nothing else.
"""
from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import locore_kernels
from locore_kernels import _cpu, build_layout, longformer_attention, longformer_attention_reference
from locore_kernels.cpu import cpu_attention

ATOL = 2e-5
RTOL = 1e-5
BQ = _cpu.query_block_rows()   # query rows per kernel block
KC = _cpu.key_chunk()          # keys per online-softmax chunk


def make_qkv(B, N, H, D, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, N, H, D, generator=g, dtype=torch.float64) * scale for _ in range(6)]


def make_masks(B, N, p_global, p_pad, seed=0):
    g = torch.Generator().manual_seed(seed + 1000)
    pad = torch.rand(B, N, generator=g) < p_pad
    glob = (torch.rand(B, N, generator=g) < p_global) & ~pad
    return glob, pad


def locore_masks(images, T=50, pad_slots=0, seed=0):
    """LoCoRE layout: [global, S local, SEP] per image; SEPs and the query block's first T-1 tokens are
    global; ``pad_slots`` random local slots per image are padding (AMES masks)."""
    N = images * T
    pos = torch.arange(N)
    glob = ((pos % T) == T - 1) | (pos < T - 1)
    pad = torch.zeros(N, dtype=torch.bool)
    if pad_slots:
        g = torch.Generator().manual_seed(seed)
        for img in range(images):
            slots = torch.randperm(T - 2, generator=g)[:pad_slots] + 1  # local slots 1 .. T-2
            pad[img * T + slots] = True
        pad &= ~glob
    return glob[None], pad[None]


def run_cpu(x64, glob, pad, w, out=None):
    """The CPU backend on the float32 rounding of x64, through the layout entry (poisoned ``out``)."""
    q, k, v, qg, kg, vg = (t.float() for t in x64)
    layout = build_layout(glob, pad, w)
    if out is None:
        out = torch.full(q.shape, float("nan"), dtype=torch.float32)
    res = cpu_attention(q, k, v, layout.gather_global(qg), kg, vg, layout, out=out)
    assert res.data_ptr() == out.data_ptr()
    return res


def check_against_reference(x64, glob, pad, w, atol=ATOL):
    ref = longformer_attention_reference(*x64, glob, pad, w)
    out = run_cpu(x64, glob, pad, w)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert not torch.isnan(out).any(), "a row was left unwritten (poison NaN) or a NaN was produced"
    assert torch.all(out[pad] == 0), "padded rows must be exactly 0"
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=RTOL)
    return out


CASES = {
    # name: (B, N, H, D, w, p_global, p_pad)
    "padding-and-globals-anywhere": (1, 150, 2, 64, 7, 0.1, 0.2),
    "no-globals": (1, 100, 2, 32, 5, 0.0, 0.1),
    "no-padding": (1, 100, 2, 32, 5, 0.1, 0.0),
    "all-globals": (1, 60, 2, 16, 3, 1.0, 0.0),
    "all-globals-or-padding": (1, 60, 2, 16, 3, 1.0, 0.4),
    "window-wider-than-N": (1, 50, 2, 32, 10_000, 0.05, 0.1),
    "window-1": (1, 70, 3, 16, 1, 0.1, 0.1),
    "N=1": (1, 1, 1, 16, 1, 0.0, 0.0),
    "N=1-global": (1, 1, 2, 16, 4, 1.0, 0.0),
    "odd-N": (1, BQ * 3 + 5, 2, 64, 9, 0.1, 0.1),
    "N=BQ+1": (1, BQ + 1, 1, 32, 40, 0.05, 0.0),
    "mostly-padding": (1, 90, 1, 16, 6, 0.05, 0.9),
    "B=2-different-layouts": (2, 97, 2, 32, 11, 0.1, 0.25),
    "B=3-H=3": (3, 45, 3, 16, 4, 0.15, 0.15),
    "many-globals-more-than-a-chunk": (1, KC * 2 + 40, 1, 16, 3, 0.7, 0.05),
    "key-split-global-path": (1, 2600, 1, 32, 16, 0.002, 0.2),  # few global rows, many keys
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name):
    B, N, H, D, w, p_global, p_pad = CASES[name]
    x = make_qkv(B, N, H, D, seed=list(CASES).index(name))
    glob, pad = make_masks(B, N, p_global, p_pad, seed=len(name))
    if name == "key-split-global-path":
        glob[0, [0, 1234, N - 1]] = True
        pad[0, [0, 1234, N - 1]] = False
    check_against_reference(x, glob, pad, w)


@pytest.mark.parametrize("D", [16, 32, 64, 128])
def test_head_dims(D):
    x = make_qkv(2, 83, 2, D, seed=D)
    glob, pad = make_masks(2, 83, 0.1, 0.15, seed=D)
    check_against_reference(x, glob, pad, 13)


@pytest.mark.parametrize("D", [1, 3, 8, 20, 24, 40, 72])
def test_head_dims_off_the_vector_width(D):
    # not multiples of 16 (8-wide and scalar column tails of the PV loop)
    x = make_qkv(1, 50, 2, D, seed=D)
    glob, pad = make_masks(1, 50, 0.1, 0.1, seed=D)
    check_against_reference(x, glob, pad, 6)


def test_peaked_softmax_large_scores():
    # scores ~ N(0, 25^2): softmax nearly one-hot, exercises max subtraction and exp underflow
    x = make_qkv(1, 120, 2, 32, seed=3, scale=5.0)
    glob, pad = make_masks(1, 120, 0.1, 0.1, seed=3)
    check_against_reference(x, glob, pad, 10, atol=1e-4)


def test_block_rows_with_every_kind_of_token():
    # one query block containing valid, global and padded rows, and a key chunk boundary in the band
    N = 2 * BQ + KC
    x = make_qkv(1, N, 2, 16, seed=5)
    glob = torch.zeros(1, N, dtype=torch.bool)
    pad = torch.zeros(1, N, dtype=torch.bool)
    glob[0, BQ + 1::7] = True
    pad[0, BQ + 3::5] = True
    pad &= ~glob
    check_against_reference(x, glob, pad, KC)


@pytest.mark.parametrize("pad_slots", [0, 6])
def test_locore_layout_moderate_size(pad_slots):
    # 20 images x 50 tokens = 1000 tokens, w = 256, globals as LoCoRE places them
    glob, pad = locore_masks(20, pad_slots=pad_slots, seed=pad_slots)
    x = make_qkv(1, 1000, 2, 64, seed=11)
    check_against_reference(x, glob, pad, 256)


def test_all_padded_rows_are_zero_without_nan():
    x = make_qkv(2, 9, 2, 16)
    glob = torch.zeros(2, 9, dtype=torch.bool)
    pad = torch.ones(2, 9, dtype=torch.bool)
    pad[1, 4] = False  # item 1 has a single valid token
    out = check_against_reference(x, glob, pad, 3)
    assert torch.all(out[0] == 0)
    torch.testing.assert_close(out[1, 4], x[2][1, 4].float())  # softmax over itself -> its own value


def test_public_op_and_default_backend_use_the_cpu_kernel():
    x64 = make_qkv(1, 70, 2, 32, seed=2)
    x = [t.float() for t in x64]
    glob, pad = make_masks(1, 70, 0.1, 0.1, seed=2)
    assert locore_kernels.resolve_backend(None, torch.device("cpu"), torch.float32) == "cpu"
    a = longformer_attention(*x, is_global=glob, key_padding=pad, one_sided_window=8, backend="cpu")
    b = longformer_attention(*x, is_global=glob, key_padding=pad, one_sided_window=8)
    assert torch.equal(a, b)
    ref = longformer_attention_reference(*x64, glob, pad, 8)
    torch.testing.assert_close(a.double(), ref, atol=ATOL, rtol=RTOL)


def test_non_contiguous_inputs():
    x64 = make_qkv(1, 40, 2, 16, seed=4)
    glob, pad = make_masks(1, 40, 0.1, 0.1, seed=4)
    # same values, permuted memory layout ([B, H, N, D] storage viewed as [B, N, H, D])
    x = [t.float().transpose(1, 2).contiguous().transpose(1, 2) for t in x64]
    assert not x[0].is_contiguous()
    out = longformer_attention(*x, is_global=glob, key_padding=pad, one_sided_window=5, backend="cpu")
    torch.testing.assert_close(out.double(), longformer_attention_reference(*x64, glob, pad, 5),
                               atol=ATOL, rtol=RTOL)


def test_inputs_are_not_modified():
    x = [t.float() for t in make_qkv(1, 50, 2, 16, seed=6)]
    before = [t.clone() for t in x]
    glob, pad = make_masks(1, 50, 0.1, 0.1, seed=6)
    longformer_attention(*x, is_global=glob, key_padding=pad, one_sided_window=4, backend="cpu")
    assert all(torch.equal(a, b) for a, b in zip(x, before))


def test_deterministic_bit_identical():
    glob, pad = locore_masks(8, pad_slots=4)
    x = [t.float() for t in make_qkv(1, 400, 3, 64, seed=7)]
    runs = [longformer_attention(*x, is_global=glob, key_padding=pad, one_sided_window=64, backend="cpu")
            for _ in range(3)]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


def test_thread_count_does_not_change_results():
    # few global rows over 1300 keys: the global rows also take the key-split + combine path
    glob, pad = make_masks(2, 1300, 0.01, 0.1, seed=8)
    x = [t.float() for t in make_qkv(2, 1300, 3, 64, seed=8)]
    kw = dict(is_global=glob, key_padding=pad, one_sided_window=40, backend="cpu")
    saved = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(longformer_attention(*x, **kw))
    finally:
        torch.set_num_threads(saved)
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=1e-6, rtol=0)
    # the extension's own thread argument (OpenMP team size), including more threads than cores
    layout = build_layout(glob, pad, 40)
    arrays = [t.contiguous().numpy() for t in (x[0], x[1], x[2], layout.gather_global(x[3]), x[4], x[5])]
    masks = [layout.global_idx.numpy(), layout.num_global.numpy()] + [
        m.view(torch.uint8).numpy() for m in (layout.band_key, layout.key_padding, layout.is_global)]
    for n in (1, 4, 7):
        out = torch.full_like(x[0], float("nan"))
        _cpu.longformer_attention_fp32(*arrays, out.numpy(), *masks, 40, n)
        torch.testing.assert_close(out, outs[0], atol=1e-6, rtol=0)


def test_concurrent_calls_from_python_threads():
    # the kernel releases the GIL; concurrent calls must not share scratch
    glob, pad = make_masks(1, 300, 0.05, 0.1, seed=9)
    x = [t.float() for t in make_qkv(1, 300, 2, 32, seed=9)]
    expected = longformer_attention(*x, is_global=glob, key_padding=pad, one_sided_window=20, backend="cpu")
    results = [None] * 4

    def work(i):
        results[i] = longformer_attention(*x, is_global=glob, key_padding=pad, one_sided_window=20,
                                          backend="cpu")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(r, expected) for r in results)


def test_empty_shapes():
    for shape in [(0, 5, 2, 8), (1, 0, 2, 8), (1, 5, 0, 8)]:
        B, N = shape[:2]
        x = [torch.randn(shape) for _ in range(6)]
        glob = torch.zeros(B, N, dtype=torch.bool)
        out = longformer_attention(*x, is_global=glob, key_padding=glob.clone(), one_sided_window=2, backend="cpu")
        assert out.shape == shape


@settings(deadline=None, max_examples=50)
@given(
    B=st.integers(1, 2), N=st.integers(1, 80), H=st.integers(1, 3), D=st.sampled_from([4, 8, 16, 20, 32]),
    w=st.integers(1, 90), p_global=st.sampled_from([0.0, 0.05, 0.2, 0.6, 1.0]),
    p_pad=st.sampled_from([0.0, 0.1, 0.5, 1.0]), seed=st.integers(0, 2**16),
)
def test_property_random_layouts(B, N, H, D, w, p_global, p_pad, seed):
    x = make_qkv(B, N, H, D, seed=seed)
    glob, pad = make_masks(B, N, p_global, p_pad, seed=seed)
    check_against_reference(x, glob, pad, w)


# ----------------------------------------------------------------------------------------------
# non-finite inputs propagate alike (issue 13.2), half precision runs the C++ kernel (issue 13.6)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["q", "k", "q_global", "k_global"])
def test_nan_rows_agree_with_the_reference(where):
    """A NaN in q / k (local or global) makes NaN exactly the rows that read it, in both backends."""
    B, N, H, D, w = 1, 120, 2, 16, 5
    x = [t.float() for t in make_qkv(B, N, H, D, seed=9)]
    glob, pad = make_masks(B, N, 0.08, 0.15, seed=9)
    valid_local = (~glob[0] & ~pad[0]).nonzero()[:, 0]
    valid_global = glob[0].nonzero()[:, 0]
    i = int(valid_local[len(valid_local) // 2]) if where in ("q", "k") else int(valid_global[0])
    t = {"q": 0, "k": 1, "q_global": 3, "k_global": 4}[where]
    x[t][0, i, 1, 3] = float("nan")
    ref = longformer_attention(*x, is_global=glob, key_padding=pad, one_sided_window=w, backend="reference")
    out = longformer_attention(*x, is_global=glob, key_padding=pad, one_sided_window=w, backend="cpu")
    nan_ref, nan_out = torch.isnan(ref), torch.isnan(out)
    assert nan_ref.any(), "the NaN must reach some row"
    assert torch.equal(nan_ref, nan_out), "the backends disagree on which outputs are NaN"
    torch.testing.assert_close(out[~nan_out], ref[~nan_ref], atol=ATOL, rtol=RTOL)
    if where == "q":  # that row only, that head only
        assert nan_out[0, :, 1].any(-1).nonzero()[:, 0].tolist() == [i] and not nan_out[0, :, 0].any()
    if where == "k":  # the rows of the band around i (i is a band key), head 1 only
        rows = nan_out[0, :, 1].any(-1).nonzero()[:, 0]
        assert rows.min() >= i - w and rows.max() <= i + w and not nan_out[0, :, 0].any()


@pytest.mark.parametrize("dtype, atol", [(torch.float16, 3e-3), (torch.bfloat16, 2e-2)])
def test_half_precision_runs_the_cpu_kernel(dtype, atol, monkeypatch):
    """fp16 / bf16 on CPU: the default dispatch picks the C++ kernel (fp32 inside, the dtype outside), never
    the dense O(N^2) reference."""
    import locore_kernels.backends as backends

    def dense_forbidden(*args, **kwargs):
        raise AssertionError("the dense reference ran")

    monkeypatch.setattr(backends.ReferenceBackend, "attention", dense_forbidden)
    B, N, H, D, w = 1, 150, 2, 32, 7
    x64 = make_qkv(B, N, H, D, seed=4)
    glob, pad = make_masks(B, N, 0.1, 0.2, seed=4)
    x = [t.to(dtype) for t in x64]
    layout = build_layout(glob, pad, w)
    out = locore_kernels.attention_with_layout(x[0], x[1], x[2], layout.gather_global(x[3]), x[4], x[5], layout)
    assert out.dtype == dtype and torch.all(out[pad] == 0)
    ref = longformer_attention_reference(*(t.double() for t in x), glob, pad, w)  # on the rounded inputs
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=atol)
