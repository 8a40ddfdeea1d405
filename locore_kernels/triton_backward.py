"""Training kernels in Triton: a forward that also returns the per-row log-sum-exp, and the backward.

Math (SPEC section 3), per batch item b and head h, scale c = 1/sqrt(D). A row i with key set K(i)
(a valid non-global row: every global key and the valid non-global keys with |i - j| <= w, with
q, k, v; a global row: every valid key, with q_global, k_global, v_global) has

    lse_i = log sum_{j in K(i)} exp(c q_i.k_j),   P_ij = exp(c q_i.k_j - lse_i),   out_i = sum_j P_ij v_j.

Backward, with Delta_i = dout_i . out_i (computed once on the host side, O(N)):

    dP_ij = dout_i . v_j,   dS_ij = P_ij (dP_ij - Delta_i),
    dq_i = c sum_j dS_ij k_j,   dk_j = c sum_i dS_ij q_i,   dv_j = sum_i P_ij dout_i.

P is recomputed tile by tile from q, k and lse (exp2 with log2(e) folded into the scale); nothing
O(N^2) is stored. Every gradient row is owned by one program that loops over its partners in a
fixed order: no atomics, so results are deterministic.

Kernels (grid axis 1 = B*H everywhere):
  forward  ``_fwd_local_kernel``   (cdiv(N, BLOCK_M)): non-global rows, global keys then band tiles;
           ``_fwd_global_kernel``  (cdiv(G, BLOCK_M)): gathered global rows against every valid key.
  backward ``_bwd_local_dq_kernel``      (cdiv(N, BLOCK_M)): dq of non-global rows;
           ``_bwd_band_dkdv_kernel``     (cdiv(N, BLOCK_N)): dk, dv of band keys from the rows of
                                          their window (tiles of BLOCK_M rows covering [j - w, j + w]);
           ``_bwd_global_key_dkdv_kernel`` (cdiv(G, BLOCK_N)): dk, dv of the global tokens as keys
                                          of every non-global row;
           ``_bwd_global_dq_kernel``     (cdiv(G, BLOCK_M)): dq_global of the global rows;
           ``_bwd_global_dkdv_kernel``   (cdiv(N, BLOCK_N)): dk_global, dv_global of every valid key
                                          from every global row.
Accumulation is fp32 (fp64 for float64 inputs, which the interpreter's gradient checks use).
All tensors are contiguous [B, N, H, D] (the gathered global queries [B, G, H, D]); lse and Delta
are [B, H, N].
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .layout import AttentionLayout
from .backends import TRITON_HEAD_DIMS as SUPPORTED_HEAD_DIMS
from .env import triton_interpreter_enabled as _interpreting
from .triton_attention import LOG2E

TRAIN_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Tile sizes: interpreter (small, BLOCK_M != BLOCK_N so no path assumes square tiles) and GPU.
INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32}
GPU_CONFIG_16BIT = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4}
GPU_CONFIG_32BIT = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4}


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    """a @ b with exact products (no TF32); UPCAST: interpreter bf16, which its dot cannot multiply."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _probs_and_dscores(q, do, k, v, lse2, delta, keep, qk_scale, UPCAST: tl.constexpr):
    """P and dS of one [BLOCK_M rows, BLOCK_N keys] tile; entries outside ``keep`` exactly 0."""
    s = _dot(q, tl.trans(k), UPCAST)
    p = tl.where(keep, tl.math.exp2(s * qk_scale - lse2[:, None]), 0.0)
    dp = _dot(do, tl.trans(v), UPCAST)
    return p, p * (dp - delta[:, None])


@triton.jit
def _online_update(acc, l_i, m_i, s, v, qk_scale, UPCAST: tl.constexpr):
    """One key tile of online softmax (m_i in log2 units); s is -inf where masked."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key yet: avoid -inf - -inf
    alpha = tl.math.exp2(m_i - m_ref)
    p = tl.math.exp2(s * qk_scale - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST)
    return acc, l_i, m_new


# ----------------------------------------------------------------------------------------------
# Forward with LSE
# ----------------------------------------------------------------------------------------------

@triton.jit
def _fwd_local_kernel(Q, K, V, Out, Lse, IsGlobal, KeyPad, BandKey, GIdx, NumGlobal,
                      N, H, G, W, qk_scale,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      ACC: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    rs = H * HEAD_DIM  # row stride of [B, N, H, D]
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    base = off_b * N * rs + off_h * HEAD_DIM
    row_in = offs_m < N  # the last tile may run past the sequence end
    row_pad = tl.load(KeyPad + off_b * N + offs_m, mask=row_in, other=1) != 0
    row_glob = tl.load(IsGlobal + off_b * N + offs_m, mask=row_in, other=0) != 0
    row_active = row_in & (~row_pad) & (~row_glob)

    q = tl.load(Q + base + offs_m[:, None] * rs + offs_d[None, :], mask=row_in[:, None], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=ACC)

    n_glob = tl.load(NumGlobal + off_b)
    for start_g in range(0, n_glob, BLOCK_N):  # every global key, with k and v
        offs_g = start_g + tl.arange(0, BLOCK_N)
        g_in = offs_g < n_glob  # the last chunk runs past num_global[b]
        idx = tl.load(GIdx + off_b * G + offs_g, mask=g_in, other=0)
        k = tl.load(K + base + idx[:, None] * rs + offs_d[None, :], mask=g_in[:, None], other=0.0)
        v = tl.load(V + base + idx[:, None] * rs + offs_d[None, :], mask=g_in[:, None], other=0.0)
        s = tl.where(g_in[None, :], _dot(q, tl.trans(k), UPCAST).to(ACC), float("-inf"))
        acc, l_i, m_i = _online_update(acc, l_i, m_i, s, v, qk_scale, UPCAST)

    lo = (tl.maximum(start_m - W, 0) // BLOCK_N) * BLOCK_N
    hi = tl.minimum(start_m + BLOCK_M + W, N)
    for start_n in range(lo, hi, BLOCK_N):  # band tiles covering [start_m - w, start_m + BLOCK_M - 1 + w]
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_in = offs_n < N
        k = tl.load(K + base + offs_n[:, None] * rs + offs_d[None, :], mask=n_in[:, None], other=0.0)
        v = tl.load(V + base + offs_n[:, None] * rs + offs_d[None, :], mask=n_in[:, None], other=0.0)
        band = tl.load(BandKey + off_b * N + offs_n, mask=n_in, other=0) != 0  # valid, not global
        keep = band[None, :] & (tl.abs(offs_m[:, None] - offs_n[None, :]) <= W)  # the sliding window
        s = tl.where(keep, _dot(q, tl.trans(k), UPCAST).to(ACC), float("-inf"))
        acc, l_i, m_i = _online_update(acc, l_i, m_i, s, v, qk_scale, UPCAST)

    l_safe = tl.where(row_active, l_i, 1.0)  # an active row always sees itself: l > 0
    out = tl.where(row_active[:, None], acc / l_safe[:, None], 0.0)  # padded rows: exactly 0
    store = row_in & (~row_glob)  # global rows belong to _fwd_global_kernel
    tl.store(Out + base + offs_m[:, None] * rs + offs_d[None, :], out.to(Out.dtype.element_ty), mask=store[:, None])
    lse = tl.where(row_active, (m_i + tl.math.log2(l_safe)) / 1.4426950408889634, 0.0)  # natural log
    tl.store(Lse + off_bh.to(tl.int64) * N + offs_m, lse.to(Lse.dtype.element_ty), mask=store)


@triton.jit
def _fwd_global_kernel(QG, KG, VG, Out, Lse, KeyPad, GIdx, NumGlobal,
                       N, H, G, qk_scale,
                       HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       ACC: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    rs = H * HEAD_DIM
    offs_g = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    n_glob = tl.load(NumGlobal + off_b)
    row_in = offs_g < n_glob  # rows past num_global[b] are filler
    base = off_b * N * rs + off_h * HEAD_DIM
    q = tl.load(QG + off_b * G * rs + off_h * HEAD_DIM + offs_g[:, None] * rs + offs_d[None, :],
                mask=row_in[:, None], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=ACC)
    hi = tl.where(pid_m * BLOCK_M < n_glob, N, 0)  # no global row in this tile: skip the keys
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_in = offs_n < N
        k = tl.load(KG + base + offs_n[:, None] * rs + offs_d[None, :], mask=n_in[:, None], other=0.0)
        v = tl.load(VG + base + offs_n[:, None] * rs + offs_d[None, :], mask=n_in[:, None], other=0.0)
        is_key = tl.load(KeyPad + off_b * N + offs_n, mask=n_in, other=1) == 0  # every valid token
        s = tl.where(is_key[None, :], _dot(q, tl.trans(k), UPCAST).to(ACC), float("-inf"))
        acc, l_i, m_i = _online_update(acc, l_i, m_i, s, v, qk_scale, UPCAST)
    l_safe = tl.where(row_in, l_i, 1.0)
    dest = tl.load(GIdx + off_b * G + offs_g, mask=row_in, other=0).to(tl.int64)
    tl.store(Out + base + dest[:, None] * rs + offs_d[None, :], (acc / l_safe[:, None]).to(Out.dtype.element_ty),
             mask=row_in[:, None])
    lse = (m_i + tl.math.log2(l_safe)) / 1.4426950408889634
    tl.store(Lse + off_bh.to(tl.int64) * N + dest, lse.to(Lse.dtype.element_ty), mask=row_in)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------

@triton.jit
def _bwd_local_dq_kernel(Q, K, V, DO, Lse, Delta, DQ, IsGlobal, KeyPad, BandKey, GIdx, NumGlobal,
                         N, H, G, W, qk_scale, sm_scale,
                         HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         ACC: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    rs = H * HEAD_DIM
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    base = off_b * N * rs + off_h * HEAD_DIM
    stat = off_bh.to(tl.int64) * N
    row_in = offs_m < N
    row_active = row_in & (tl.load(BandKey + off_b * N + offs_m, mask=row_in, other=0) != 0)  # valid non-global
    q = tl.load(Q + base + offs_m[:, None] * rs + offs_d[None, :], mask=row_active[:, None], other=0.0)
    do = tl.load(DO + base + offs_m[:, None] * rs + offs_d[None, :], mask=row_active[:, None], other=0.0)
    lse2 = tl.load(Lse + stat + offs_m, mask=row_active, other=0.0).to(ACC) * 1.4426950408889634
    delta = tl.load(Delta + stat + offs_m, mask=row_active, other=0.0).to(ACC)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=ACC)

    n_glob = tl.load(NumGlobal + off_b)
    for start_g in range(0, n_glob, BLOCK_N):
        offs_g = start_g + tl.arange(0, BLOCK_N)
        g_in = offs_g < n_glob  # the last chunk runs past num_global[b]
        idx = tl.load(GIdx + off_b * G + offs_g, mask=g_in, other=0)
        k = tl.load(K + base + idx[:, None] * rs + offs_d[None, :], mask=g_in[:, None], other=0.0)
        v = tl.load(V + base + idx[:, None] * rs + offs_d[None, :], mask=g_in[:, None], other=0.0)
        keep = row_active[:, None] & g_in[None, :]
        p, ds = _probs_and_dscores(q, do, k, v, lse2, delta, keep, qk_scale, UPCAST)
        dq = _dot(ds.to(k.dtype), k, UPCAST) + dq

    lo = (tl.maximum(start_m - W, 0) // BLOCK_N) * BLOCK_N
    hi = tl.minimum(start_m + BLOCK_M + W, N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_in = offs_n < N
        k = tl.load(K + base + offs_n[:, None] * rs + offs_d[None, :], mask=n_in[:, None], other=0.0)
        v = tl.load(V + base + offs_n[:, None] * rs + offs_d[None, :], mask=n_in[:, None], other=0.0)
        band = tl.load(BandKey + off_b * N + offs_n, mask=n_in, other=0) != 0
        keep = row_active[:, None] & band[None, :] & (tl.abs(offs_m[:, None] - offs_n[None, :]) <= W)
        p, ds = _probs_and_dscores(q, do, k, v, lse2, delta, keep, qk_scale, UPCAST)
        dq = _dot(ds.to(k.dtype), k, UPCAST) + dq

    tl.store(DQ + base + offs_m[:, None] * rs + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=row_in[:, None])  # global and padded rows: 0


@triton.jit
def _bwd_band_dkdv_kernel(Q, K, V, DO, Lse, Delta, DK, DV, IsGlobal, BandKey,
                          N, H, W, qk_scale, sm_scale,
                          HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          ACC: tl.constexpr, UPCAST: tl.constexpr):
    pid_n = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    rs = H * HEAD_DIM
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    base = off_b * N * rs + off_h * HEAD_DIM
    stat = off_bh.to(tl.int64) * N
    n_in = offs_n < N
    band = n_in & (tl.load(BandKey + off_b * N + offs_n, mask=n_in, other=0) != 0)  # band keys of the tile
    k = tl.load(K + base + offs_n[:, None] * rs + offs_d[None, :], mask=band[:, None], other=0.0)
    v = tl.load(V + base + offs_n[:, None] * rs + offs_d[None, :], mask=band[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=ACC)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=ACC)

    lo = (tl.maximum(start_n - W, 0) // BLOCK_M) * BLOCK_M
    hi = tl.minimum(start_n + BLOCK_N + W, N)
    for start_m in range(lo, hi, BLOCK_M):  # row tiles covering [start_n - w, start_n + BLOCK_N - 1 + w]
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_in = offs_m < N
        row_active = m_in & (tl.load(BandKey + off_b * N + offs_m, mask=m_in, other=0) != 0)  # non-global rows
        q = tl.load(Q + base + offs_m[:, None] * rs + offs_d[None, :], mask=row_active[:, None], other=0.0)
        do = tl.load(DO + base + offs_m[:, None] * rs + offs_d[None, :], mask=row_active[:, None], other=0.0)
        lse2 = tl.load(Lse + stat + offs_m, mask=row_active, other=0.0).to(ACC) * 1.4426950408889634
        delta = tl.load(Delta + stat + offs_m, mask=row_active, other=0.0).to(ACC)
        keep = row_active[:, None] & band[None, :] & (tl.abs(offs_m[:, None] - offs_n[None, :]) <= W)
        p, ds = _probs_and_dscores(q, do, k, v, lse2, delta, keep, qk_scale, UPCAST)
        dv = _dot(tl.trans(p).to(do.dtype), do, UPCAST) + dv
        dk = _dot(tl.trans(ds).to(q.dtype), q, UPCAST) + dk

    key_glob = tl.load(IsGlobal + off_b * N + offs_n, mask=n_in, other=0) != 0
    store = n_in & (~key_glob)  # global tokens' dk / dv: _bwd_global_key_dkdv_kernel
    ptrs = base + offs_n[:, None] * rs + offs_d[None, :]
    tl.store(DK + ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=store[:, None])
    tl.store(DV + ptrs, dv.to(DV.dtype.element_ty), mask=store[:, None])


@triton.jit
def _bwd_global_key_dkdv_kernel(Q, K, V, DO, Lse, Delta, DK, DV, BandKey, GIdx, NumGlobal,
                                N, H, G, qk_scale, sm_scale,
                                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                ACC: tl.constexpr, UPCAST: tl.constexpr):
    pid_n = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    rs = H * HEAD_DIM
    offs_g = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    base = off_b * N * rs + off_h * HEAD_DIM
    stat = off_bh.to(tl.int64) * N
    n_glob = tl.load(NumGlobal + off_b)
    g_in = offs_g < n_glob  # keys past num_global[b] are filler
    idx = tl.load(GIdx + off_b * G + offs_g, mask=g_in, other=0).to(tl.int64)
    k = tl.load(K + base + idx[:, None] * rs + offs_d[None, :], mask=g_in[:, None], other=0.0)
    v = tl.load(V + base + idx[:, None] * rs + offs_d[None, :], mask=g_in[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=ACC)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=ACC)
    hi = tl.where(pid_n * BLOCK_N < n_glob, N, 0)  # no global key in this tile: skip the rows
    for start_m in range(0, hi, BLOCK_M):  # every non-global row sees every global key
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_in = offs_m < N
        row_active = m_in & (tl.load(BandKey + off_b * N + offs_m, mask=m_in, other=0) != 0)
        q = tl.load(Q + base + offs_m[:, None] * rs + offs_d[None, :], mask=row_active[:, None], other=0.0)
        do = tl.load(DO + base + offs_m[:, None] * rs + offs_d[None, :], mask=row_active[:, None], other=0.0)
        lse2 = tl.load(Lse + stat + offs_m, mask=row_active, other=0.0).to(ACC) * 1.4426950408889634
        delta = tl.load(Delta + stat + offs_m, mask=row_active, other=0.0).to(ACC)
        keep = row_active[:, None] & g_in[None, :]
        p, ds = _probs_and_dscores(q, do, k, v, lse2, delta, keep, qk_scale, UPCAST)
        dv = _dot(tl.trans(p).to(do.dtype), do, UPCAST) + dv
        dk = _dot(tl.trans(ds).to(q.dtype), q, UPCAST) + dk
    ptrs = base + idx[:, None] * rs + offs_d[None, :]
    tl.store(DK + ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=g_in[:, None])
    tl.store(DV + ptrs, dv.to(DV.dtype.element_ty), mask=g_in[:, None])


@triton.jit
def _bwd_global_dq_kernel(QG, KG, VG, DO, Lse, Delta, DQG, KeyPad, GIdx, NumGlobal,
                          N, H, G, qk_scale, sm_scale,
                          HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          ACC: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    rs = H * HEAD_DIM
    offs_g = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    base = off_b * N * rs + off_h * HEAD_DIM
    gbase = off_b * G * rs + off_h * HEAD_DIM
    stat = off_bh.to(tl.int64) * N
    n_glob = tl.load(NumGlobal + off_b)
    row_in = offs_g < n_glob
    pos = tl.load(GIdx + off_b * G + offs_g, mask=row_in, other=0).to(tl.int64)  # the rows' token positions
    q = tl.load(QG + gbase + offs_g[:, None] * rs + offs_d[None, :], mask=row_in[:, None], other=0.0)
    do = tl.load(DO + base + pos[:, None] * rs + offs_d[None, :], mask=row_in[:, None], other=0.0)
    lse2 = tl.load(Lse + stat + pos, mask=row_in, other=0.0).to(ACC) * 1.4426950408889634
    delta = tl.load(Delta + stat + pos, mask=row_in, other=0.0).to(ACC)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=ACC)
    hi = tl.where(pid_m * BLOCK_M < n_glob, N, 0)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_in = offs_n < N
        k = tl.load(KG + base + offs_n[:, None] * rs + offs_d[None, :], mask=n_in[:, None], other=0.0)
        v = tl.load(VG + base + offs_n[:, None] * rs + offs_d[None, :], mask=n_in[:, None], other=0.0)
        is_key = tl.load(KeyPad + off_b * N + offs_n, mask=n_in, other=1) == 0  # every valid token
        keep = row_in[:, None] & is_key[None, :]
        p, ds = _probs_and_dscores(q, do, k, v, lse2, delta, keep, qk_scale, UPCAST)
        dq = _dot(ds.to(k.dtype), k, UPCAST) + dq
    tl.store(DQG + gbase + offs_g[:, None] * rs + offs_d[None, :], (dq * sm_scale).to(DQG.dtype.element_ty),
             mask=(offs_g < G)[:, None])  # filler rows past num_global[b]: 0


@triton.jit
def _bwd_global_dkdv_kernel(QG, KG, VG, DO, Lse, Delta, DKG, DVG, KeyPad, GIdx, NumGlobal,
                            N, H, G, qk_scale, sm_scale,
                            HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            ACC: tl.constexpr, UPCAST: tl.constexpr):
    pid_n = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    rs = H * HEAD_DIM
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    base = off_b * N * rs + off_h * HEAD_DIM
    gbase = off_b * G * rs + off_h * HEAD_DIM
    stat = off_bh.to(tl.int64) * N
    n_in = offs_n < N
    is_key = n_in & (tl.load(KeyPad + off_b * N + offs_n, mask=n_in, other=1) == 0)
    k = tl.load(KG + base + offs_n[:, None] * rs + offs_d[None, :], mask=is_key[:, None], other=0.0)
    v = tl.load(VG + base + offs_n[:, None] * rs + offs_d[None, :], mask=is_key[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=ACC)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=ACC)
    n_glob = tl.load(NumGlobal + off_b)
    for start_g in range(0, n_glob, BLOCK_M):  # every global row sees every valid key
        offs_g = start_g + tl.arange(0, BLOCK_M)
        row_in = offs_g < n_glob
        pos = tl.load(GIdx + off_b * G + offs_g, mask=row_in, other=0).to(tl.int64)
        q = tl.load(QG + gbase + offs_g[:, None] * rs + offs_d[None, :], mask=row_in[:, None], other=0.0)
        do = tl.load(DO + base + pos[:, None] * rs + offs_d[None, :], mask=row_in[:, None], other=0.0)
        lse2 = tl.load(Lse + stat + pos, mask=row_in, other=0.0).to(ACC) * 1.4426950408889634
        delta = tl.load(Delta + stat + pos, mask=row_in, other=0.0).to(ACC)
        keep = row_in[:, None] & is_key[None, :]
        p, ds = _probs_and_dscores(q, do, k, v, lse2, delta, keep, qk_scale, UPCAST)
        dv = _dot(tl.trans(p).to(do.dtype), do, UPCAST) + dv
        dk = _dot(tl.trans(ds).to(q.dtype), q, UPCAST) + dk
    ptrs = base + offs_n[:, None] * rs + offs_d[None, :]
    tl.store(DKG + ptrs, (dk * sm_scale).to(DKG.dtype.element_ty), mask=n_in[:, None])
    tl.store(DVG + ptrs, dv.to(DVG.dtype.element_ty), mask=n_in[:, None])


# ----------------------------------------------------------------------------------------------
# Host wrappers
# ----------------------------------------------------------------------------------------------

def _config(dtype: torch.dtype) -> dict:
    if _interpreting():
        return dict(INTERPRETER_CONFIG)
    return dict(GPU_CONFIG_16BIT if dtype in (torch.float16, torch.bfloat16) else GPU_CONFIG_32BIT)


def _common(q: Tensor, layout: AttentionLayout):
    B, N, H, D = q.shape
    if q.device.type != "cuda" and not _interpreting():
        raise ValueError(f"the Triton backward needs CUDA tensors (or TRITON_INTERPRET=1), got device {q.device}")
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"the Triton backward supports head dim D in {SUPPORTED_HEAD_DIMS}, got D={D}")
    if q.dtype not in TRAIN_DTYPES:
        raise ValueError(f"the Triton backward supports float16/bfloat16/float32/float64, got {q.dtype}")
    if N * H * D >= 2**31:
        raise ValueError("the Triton backward: a [N, H, D] slice exceeds int32 element offsets")
    cfg = _config(q.dtype)
    meta = dict(HEAD_DIM=D, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                ACC=tl.float64 if q.dtype == torch.float64 else tl.float32,
                UPCAST=_interpreting() and q.dtype == torch.bfloat16)
    if "num_warps" in cfg:
        meta["num_warps"] = cfg["num_warps"]
    masks = tuple(m.contiguous() for m in (layout.is_global, layout.key_padding, layout.band_key,
                                           layout.global_idx, layout.num_global))
    return B, N, H, D, layout.max_global, min(layout.one_sided_window, N), meta, masks


def triton_attention_with_lse(
    q: Tensor, k: Tensor, v: Tensor,
    q_global_gathered: Tensor, k_global: Tensor, v_global: Tensor,
    layout: AttentionLayout,
) -> tuple[Tensor, Tensor]:
    """Forward -> (out [B, N, H, D] in the inputs' dtype, lse [B, H, N] fp32 (fp64 for fp64 inputs)).
    Inputs contiguous, as ``triton_attention``; lse is 0 at padded rows."""
    B, N, H, D, G, w, meta, (is_global, key_padding, band_key, global_idx, num_global) = _common(q, layout)
    out = torch.zeros((B, N, H, D), dtype=q.dtype, device=q.device)
    lse = torch.zeros((B, H, N), dtype=torch.float64 if q.dtype == torch.float64 else torch.float32,
                      device=q.device)
    if out.numel() == 0:
        return out, lse
    qk_scale = LOG2E / math.sqrt(D)
    _fwd_local_kernel[(triton.cdiv(N, meta["BLOCK_M"]), B * H)](
        q, k, v, out, lse, is_global, key_padding, band_key, global_idx, num_global, N, H, G, w, qk_scale, **meta)
    if G > 0:
        _fwd_global_kernel[(triton.cdiv(G, meta["BLOCK_M"]), B * H)](
            q_global_gathered, k_global, v_global, out, lse, key_padding, global_idx, num_global,
            N, H, G, qk_scale, **meta)
    return out, lse


def triton_attention_backward(
    q: Tensor, k: Tensor, v: Tensor,
    q_global_gathered: Tensor, k_global: Tensor, v_global: Tensor,
    out: Tensor, lse: Tensor, grad_out: Tensor, layout: AttentionLayout,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dq_global_gathered, dk_global, dv_global) from the saved forward state (all
    contiguous). Deterministic: no atomics, each gradient row summed by one program in a fixed order."""
    B, N, H, D, G, w, meta, (is_global, key_padding, band_key, global_idx, num_global) = _common(q, layout)
    grads = [torch.zeros_like(t) for t in (q, k, v, q_global_gathered, k_global, v_global)]
    if q.numel() == 0:
        return tuple(grads)
    dq, dk, dv, dqg, dkg, dvg = grads
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    # Delta_i = dout_i . out_i, [B, H, N]
    delta = (grad_out.to(acc_dtype) * out.to(acc_dtype)).sum(-1).transpose(1, 2).contiguous()
    qk_scale = LOG2E / math.sqrt(D)
    sm_scale = 1.0 / math.sqrt(D)
    BM, BN = meta["BLOCK_M"], meta["BLOCK_N"]
    _bwd_local_dq_kernel[(triton.cdiv(N, BM), B * H)](
        q, k, v, grad_out, lse, delta, dq, is_global, key_padding, band_key, global_idx, num_global,
        N, H, G, w, qk_scale, sm_scale, **meta)
    _bwd_band_dkdv_kernel[(triton.cdiv(N, BN), B * H)](
        q, k, v, grad_out, lse, delta, dk, dv, is_global, band_key, N, H, w, qk_scale, sm_scale, **meta)
    if G > 0:
        _bwd_global_key_dkdv_kernel[(triton.cdiv(G, BN), B * H)](
            q, k, v, grad_out, lse, delta, dk, dv, band_key, global_idx, num_global,
            N, H, G, qk_scale, sm_scale, **meta)
        _bwd_global_dq_kernel[(triton.cdiv(G, BM), B * H)](
            q_global_gathered, k_global, v_global, grad_out, lse, delta, dqg, key_padding, global_idx, num_global,
            N, H, G, qk_scale, sm_scale, **meta)
        _bwd_global_dkdv_kernel[(triton.cdiv(N, BN), B * H)](
            q_global_gathered, k_global, v_global, grad_out, lse, delta, dkg, dvg, key_padding, global_idx,
            num_global, N, H, G, qk_scale, sm_scale, **meta)
    return dq, dk, dv, dqg, dkg, dvg
