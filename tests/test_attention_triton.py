"""Triton backend of the attention op against the dense float64 reference.

Without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py) on
CPU tensors, so shapes stay small; the tests marked ``gpu`` run the compiled kernels at the model's
size (N = 5050) and skip cleanly without a GPU. Every call writes into an output buffer poisoned with
NaN, so a row the kernels forget to write fails the finiteness check.
"""
from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import locore_kernels.triton_attention as ta
from locore_kernels import (
    attention_rows, attention_with_layout, build_layout, longformer_attention, longformer_attention_reference,
)

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
INTERPRETED = not HAS_CUDA

FP32_TOL = dict(atol=1e-5, rtol=1e-5)
HALF_TOL = {torch.float16: dict(atol=3e-3, rtol=3e-3), torch.bfloat16: dict(atol=2.5e-2, rtol=2.5e-2)}


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

def make_projections(B, N, H, D, seed, dtype=torch.float32, scale=1.5):
    """Six [B, N, H, D] tensors (q, k, v, q_global, k_global, v_global); scale > 1 sharpens softmax."""
    gen = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(B, N, H, D, generator=gen)).to(dtype).to(DEVICE) for _ in range(6)]


def random_masks(B, N, seed, p_pad=0.2, p_glob=0.15):
    gen = torch.Generator().manual_seed(seed)
    key_padding = torch.rand(B, N, generator=gen) < p_pad
    is_global = (torch.rand(B, N, generator=gen) < p_glob) & ~key_padding
    return is_global.to(DEVICE), key_padding.to(DEVICE)


def locore_masks(K, T=50, seed=0, p_pad=0.2):
    """LoCoRE's layout: (1 + K) blocks of T tokens, [SEP] last in each block (global), the query
    block's first T - 1 tokens global, random padding of gallery local slots (and of query slots,
    which are then not global: a padded token is never global)."""
    rng = random.Random(seed)
    N = (1 + K) * T
    is_global = torch.zeros(1, N, dtype=torch.bool)
    key_padding = torch.zeros(1, N, dtype=torch.bool)
    for blk in range(1 + K):
        for t in range(T):
            pos = blk * T + t
            if t == T - 1:
                is_global[0, pos] = True  # [SEP]
            elif t == 0:
                is_global[0, pos] = blk == 0  # the image's global token: always valid
            elif rng.random() < p_pad:
                key_padding[0, pos] = True
            elif blk == 0:
                is_global[0, pos] = True
    return is_global.to(DEVICE), key_padding.to(DEVICE)


def reference64(proj, is_global, key_padding, w):
    return longformer_attention_reference(*(t.double() for t in proj), is_global, key_padding, w)


def run_poisoned(proj, is_global, key_padding, w):
    """The kernels' entry point, writing into a NaN-filled buffer (filler global queries NaN too)."""
    q, k, v, qg, kg, vg = proj
    layout = build_layout(is_global, key_padding, w)
    out = torch.full_like(q, float("nan"))
    qg_gathered = layout.gather_global(qg)
    filler = torch.arange(layout.max_global, device=q.device)[None, :] >= layout.num_global[:, None]
    qg_gathered[filler] = float("nan")  # rows past num_global[b] must be ignored
    result = ta.triton_attention(q, k, v, qg_gathered, kg, vg, layout, out=out)
    assert result is out
    return out


def check_against_reference(out, proj, is_global, key_padding, w, tol=None):
    dtype = proj[0].dtype
    tol = tol or (FP32_TOL if dtype == torch.float32 else HALF_TOL[dtype])
    assert out.dtype == dtype and out.shape == proj[0].shape
    assert torch.isfinite(out).all(), "a row was left unwritten (NaN poison) or overflowed"
    assert (out[key_padding] == 0).all(), "padded rows must be exactly 0"
    ref = reference64(proj, is_global, key_padding, w)
    torch.testing.assert_close(out.double(), ref, **tol)


def check_case(B, N, H, D, w, is_global, key_padding, seed=0, dtype=torch.float32):
    proj = make_projections(B, N, H, D, seed, dtype)
    out = run_poisoned(proj, is_global, key_padding, w)
    check_against_reference(out, proj, is_global, key_padding, w)
    return out


# ------------------------------------------------------------------------------------------------
# fp32 against the float64 reference, layouts chosen to hit every edge
# ------------------------------------------------------------------------------------------------

def _masks_from_lists(B, N, glob, pad):
    is_global = torch.zeros(B, N, dtype=torch.bool)
    key_padding = torch.zeros(B, N, dtype=torch.bool)
    for b, idx in enumerate(glob):
        is_global[b, idx] = True
    for b, idx in enumerate(pad):
        key_padding[b, idx] = True
    return is_global.to(DEVICE), key_padding.to(DEVICE)


FIXED_CASES = {
    # name: (B, N, H, D, w, glob positions per item, pad positions per item)
    "n1-local": (1, 1, 1, 16, 1, [[]], [[]]),
    "n1-global": (1, 1, 2, 16, 1, [[0]], [[]]),
    "n1-padded": (1, 1, 1, 16, 3, [[]], [[0]]),
    "all-padded-item": (2, 7, 1, 16, 2, [[], [3]], [list(range(7)), [0]]),
    "pad-first-last": (1, 40, 2, 16, 4, [[1, 20, 38]], [[0, 39, 21]]),
    "globals-at-edges": (1, 37, 1, 32, 3, [[0, 36]], [[5, 6, 7]]),
    "all-global": (1, 33, 2, 16, 2, [list(range(33))], [[]]),
    "all-valid-global": (1, 33, 1, 16, 5, [[i for i in range(33) if i % 4]], [[i for i in range(33) if not i % 4]]),
    "no-global-no-pad": (1, 67, 2, 16, 6, [[]], [[]]),
    "one-global-mixed-batch": (2, 67, 1, 16, 7, [[], [13]], [[2, 66], []]),
}


@pytest.mark.parametrize("name", list(FIXED_CASES))
def test_fixed_layouts_fp32(name):
    B, N, H, D, w, glob, pad = FIXED_CASES[name]
    is_global, key_padding = _masks_from_lists(B, N, glob, pad)
    check_case(B, N, H, D, w, is_global, key_padding, seed=len(name))


RANDOM_CASES = [
    # (B, N, H, D, w, p_pad, p_glob)
    (1, 7, 2, 16, 100, 0.3, 0.3),    # window wider than N
    (1, 67, 2, 16, 5, 0.2, 0.1),     # N not a multiple of any block
    (2, 67, 1, 32, 9, 0.2, 0.0),     # no globals at all (G = 0): kernels 2-3 skipped
    (2, 130, 1, 32, 20, 0.15, 0.1),  # B = 2, different layouts, several query and key tiles
    (1, 33, 1, 64, 4, 0.1, 0.2),     # D = 64
    (1, 67, 1, 16, 1, 0.5, 0.05),    # w = 1, heavy padding
    (2, 50, 2, 16, 64, 0.0, 0.5),    # every band key may be global; w > N
]


@pytest.mark.parametrize("B,N,H,D,w,p_pad,p_glob", RANDOM_CASES)
def test_random_layouts_fp32(B, N, H, D, w, p_pad, p_glob):
    is_global, key_padding = random_masks(B, N, seed=N + w, p_pad=p_pad, p_glob=p_glob)
    check_case(B, N, H, D, w, is_global, key_padding, seed=N * w)


@pytest.mark.parametrize("w", [12, 1000])
def test_locore_layout_fp32(w):
    """T = 50 blocks: [SEP] every T-th token and the query block's tokens global."""
    is_global, key_padding = locore_masks(K=2, T=50, seed=w)
    N = is_global.shape[1]
    check_case(1, N, 1, 32, w, is_global, key_padding, seed=w)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    B, N, H, D, w = 2, 67, 1, 32, 9
    is_global, key_padding = random_masks(B, N, seed=3)
    check_case(B, N, H, D, w, is_global, key_padding, seed=4, dtype=dtype)


@pytest.mark.skipif(not INTERPRETED, reason="tile shapes are fixed only under the interpreter")
@pytest.mark.parametrize("local_cfg,global_cfg", [
    ({"BLOCK_M": 16, "BLOCK_N": 32}, {"BLOCK_M": 32, "BLOCK_N": 16}),
    ({"BLOCK_M": 16, "BLOCK_N": 16}, {"BLOCK_M": 16, "BLOCK_N": 32}),
])
def test_other_tile_shapes(monkeypatch, local_cfg, global_cfg):
    """Tiles taller or shorter than the key tiles: the band's three stages and the splits move."""
    monkeypatch.setattr(ta, "INTERPRETER_LOCAL_CONFIG", local_cfg)
    monkeypatch.setattr(ta, "INTERPRETER_GLOBAL_CONFIG", global_cfg)
    B, N, H, D, w = 2, 83, 1, 16, 11
    is_global, key_padding = random_masks(B, N, seed=8)
    check_case(B, N, H, D, w, is_global, key_padding, seed=9)


# ------------------------------------------------------------------------------------------------
# determinism, the public entries, strides
# ------------------------------------------------------------------------------------------------

def test_bit_identical_across_runs():
    B, N, H, D, w = 2, 130, 1, 16, 10
    is_global, key_padding = random_masks(B, N, seed=5, p_glob=0.2)
    G = int(is_global.sum(1).max())
    if INTERPRETED:  # make sure the split + combine path is really exercised
        cfg = ta.INTERPRETER_GLOBAL_CONFIG
        assert ta.plan_splits(N, G, B * H, cfg["BLOCK_N"], 2 * cfg["BLOCK_N"], 8)[0] > 1
    proj = make_projections(B, N, H, D, seed=6, dtype=torch.bfloat16 if HAS_CUDA else torch.float32)
    first = run_poisoned(proj, is_global, key_padding, w)
    second = run_poisoned(proj, is_global, key_padding, w)
    assert torch.equal(first, second)


def test_public_op_and_layout_entry_with_strided_inputs():
    B, N, H, D, w = 2, 45, 2, 16, 6
    is_global, key_padding = random_masks(B, N, seed=11)
    gen = torch.Generator().manual_seed(12)
    # q, k, v: slices of one packed [B, N, 3, H, D] projection (unit last stride, odd strides);
    # the global ones: [B, N, D, H] transposed, so the last stride is not 1 (made contiguous inside)
    packed = torch.randn(B, N, 3, H, D, generator=gen).to(DEVICE)
    q, k, v = packed.unbind(2)
    qg, kg, vg = (torch.randn(B, N, D, H, generator=gen).to(DEVICE).transpose(-1, -2) for _ in range(3))
    assert not q.is_contiguous() and kg.stride(-1) != 1
    proj = [q, k, v, qg, kg, vg]
    ref = reference64(proj, is_global, key_padding, w)

    out = longformer_attention(q, k, v, qg, kg, vg, is_global=is_global, key_padding=key_padding,
                               one_sided_window=w, backend="triton")
    torch.testing.assert_close(out.double(), ref, **FP32_TOL)

    layout = build_layout(is_global, key_padding, w)
    out2 = attention_with_layout(q, k, v, layout.gather_global(qg), kg, vg, layout, backend="triton")
    assert torch.equal(out, out2)
    assert torch.isfinite(out).all() and (out[key_padding] == 0).all()


def test_unsupported_head_dim_is_a_value_error():
    q = torch.zeros(1, 4, 1, 48, device=DEVICE)
    masks = torch.zeros(1, 4, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match="head dim"):
        longformer_attention(q, q, q, q, q, q, is_global=masks, key_padding=masks, one_sided_window=2,
                             backend="triton")
    layout = build_layout(masks, masks, 2)
    with pytest.raises(ValueError, match="head dim"):
        attention_with_layout(q, q, q, q[:, :0], q, q, layout, backend="triton")
    with pytest.raises(ValueError, match="head dim"):
        attention_rows(q, q, q, torch.arange(4, device=DEVICE), layout, backend="triton")


@pytest.mark.parametrize("n", [1, 2, 127, 128, 129, 5050, 40400])
@pytest.mark.parametrize("g", [1, 150])
def test_split_plan_covers_every_key_once(n, g):
    splits, keys = ta.plan_splits(n, g, 12, 128, 256, 264)
    assert keys % 128 == 0 and keys > 0
    assert (splits - 1) * keys < n <= splits * keys  # no empty split, no key left out


# ------------------------------------------------------------------------------------------------
# property test
# ------------------------------------------------------------------------------------------------

@settings(max_examples=20, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    B=st.integers(1, 2), N=st.integers(1, 48), H=st.integers(1, 2), D=st.sampled_from([16, 32]),
    w=st.integers(1, 60), p_pad=st.sampled_from([0.0, 0.2, 0.6]), p_glob=st.sampled_from([0.0, 0.1, 0.4, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_property_matches_reference(B, N, H, D, w, p_pad, p_glob, seed):
    is_global, key_padding = random_masks(B, N, seed, p_pad, p_glob)
    check_case(B, N, H, D, w, is_global, key_padding, seed=seed)


# ------------------------------------------------------------------------------------------------
# GPU: the compiled kernels at the model's size
# ------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_locore_size(dtype):
    is_global, key_padding = locore_masks(K=100, T=50, seed=1)  # N = 5050, ~150 globals
    B, N, H, D, w = 1, is_global.shape[1], 12, 64, 256
    proj = make_projections(B, N, H, D, seed=2, dtype=dtype)
    out = run_poisoned(proj, is_global, key_padding, w)
    tol = dict(atol=2e-5, rtol=1e-5) if dtype == torch.float32 else None
    check_against_reference(out, proj, is_global, key_padding, w, tol=tol)
    assert torch.equal(out, run_poisoned(proj, is_global, key_padding, w))


@pytest.mark.gpu
@pytest.mark.parametrize("D", [32, 128])
def test_gpu_batch_of_different_layouts(D):
    B, N, H, w = 2, 1500, 4, 512
    is_global, key_padding = random_masks(B, N, seed=D, p_pad=0.1, p_glob=0.03)
    check_case(B, N, H, D, w, is_global, key_padding, seed=D, dtype=torch.bfloat16)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture():
    """No host sync inside the op: it can be captured once the autotuner has run."""
    is_global, key_padding = locore_masks(K=20, T=50, seed=3)
    B, N, H, D, w = 1, is_global.shape[1], 12, 64, 256
    layout = build_layout(is_global, key_padding, w)
    proj = make_projections(B, N, H, D, seed=4, dtype=torch.bfloat16)
    q, k, v, qg, kg, vg = proj
    qg_gathered = layout.gather_global(qg)
    eager = ta.triton_attention(q, k, v, qg_gathered, kg, vg, layout)  # warm-up: compile + autotune
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ta.triton_attention(q, k, v, qg_gathered, kg, vg, layout)
    fresh = make_projections(B, N, H, D, seed=5, dtype=torch.bfloat16)
    for dst, src in zip((q, k, v, qg, kg, vg), fresh):
        dst.copy_(src)
    qg_gathered.copy_(layout.gather_global(qg))
    graph.replay()
    torch.cuda.synchronize()
    assert not torch.equal(captured, eager)
    assert torch.equal(captured, ta.triton_attention(q, k, v, qg_gathered, kg, vg, layout))


@pytest.mark.parametrize("w", list(range(1, 34)) + [47, 48, 49, 63, 64, 65])
def test_window_sweep_hits_every_tile_boundary(w):
    """Every residue of w modulo the tile sizes: the band's edge and full stages meet exactly right."""
    B, N, H, D = 1, 70, 1, 16
    is_global, key_padding = _masks_from_lists(B, N, [[9, 50]], [[]])
    check_case(B, N, H, D, w, is_global, key_padding, seed=w)
