"""Longformer sliding-window + global-token attention in Triton (two fused kernels + a combine; a rows kernel).

Math (SPEC section 3), per batch item b and head h, with scale s = 1/sqrt(D):

* valid non-global row i (local projections q, k, v):
      K(i) = {j : j global} U {j : j valid, not global, |i - j| <= w}
      out[i] = sum_{j in K(i)} softmax_j(s * q_i . k_j) v_j          (one softmax over the union)
* global row i (global projections): keys = every valid token j,
      out[i] = sum_j softmax_j(s * qg_i . kg_j) vg_j
* padded row i: out[i] = 0 exactly.

Softmax is computed online in fp32 (flash-attention style) with base-2 exponentials: the logits are
multiplied by s * log2(e) so exp(x) = exp2(x * log2(e)) costs one exp2. A running row maximum m, row
sum l and unnormalised accumulator acc are kept; a new tile of logits x rescales them by
alpha = exp2(m_old - m_new). Masked logits are -inf; a row that has seen no key yet keeps m = -inf and
its exponentials are taken against 0 instead of -inf, so -inf - -inf never produces a NaN.

Tiling:

1. ``_local_rows_kernel``, grid (cdiv(N, BLOCK_M), B*H): one program = BLOCK_M consecutive query rows
   of one (b, h). It first walks the compact global-key list ``layout.global_idx[b, :num_global[b]]``
   in chunks of BLOCK_N (gathered k/v rows), then the key tiles of BLOCK_N (aligned to BLOCK_N) that
   intersect the band [start_m - w, start_m + BLOCK_M - 1 + w] clipped to [0, N). The band tiles are
   split in three stages like the tutorial's causal stages: tiles entirely inside the band for every
   row of the tile skip the |i - j| <= w test, the tiles on both edges apply it. Work per row is
   O(G + 2w + BLOCK_M), never O(N). It stores non-global rows only (padded rows as exact 0).
2. ``_global_rows_split_kernel``, grid (cdiv(G, BLOCK_M), num_splits, B*H): the gathered global
   queries against all N keys, split along the keys into ``num_splits`` chunks (a multiple of every
   BLOCK_N, fixed on the host, so the split never depends on the autotuned config). Each program
   writes its partial (m, l, acc) to fp32 scratch.
3. ``_global_rows_combine_kernel``, grid (cdiv(G, BLOCK_G), B*H): merges the splits in a fixed order
   (no atomics: bit-identical run to run) and scatters the rows to ``out`` at ``global_idx``.

4. ``_row_list_kernel``, grid (cdiv(R, BLOCK_M), B*H): kernel 1's rule for a list of R rows (the rows op,
   the model's pruned last layer), sorted by position on the host; every band tile applies |i - j| <= w.

Kernel 1 never stores a global row and kernel 3 stores only global rows, so launch order does not
matter. Dots on fp32 inputs use ``input_precision="ieee"`` (no TF32): the model's fp32 "exact" mode
relies on it; for fp16/bf16 the flag has no effect. No host synchronisation happens in
``triton_attention`` (``layout.max_global`` is a python int), so it can be captured in a CUDA graph
once the autotuner has run (call it once outside the capture first).

Under ``TRITON_INTERPRET=1`` (CPU tensors) the kernels run with one fixed, small config and no
autotuning, which keeps the interpreter tests fast and still exercises multi-tile paths.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

from .env import triton_interpreter_enabled as _interpreting
from .layout import AttentionLayout

LOG2E = 1.4426950408889634

# Fixed configs used under the interpreter (tests may monkeypatch these to try other tile shapes).
# BLOCK_M != BLOCK_N on purpose, so no code path can silently assume square tiles.
INTERPRETER_LOCAL_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 16}
INTERPRETER_GLOBAL_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16}
COMBINE_BLOCK_G = 16

# The rows op is small (the model's pruned layer: one row per image): one fixed config per dtype family.
ROWS_CONFIG_16BIT = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
ROWS_CONFIG_FP32 = {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 8, "num_stages": 2}  # 32x32 (4 or 8 warps) spills at D = 128 (gpu_static)

# Split sizes of the global kernel are multiples of this many keys (the largest BLOCK_N on GPU).
GPU_SPLIT_ALIGN = 128
GPU_MIN_SPLIT_KEYS = 256


def _install_interpreter_index_shim() -> None:
    """Let the Triton 3.6 interpreter use tensor loop bounds (``range(lo, hi)``) with NumPy >= 2.4.

    The interpreter stores every scalar as a 1-element array and converts it with ``int(array)``,
    which NumPy 2.4 turned into a TypeError. This re-registers ``tl.tensor.__index__`` (only inside
    interpreted kernels) to read the single element; nothing changes for compiled kernels.
    """
    from triton.runtime import interpreter

    if getattr(interpreter, "_locore_index_shim", False):
        return
    original = interpreter._patch_lang_tensor

    def _index(self):
        data = np.asarray(self.handle.data)
        if data.size != 1:
            raise TypeError(f"only single-element tensors can be used as an index, got shape {data.shape}")
        return int(data.reshape(-1)[0])

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", _index)

    interpreter._patch_lang_tensor = patched
    interpreter._locore_index_shim = True


if _interpreting():
    _install_interpreter_index_shim()


# ----------------------------------------------------------------------------------------------
# Shared inner steps
# ----------------------------------------------------------------------------------------------

@triton.jit
def _dot_qk(q, k_t, UPCAST: tl.constexpr):
    """q @ k^T in fp32; fp32 inputs use exact IEEE products (no TF32)."""
    if UPCAST:  # interpreter only: its dot cannot multiply bfloat16 (stored as raw uint16)
        q = q.to(tl.float32)
        k_t = k_t.to(tl.float32)
    return tl.dot(q, k_t, input_precision="ieee")


@triton.jit
def _dot_acc(p, v, acc, UPCAST: tl.constexpr):
    """acc + p @ v with fp32 accumulation (p already rounded to v's dtype)."""
    if UPCAST:
        p = p.to(tl.float32)
        v = v.to(tl.float32)
    return tl.dot(p, v, acc, input_precision="ieee")


@triton.jit
def _online_softmax_update(acc, l_i, m_i, s, v, qk_scale, UPCAST: tl.constexpr):
    """One key tile of online softmax.

    s: [BLOCK_M, BLOCK_N] raw fp32 scores q . k, -inf where masked; m_i is kept in log2 units
    (scores times qk_scale = log2(e) / sqrt(D)), so each probability is one FMA and one exp2.
    """
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    # A row with no unmasked key so far has m_new = -inf: subtract 0 instead (exp2(-inf) = 0, no NaN).
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_ref)
    p = tl.math.exp2(s * qk_scale - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = _dot_acc(p.to(v.dtype), v, acc, UPCAST)
    return acc, l_i, m_new


@triton.jit
def _band_tiles(acc, l_i, m_i, q, k_base, v_base, bandkey_base, stride_kn, stride_vn,
                offs_m, offs_d, lo, hi, N, W, qk_scale,
                BLOCK_N: tl.constexpr, DIAG_MASK: tl.constexpr, UPCAST: tl.constexpr):
    """Key tiles [lo, hi) (aligned to BLOCK_N) of the band; DIAG_MASK: apply |i - j| <= w."""
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_seq = offs_n < N  # the last tile may run past the sequence end
        k = tl.load(k_base + (offs_n[:, None] * stride_kn + offs_d[None, :]), mask=in_seq[:, None], other=0.0)
        v = tl.load(v_base + (offs_n[:, None] * stride_vn + offs_d[None, :]), mask=in_seq[:, None], other=0.0)
        # band keys are valid and not global (globals come from the global loop); none past N
        keep = (tl.load(bandkey_base + offs_n, mask=in_seq, other=0) != 0)[None, :]
        if DIAG_MASK:
            keep = keep & (tl.abs(offs_m[:, None] - offs_n[None, :]) <= W)  # the sliding window
        s = tl.where(keep, _dot_qk(q, tl.trans(k), UPCAST), float("-inf"))
        acc, l_i, m_i = _online_softmax_update(acc, l_i, m_i, s, v, qk_scale, UPCAST)
    return acc, l_i, m_i


@triton.jit
def _global_key_tiles(acc, l_i, m_i, q, k_base, v_base, gidx_base, n_glob, stride_kn, stride_vn, offs_d, qk_scale,
                      BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    """The compact global-key list ``gidx_base[:n_glob]`` in chunks of BLOCK_N gathered k/v rows."""
    for start_g in range(0, n_glob, BLOCK_N):
        offs_g = start_g + tl.arange(0, BLOCK_N)
        g_in = offs_g < n_glob  # the last chunk of the global list runs past num_global[b]
        idx = tl.load(gidx_base + offs_g, mask=g_in, other=0)
        k = tl.load(k_base + (idx[:, None] * stride_kn + offs_d[None, :]), mask=g_in[:, None], other=0.0)
        v = tl.load(v_base + (idx[:, None] * stride_vn + offs_d[None, :]), mask=g_in[:, None], other=0.0)
        s = tl.where(g_in[None, :], _dot_qk(q, tl.trans(k), UPCAST), float("-inf"))
        acc, l_i, m_i = _online_softmax_update(acc, l_i, m_i, s, v, qk_scale, UPCAST)
    return acc, l_i, m_i


# ----------------------------------------------------------------------------------------------
# Kernel 1: non-global rows
# ----------------------------------------------------------------------------------------------

@triton.jit
def _local_rows_kernel(
    Q, K, V, Out, IsGlobal, KeyPad, BandKey, GIdx, NumGlobal,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_on, stride_oh,
    stride_mb, stride_gb,
    N, H, W, qk_scale,
    N_KEY,  # bucketed N: autotune key only
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    start_m = pid_m * BLOCK_M

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_in = offs_m < N  # the last query tile may run past the sequence end

    # int64 base per (b, h); in-tile offsets stay int32 (the host checks N * stride_n < 2**31)
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    o_base = Out + off_b * stride_ob + off_h * stride_oh
    mask_off = off_b * stride_mb

    row_pad = tl.load(KeyPad + mask_off + offs_m, mask=row_in, other=1) != 0  # padded rows: output 0
    row_glob = tl.load(IsGlobal + mask_off + offs_m, mask=row_in, other=0) != 0  # kernel 3's rows
    row_active = row_in & (~row_pad) & (~row_glob)
    tile_active = tl.sum(row_active.to(tl.int32), 0) > 0  # all rows padded/global: skip every key loop

    q = tl.load(q_base + (offs_m[:, None] * stride_qn + offs_d[None, :]), mask=row_in[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # -- stage 0: the compact list of global keys (seen by every non-global row) --
    n_glob = tl.load(NumGlobal + off_b)
    n_glob = tl.where(tile_active, n_glob, 0)
    acc, l_i, m_i = _global_key_tiles(acc, l_i, m_i, q, k_base, v_base, GIdx + off_b * stride_gb, n_glob,
                                      stride_kn, stride_vn, offs_d, qk_scale, BLOCK_N, UPCAST)

    # -- stages 1-3: band key tiles, aligned to BLOCK_N, covering [start_m - w, start_m + BLOCK_M - 1 + w] --
    lo = (tl.maximum(start_m - W, 0) // BLOCK_N) * BLOCK_N
    hi = tl.cdiv(tl.minimum(start_m + BLOCK_M + W, N), BLOCK_N) * BLOCK_N
    hi = tl.where(tile_active, hi, lo)
    # full tiles [full_lo, full_hi): every (i, j) of the tile has |i - j| <= w
    full_lo = tl.cdiv(tl.maximum(start_m + BLOCK_M - 1 - W, 0), BLOCK_N) * BLOCK_N
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = ((start_m + W + 1) // BLOCK_N) * BLOCK_N
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)

    bandkey_base = BandKey + mask_off
    acc, l_i, m_i = _band_tiles(acc, l_i, m_i, q, k_base, v_base, bandkey_base, stride_kn, stride_vn,
                                offs_m, offs_d, lo, full_lo, N, W, qk_scale, BLOCK_N, True, UPCAST)
    acc, l_i, m_i = _band_tiles(acc, l_i, m_i, q, k_base, v_base, bandkey_base, stride_kn, stride_vn,
                                offs_m, offs_d, full_lo, full_hi, N, W, qk_scale, BLOCK_N, False, UPCAST)
    acc, l_i, m_i = _band_tiles(acc, l_i, m_i, q, k_base, v_base, bandkey_base, stride_kn, stride_vn,
                                offs_m, offs_d, full_hi, hi, N, W, qk_scale, BLOCK_N, True, UPCAST)

    # a valid non-global row always has itself as a key, so l_i > 0 there; elsewhere avoid 0/0
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    out = tl.where(row_pad[:, None], 0.0, out)  # padded rows: exactly 0
    # global rows belong to the combine kernel; rows past N do not exist
    store_row = row_in & (~row_glob)
    tl.store(o_base + (offs_m[:, None] * stride_on + offs_d[None, :]), out.to(Out.dtype.element_ty),
             mask=store_row[:, None])


# ----------------------------------------------------------------------------------------------
# Kernel 2: global rows, split along the keys; kernel 3: deterministic combine + scatter
# ----------------------------------------------------------------------------------------------

@triton.jit
def _global_rows_split_kernel(
    QG, KG, VG, KeyPad, NumGlobal, MPart, LPart, AccPart,
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_mb,
    N, H, G, NUM_SPLITS, SPLIT_KEYS, qk_scale,
    N_KEY, G_KEY,  # bucketed N and G: autotune keys only
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    off_bh = tl.program_id(2)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)

    offs_g = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    n_glob = tl.load(NumGlobal + off_b)
    row_in = offs_g < n_glob  # rows past num_global[b] are filler in q_global_gathered

    q_base = QG + off_b * stride_qb + off_h * stride_qh
    q = tl.load(q_base + (offs_g[:, None] * stride_qn + offs_d[None, :]), mask=row_in[:, None], other=0.0)
    k_base = KG + off_b * stride_kb + off_h * stride_kh
    v_base = VG + off_b * stride_vb + off_h * stride_vh
    pad_base = KeyPad + off_b * stride_mb

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    lo = split * SPLIT_KEYS
    hi = tl.minimum(lo + SPLIT_KEYS, N)
    hi = tl.where(pid_m * BLOCK_M < n_glob, hi, lo)  # this item has no global row in this tile: skip
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_split = offs_n < hi  # the last tile may run past the split / sequence end
        k = tl.load(k_base + (offs_n[:, None] * stride_kn + offs_d[None, :]), mask=in_split[:, None], other=0.0)
        v = tl.load(v_base + (offs_n[:, None] * stride_vn + offs_d[None, :]), mask=in_split[:, None], other=0.0)
        is_key = tl.load(pad_base + offs_n, mask=in_split, other=1) == 0  # valid tokens only
        s = tl.where(is_key[None, :], _dot_qk(q, tl.trans(k), UPCAST), float("-inf"))
        acc, l_i, m_i = _online_softmax_update(acc, l_i, m_i, s, v, qk_scale, UPCAST)

    # partials, laid out [B*H, NUM_SPLITS, G(, D)]; m = -inf, l = 0, acc = 0 for an all-padded split
    part = (off_bh.to(tl.int64) * NUM_SPLITS + split) * G
    tl.store(MPart + part + offs_g, m_i, mask=row_in)
    tl.store(LPart + part + offs_g, l_i, mask=row_in)
    tl.store(AccPart + (part + offs_g[:, None]) * HEAD_DIM + offs_d[None, :], acc, mask=row_in[:, None])


@triton.jit
def _global_rows_combine_kernel(
    MPart, LPart, AccPart, Out, GIdx, NumGlobal,
    stride_ob, stride_on, stride_oh, stride_gb,
    H, G, NUM_SPLITS,
    HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr,
):
    pid_g = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)

    offs_g = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    n_glob = tl.load(NumGlobal + off_b)
    row_in = offs_g < n_glob  # only the item's real global rows are merged and stored
    base = off_bh.to(tl.int64) * NUM_SPLITS * G

    m_max = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    for s in range(0, NUM_SPLITS):
        m_s = tl.load(MPart + base + s * G + offs_g, mask=row_in, other=float("-inf"))
        m_max = tl.maximum(m_max, m_s)
    m_ref = tl.where(m_max == float("-inf"), 0.0, m_max)  # no NaN even for a row without keys

    l_tot = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
    for s in range(0, NUM_SPLITS):  # fixed order: deterministic
        part = base + s * G
        m_s = tl.load(MPart + part + offs_g, mask=row_in, other=float("-inf"))
        l_s = tl.load(LPart + part + offs_g, mask=row_in, other=0.0)
        a_s = tl.load(AccPart + (part + offs_g[:, None]) * HEAD_DIM + offs_d[None, :],
                      mask=row_in[:, None], other=0.0)
        alpha = tl.math.exp2(m_s - m_ref)
        l_tot += l_s * alpha
        acc += a_s * alpha[:, None]

    out = acc / tl.where(l_tot > 0.0, l_tot, 1.0)[:, None]
    dest = tl.load(GIdx + off_b * stride_gb + offs_g, mask=row_in, other=0).to(tl.int64)
    tl.store(Out + off_b * stride_ob + off_h * stride_oh + dest[:, None] * stride_on + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=row_in[:, None])


# ----------------------------------------------------------------------------------------------
# Rows op: kernel 1's rule for a list of rows (the model's pruned last layer)
# ----------------------------------------------------------------------------------------------

@triton.jit
def _row_list_kernel(
    Q, K, V, Out, KeyPad, BandKey, GIdx, NumGlobal, RowPos, RowDest,
    stride_qb, stride_qr, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_or, stride_oh,
    stride_mb, stride_gb,
    N, R, H, W, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
):
    """Grid (cdiv(R, BLOCK_M), B*H): BLOCK_M entries of the row list, sorted by position on the host
    (RowPos ascending; RowDest = each entry's index in the caller's list, where q is read and out
    written). Same two stages as kernel 1: the global keys, then the key tiles covering
    [first position - w, last position + w], every tile masked to |i - j| <= w per row."""
    pid_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)

    offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    r_in = offs_r < R  # the last block of the list runs past R
    pos = tl.load(RowPos + offs_r, mask=r_in, other=0)
    dest = tl.load(RowDest + offs_r, mask=r_in, other=0)

    q_base = Q + off_b * stride_qb + off_h * stride_qh
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    o_base = Out + off_b * stride_ob + off_h * stride_oh
    mask_off = off_b * stride_mb

    row_pad = tl.load(KeyPad + mask_off + pos, mask=r_in, other=1) != 0  # padded rows: output 0
    row_active = r_in & (~row_pad)  # a listed global row follows the non-global rule too
    tile_active = tl.sum(row_active.to(tl.int32), 0) > 0

    q = tl.load(q_base + (dest[:, None] * stride_qr + offs_d[None, :]), mask=r_in[:, None], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    n_glob = tl.where(tile_active, tl.load(NumGlobal + off_b), 0)
    acc, l_i, m_i = _global_key_tiles(acc, l_i, m_i, q, k_base, v_base, GIdx + off_b * stride_gb, n_glob,
                                      stride_kn, stride_vn, offs_d, qk_scale, BLOCK_N, UPCAST)

    first = tl.min(tl.where(row_active, pos, N), 0)
    last = tl.max(tl.where(row_active, pos, -1), 0)
    lo = (tl.maximum(first - W, 0) // BLOCK_N) * BLOCK_N
    hi = tl.where(tile_active, tl.minimum(last + W + 1, N), lo)
    acc, l_i, m_i = _band_tiles(acc, l_i, m_i, q, k_base, v_base, BandKey + mask_off, stride_kn, stride_vn,
                                pos, offs_d, lo, hi, N, W, qk_scale, BLOCK_N, True, UPCAST)

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # rows without keys (padded, past R) avoid 0/0
    out = tl.where(row_pad[:, None], 0.0, acc / l_safe[:, None])  # padded rows: exactly 0
    tl.store(o_base + (dest[:, None] * stride_or + offs_d[None, :]), out.to(Out.dtype.element_ty),
             mask=r_in[:, None])


# ----------------------------------------------------------------------------------------------
# Autotuned variants (CUDA only)
# ----------------------------------------------------------------------------------------------

# bf16/fp16: tensor-core tiles (tutorial sizes for Hopper). fp32 runs exact IEEE dots on the FMA
# units, so it gets smaller tiles and more warps per tile and a shorter list (each config compiles
# slowly). Every config here compiles for sm_90a without a register spill at D = 64 and D = 128
# (the autotuner may pick any of them at either): benchmarks/gpu_static.py checks this. Dropped for
# spilling: local 128x64 with 4 warps and 128x128 (8 warps, 2 stages); local fp32 64x32 (8 warps) and
# 32x32 (4 warps), which spill heavily at D = 128.
_LOCAL_CONFIGS_16BIT = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
]
_LOCAL_CONFIGS_FP32 = [
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=2),
]
_GLOBAL_CONFIGS_16BIT = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=2),
]
_GLOBAL_CONFIGS_FP32 = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=2),
]
assert all(GPU_SPLIT_ALIGN % c.kwargs["BLOCK_N"] == 0 for c in _GLOBAL_CONFIGS_16BIT + _GLOBAL_CONFIGS_FP32)


def _dtype_pruner(first_arg: str, fp32_configs: list):
    fp32_ids = {id(c) for c in fp32_configs}

    def prune(configs, named_args, **kwargs):
        want_fp32 = named_args[first_arg].dtype == torch.float32
        return [c for c in configs if (id(c) in fp32_ids) == want_fp32]

    return prune


@functools.lru_cache(maxsize=None)
def _tuned_kernels():
    """Autotuned kernels (CUDA). Keys: bucketed N, w, D (+ every tensor dtype, added by Triton)."""
    local = triton.autotune(
        configs=_LOCAL_CONFIGS_16BIT + _LOCAL_CONFIGS_FP32, key=["N_KEY", "W", "HEAD_DIM"],
        prune_configs_by={"early_config_prune": _dtype_pruner("Q", _LOCAL_CONFIGS_FP32)},
    )(_local_rows_kernel)
    glob = triton.autotune(
        configs=_GLOBAL_CONFIGS_16BIT + _GLOBAL_CONFIGS_FP32, key=["N_KEY", "G_KEY", "HEAD_DIM"],
        prune_configs_by={"early_config_prune": _dtype_pruner("QG", _GLOBAL_CONFIGS_FP32)},
    )(_global_rows_split_kernel)
    return local, glob


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def plan_splits(n: int, g: int, bh: int, align: int, min_split_keys: int, target_programs: int) -> tuple[int, int]:
    """(num_splits, keys per split) for the global kernel: enough programs to fill the device,
    splits of at least ``min_split_keys`` keys, sizes a multiple of ``align`` (every BLOCK_N)."""
    row_tiles = max(1, -(-g // 64)) * max(bh, 1)
    want = max(1, -(-target_programs // row_tiles))
    most = max(1, -(-n // max(min_split_keys, align)))
    splits = min(want, most)
    per_split = -(-n // splits)
    split_keys = -(-per_split // align) * align
    return -(-n // split_keys), split_keys


def _bucket(x: int) -> int:
    return 1 if x <= 1 else triton.next_power_of_2(x)


def _rows_last_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def triton_attention(
    q: Tensor, k: Tensor, v: Tensor,
    q_global_gathered: Tensor, k_global: Tensor, v_global: Tensor,
    layout: AttentionLayout, *, out: Optional[Tensor] = None,
) -> Tensor:
    """Longformer attention for ``layout`` (see the module docstring); returns [B, N, H, D].

    q, k, v, k_global, v_global: [B, N, H, D]; q_global_gathered: [B, G, H, D] in ``layout.global_idx``
    order (rows >= num_global[b] ignored). Any strides with a unit last-dim stride are used as they
    are (others are made contiguous once). ``out`` (optional, [B, N, H, D] contiguous, the inputs'
    dtype) receives the result; every row of it is written. No host synchronisation.
    Device, dtype and head dim are checked by the dispatch (``backends.TritonBackend``).
    """
    B, N, H, D = q.shape
    G = layout.max_global
    if tuple(q_global_gathered.shape) != (B, G, H, D):
        raise ValueError(f"q_global_gathered has shape {tuple(q_global_gathered.shape)}, expected {(B, G, H, D)}")
    if out is None:
        out = torch.empty((B, N, H, D), dtype=q.dtype, device=q.device)
    elif tuple(out.shape) != (B, N, H, D) or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be [B, N, H, D] = {(B, N, H, D)} of dtype {q.dtype} with unit last stride")
    if B == 0 or N == 0 or H == 0:
        return out

    q, k, v, k_global, v_global = (_rows_last_contiguous(t) for t in (q, k, v, k_global, v_global))
    qg = _rows_last_contiguous(q_global_gathered)
    if max(t.stride(1) for t in (q, k, v, k_global, v_global, qg, out)) * max(N, G) >= 2**31:
        raise ValueError("triton_attention: a [N, H, D] slice of the inputs exceeds int32 element offsets")
    is_global = layout.is_global.contiguous()
    key_padding = layout.key_padding.contiguous()
    band_key = layout.band_key.contiguous()
    global_idx = layout.global_idx.contiguous()
    num_global = layout.num_global.contiguous()

    w = min(layout.one_sided_window, N)  # |i - j| <= N - 1 always: same result, no int32 overflow
    qk_scale = LOG2E / math.sqrt(D)
    interp = _interpreting() or q.device.type != "cuda"
    upcast = interp and q.dtype == torch.bfloat16  # see _dot_qk
    n_key = _bucket(N)

    local_args = (
        q, k, v, out, is_global, key_padding, band_key, global_idx, num_global,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        is_global.stride(0), global_idx.stride(0),
        N, H, w, qk_scale, n_key,
    )
    if interp:
        cfg = INTERPRETER_LOCAL_CONFIG
        grid = (triton.cdiv(N, cfg["BLOCK_M"]), B * H)
        _local_rows_kernel[grid](*local_args, HEAD_DIM=D, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                                 UPCAST=upcast)
    else:
        local_kernel, _ = _tuned_kernels()
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H)  # noqa: E731
        local_kernel[grid](*local_args, HEAD_DIM=D, UPCAST=False)

    if G == 0:  # no global token anywhere in the batch
        return out

    if interp:
        gcfg = INTERPRETER_GLOBAL_CONFIG
        num_splits, split_keys = plan_splits(N, G, B * H, gcfg["BLOCK_N"], 2 * gcfg["BLOCK_N"], 8)
    else:
        num_splits, split_keys = plan_splits(N, G, B * H, GPU_SPLIT_ALIGN, GPU_MIN_SPLIT_KEYS,
                                             2 * _sm_count(q.device.index or 0))
    m_part = torch.empty((B * H, num_splits, G), dtype=torch.float32, device=q.device)
    l_part = torch.empty_like(m_part)
    acc_part = torch.empty((B * H, num_splits, G, D), dtype=torch.float32, device=q.device)

    global_args = (
        qg, k_global, v_global, key_padding, num_global, m_part, l_part, acc_part,
        qg.stride(0), qg.stride(1), qg.stride(2),
        k_global.stride(0), k_global.stride(1), k_global.stride(2),
        v_global.stride(0), v_global.stride(1), v_global.stride(2),
        key_padding.stride(0),
        N, H, G, num_splits, split_keys, qk_scale, n_key, _bucket(G),
    )
    if interp:
        grid = (triton.cdiv(G, gcfg["BLOCK_M"]), num_splits, B * H)
        _global_rows_split_kernel[grid](*global_args, HEAD_DIM=D, BLOCK_M=gcfg["BLOCK_M"],
                                        BLOCK_N=gcfg["BLOCK_N"], UPCAST=upcast)
    else:
        _, global_kernel = _tuned_kernels()
        grid = lambda meta: (triton.cdiv(G, meta["BLOCK_M"]), num_splits, B * H)  # noqa: E731
        global_kernel[grid](*global_args, HEAD_DIM=D, UPCAST=False)

    _global_rows_combine_kernel[(triton.cdiv(G, COMBINE_BLOCK_G), B * H)](
        m_part, l_part, acc_part, out, global_idx, num_global,
        out.stride(0), out.stride(1), out.stride(2), global_idx.stride(0),
        H, G, num_splits,
        HEAD_DIM=D, BLOCK_G=COMBINE_BLOCK_G,
    )
    return out


def triton_rows_attention(q_rows: Tensor, k: Tensor, v: Tensor, rows: Tensor, layout: AttentionLayout) -> Tensor:
    """Kernel 1's rule for the rows ``rows`` [R] (any order, repeats allowed) -> [B, R, H, D] in q_rows'
    dtype: q_rows [B, R, H, D] their local queries, k, v [B, N, H, D] every token's. The list is sorted
    by position once on the device (one argsort), so each program's band is one short interval."""
    B, N, H, D = k.shape
    R = rows.shape[0]
    out = torch.empty((B, R, H, D), dtype=q_rows.dtype, device=q_rows.device)
    if B == 0 or N == 0 or H == 0 or R == 0:
        return out
    q_rows, k, v = (_rows_last_contiguous(t) for t in (q_rows, k, v))
    if max(t.stride(1) for t in (q_rows, k, v, out)) * max(N, R) >= 2**31:
        raise ValueError("triton_rows_attention: a [N, H, D] slice of the inputs exceeds int32 element offsets")
    order = torch.argsort(rows, stable=True)
    row_pos = rows[order].to(torch.int32).contiguous()
    row_dest = order.to(torch.int32).contiguous()
    key_padding = layout.key_padding.contiguous()
    band_key = layout.band_key.contiguous()
    global_idx = layout.global_idx.contiguous()
    num_global = layout.num_global.contiguous()
    interp = _interpreting() or q_rows.device.type != "cuda"
    if interp:
        cfg = dict(INTERPRETER_LOCAL_CONFIG)
    else:
        cfg = dict(ROWS_CONFIG_FP32 if q_rows.dtype == torch.float32 else ROWS_CONFIG_16BIT)
    grid = (triton.cdiv(R, cfg["BLOCK_M"]), B * H)
    _row_list_kernel[grid](
        q_rows, k, v, out, key_padding, band_key, global_idx, num_global, row_pos, row_dest,
        q_rows.stride(0), q_rows.stride(1), q_rows.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        key_padding.stride(0), global_idx.stride(0),
        N, R, H, min(layout.one_sided_window, N), LOG2E / math.sqrt(D),
        HEAD_DIM=D, UPCAST=interp and q_rows.dtype == torch.bfloat16, **cfg,
    )
    return out
