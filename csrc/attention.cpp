// Longformer sliding-window + global-token attention, fp32, C++17 + OpenMP (+ AVX2/FMA inner loops).
//
// Work decomposition (every output row is written by exactly one task; no atomics, no thread-count
// dependent arithmetic, so results are bit-identical run to run and for any number of threads):
//
//  * local tasks  (b, h, query block of BQ positions): the block's valid non-global rows attend to
//    the compact global-key list, then to the band keys [first_row - w, last_row + w] (clipped, only
//    valid non-global keys), one online softmax over the union, keys processed in chunks of KC.
//    Padded rows of the block are written as exact zeros; global rows are left to the global tasks.
//  * global tasks (b, h, block of BQ global rows, key split): global queries attend to every valid
//    key with k_global / v_global. When there are few (b, h, row-block) tasks the valid keys are
//    split into a fixed (shape-derived) number of ranges whose partial softmax states are combined
//    in split order afterwards.
//
// The driver runs in named steps that mirror the Triton file's kernels: validate_layout, plan_attention,
// local_task (Triton kernel 1), global_task (kernel 2), combine_global_splits (kernel 3), all inside one
// OpenMP region (run_tasks). The rows entry (longformer_rows_fp32, the model's pruned last layer; Triton
// _row_list_kernel) reuses validate_layout and the local rule attend_local_rows on blocks of BQ listed
// rows sorted by position.
//
// Per task the scores live in a KC x BQ tile stored key-major (S[t * BQ + r]): the QK^T micro-kernel
// broadcasts one element of each of 3 keys against the block's 32 query rows (4 vectors; queries
// packed transposed, D x BQ, pre-scaled by log2(e)/sqrt(D) so the softmax uses exp2), the softmax
// runs vectorised across rows, and the PV micro-kernel keeps a (<= 6)-row x 16-column output tile in
// registers while streaming the chunk's value rows. K and V are read in place ([B, N, H, D], row
// stride H*D): no packed copies. Scratch per thread is O(BQ * (D + KC) + G + w); the shared index
// lists are O(B * N). Nothing is O(N^2).
#include "attention.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <stdexcept>
#include <vector>

#if LOCORE_OPENMP
#include <omp.h>
#endif

#if defined(__AVX2__) && defined(__FMA__)
#define LOCORE_AVX2 1
#include <immintrin.h>
#else
#define LOCORE_AVX2 0
#endif

namespace locore {
namespace {

constexpr int BQ = 32;          // query rows per block (multiple of 8)
constexpr int NVMAX = BQ / 8;   // 8-wide row vectors per block
constexpr int64_t KC = 256;     // keys per softmax chunk
constexpr int PV_ROWS = 6;      // rows of the PV register tile
constexpr int PF_AHEAD = 8;     // value rows prefetched ahead in the PV loop (kp/vp padded by this)
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

// ---------------------------------------------------------------------------------------------
// Aligned scratch
// ---------------------------------------------------------------------------------------------
template <typename T>
class AlignedBuf {
 public:
  explicit AlignedBuf(size_t n) : n_(n) {
    size_t bytes = ((std::max<size_t>(n, 1) * sizeof(T) + 63) / 64) * 64;
    ptr_ = static_cast<T*>(std::aligned_alloc(64, bytes));
    if (!ptr_) throw std::bad_alloc();
  }
  ~AlignedBuf() { std::free(ptr_); }
  AlignedBuf(const AlignedBuf&) = delete;
  AlignedBuf& operator=(const AlignedBuf&) = delete;
  T* data() { return ptr_; }
  size_t size() const { return n_; }

 private:
  T* ptr_ = nullptr;
  size_t n_ = 0;
};

struct Scratch {
  AlignedBuf<float> qt;      // [D][BQ] scaled queries, transposed
  AlignedBuf<float> s;       // [KC][BQ] scores / probabilities, key-major
  AlignedBuf<float> acc;     // [BQ][D] unnormalised output
  AlignedBuf<float> m, l, alpha;  // [BQ] running max (log2 domain), running sum, chunk rescale
  AlignedBuf<int32_t> rowpos;     // [BQ] positions of the block's rows
  AlignedBuf<int32_t> keys;       // key list of a local task (G + band)
  AlignedBuf<const float*> kp, vp;  // [KC] row pointers of the current chunk
  Scratch(int64_t D, int64_t max_keys)
      : qt(D * BQ), s(KC * BQ), acc(BQ * D), m(BQ), l(BQ), alpha(BQ), rowpos(BQ),
        keys(max_keys), kp(KC + PF_AHEAD), vp(KC + PF_AHEAD) {}
};

// ---------------------------------------------------------------------------------------------
// Inner loops
// ---------------------------------------------------------------------------------------------
#if LOCORE_AVX2

// 2^x for x <= 0 (x = -inf allowed), relative error ~2e-7; exact 0 below 2^-100 (no denormals).
static inline __m256 exp2_ps(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-100.0f);
  __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(lo, x);  // operand order: a NaN x is returned as is (NaN in, NaN out)
  __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 f = _mm256_sub_ps(x, n);  // [-0.5, 0.5]
  // Cephes exp2f polynomial: 2^f = 1 + f * P(f)
  __m256 p = _mm256_set1_ps(1.535336188319500e-4f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.339887440266574e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618437357674640e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550332471162809e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402264791363012e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931472028550421e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  __m256 r = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  return _mm256_andnot_ps(under, r);
}

// GCC keeps arrays of __m256 accumulators mirrored on the stack (a store per FMA), so the register
// tiles below use named variables; `if constexpr` drops the unused ones.
#define LOCORE_FMA4(k, a0, a1, a2, a3)       \
  a0 = _mm256_fmadd_ps(k, q0, a0);           \
  a1 = _mm256_fmadd_ps(k, q1, a1);           \
  a2 = _mm256_fmadd_ps(k, q2, a2);           \
  a3 = _mm256_fmadd_ps(k, q3, a3)

// S[u*BQ + i] = sum_d QT[d*BQ + i] * kp[u][d] for the KT (1..3) keys kp[0..KT) and all BQ = 32 rows.
template <int KT>
static inline void qk_tile(const float* __restrict QT, int64_t D, const float* const* kp,
                           float* __restrict S) {
  static_assert(BQ == 32 && KT >= 1 && KT <= 3, "qk_tile is written for 32 rows and 1..3 keys");
  __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;
  __m256 a10 = a00, a11 = a00, a12 = a00, a13 = a00;
  __m256 a20 = a00, a21 = a00, a22 = a00, a23 = a00;
  const float* k0 = kp[0];
  const float* k1 = KT > 1 ? kp[1] : k0;
  const float* k2 = KT > 2 ? kp[2] : k0;
  for (int64_t d = 0; d < D; ++d) {
    const float* qd = QT + d * BQ;
    const __m256 q0 = _mm256_load_ps(qd), q1 = _mm256_load_ps(qd + 8), q2 = _mm256_load_ps(qd + 16),
                 q3 = _mm256_load_ps(qd + 24);
    {
      const __m256 kb = _mm256_broadcast_ss(k0 + d);
      LOCORE_FMA4(kb, a00, a01, a02, a03);
    }
    if constexpr (KT > 1) {
      const __m256 kb = _mm256_broadcast_ss(k1 + d);
      LOCORE_FMA4(kb, a10, a11, a12, a13);
    }
    if constexpr (KT > 2) {
      const __m256 kb = _mm256_broadcast_ss(k2 + d);
      LOCORE_FMA4(kb, a20, a21, a22, a23);
    }
  }
  _mm256_store_ps(S, a00); _mm256_store_ps(S + 8, a01); _mm256_store_ps(S + 16, a02); _mm256_store_ps(S + 24, a03);
  if constexpr (KT > 1) {
    float* s1 = S + BQ;
    _mm256_store_ps(s1, a10); _mm256_store_ps(s1 + 8, a11); _mm256_store_ps(s1 + 16, a12); _mm256_store_ps(s1 + 24, a13);
  }
  if constexpr (KT > 2) {
    float* s2 = S + 2 * BQ;
    _mm256_store_ps(s2, a20); _mm256_store_ps(s2 + 8, a21); _mm256_store_ps(s2 + 16, a22); _mm256_store_ps(s2 + 24, a23);
  }
}
#undef LOCORE_FMA4

static inline void prefetch_row(const float* p, int64_t D) {
  for (int64_t d = 0; d < D; d += 16) _mm_prefetch(reinterpret_cast<const char*>(p + d), _MM_HINT_T0);
}

static void qk_chunk(const float* QT, int64_t D, const float* const* kp, int64_t nc, float* S) {
  int64_t t = 0;
  for (; t + 3 <= nc; t += 3) {
    if (t + 6 <= nc) {  // next tile's key rows
      prefetch_row(kp[t + 3], D);
      prefetch_row(kp[t + 4], D);
      prefetch_row(kp[t + 5], D);
    }
    qk_tile<3>(QT, D, kp + t, S + t * BQ);
  }
  if (nc - t == 2) qk_tile<2>(QT, D, kp + t, S + t * BQ);
  if (nc - t == 1) qk_tile<1>(QT, D, kp + t, S + t * BQ);
}

// Online-softmax step over one chunk, vectorised across rows: updates m, l, writes alpha and
// replaces the scores by unnormalised probabilities 2^(s - m_new).
static void softmax_chunk(float* S, int64_t nc, float* m, float* l, float* alpha) {
  const __m256 ninf = _mm256_set1_ps(NEG_INF);
  for (int v = 0; v < NVMAX; ++v) {
    __m256 mx0 = ninf, mx1 = ninf;
    int64_t t = 0;
    for (; t + 2 <= nc; t += 2) {
      mx0 = _mm256_max_ps(mx0, _mm256_load_ps(S + t * BQ + 8 * v));
      mx1 = _mm256_max_ps(mx1, _mm256_load_ps(S + (t + 1) * BQ + 8 * v));
    }
    if (t < nc) mx0 = _mm256_max_ps(mx0, _mm256_load_ps(S + t * BQ + 8 * v));
    __m256 mold = _mm256_load_ps(m + 8 * v);
    __m256 mnew = _mm256_max_ps(mold, _mm256_max_ps(mx0, mx1));
    // rows with every key masked so far keep m = -inf; use 0 as the reference to avoid inf - inf
    __m256 msafe = _mm256_blendv_ps(mnew, _mm256_setzero_ps(), _mm256_cmp_ps(mnew, ninf, _CMP_EQ_OQ));
    __m256 a = exp2_ps(_mm256_sub_ps(mold, msafe));
    __m256 sum0 = _mm256_setzero_ps(), sum1 = _mm256_setzero_ps();
    t = 0;
    for (; t + 2 <= nc; t += 2) {
      float* p0 = S + t * BQ + 8 * v;
      float* p1 = p0 + BQ;
      __m256 e0 = exp2_ps(_mm256_sub_ps(_mm256_load_ps(p0), msafe));
      __m256 e1 = exp2_ps(_mm256_sub_ps(_mm256_load_ps(p1), msafe));
      _mm256_store_ps(p0, e0);
      _mm256_store_ps(p1, e1);
      sum0 = _mm256_add_ps(sum0, e0);
      sum1 = _mm256_add_ps(sum1, e1);
    }
    if (t < nc) {
      float* p0 = S + t * BQ + 8 * v;
      __m256 e0 = exp2_ps(_mm256_sub_ps(_mm256_load_ps(p0), msafe));
      _mm256_store_ps(p0, e0);
      sum0 = _mm256_add_ps(sum0, e0);
    }
    __m256 lnew = _mm256_fmadd_ps(_mm256_load_ps(l + 8 * v), a, _mm256_add_ps(sum0, sum1));
    _mm256_store_ps(l + 8 * v, lnew);
    _mm256_store_ps(m + 8 * v, mnew);
    _mm256_store_ps(alpha + 8 * v, a);
  }
}

// acc[r0 + r][d0 .. d0 + 16) = alpha[r0 + r] * acc + sum_t S[t*BQ + r0 + r] * vp[t][d0 .. d0 + 16)
// for ROWS (1..6) rows: a ROWS x 16 register tile, one pass over the chunk's value rows.
#define LOCORE_ROW(r)                                                                     \
  if constexpr (ROWS > r) {                                                               \
    const __m256 al = _mm256_set1_ps(alpha[r0 + r]);                                      \
    lo##r = _mm256_mul_ps(al, _mm256_loadu_ps(acc + (r0 + r) * D + d0));                  \
    hi##r = _mm256_mul_ps(al, _mm256_loadu_ps(acc + (r0 + r) * D + d0 + 8));              \
  }
#define LOCORE_ROW_FMA(r)                                                                 \
  if constexpr (ROWS > r) {                                                               \
    const __m256 pb = _mm256_broadcast_ss(sp + r);                                        \
    lo##r = _mm256_fmadd_ps(pb, v0, lo##r);                                               \
    hi##r = _mm256_fmadd_ps(pb, v1, hi##r);                                               \
  }
#define LOCORE_ROW_STORE(r)                                                               \
  if constexpr (ROWS > r) {                                                               \
    _mm256_storeu_ps(acc + (r0 + r) * D + d0, lo##r);                                     \
    _mm256_storeu_ps(acc + (r0 + r) * D + d0 + 8, hi##r);                                 \
  }

template <int ROWS>
static inline void pv_tile16(const float* __restrict S, int r0, const float* const* vp, int64_t nc,
                             int64_t d0, float* __restrict acc, int64_t D, const float* alpha) {
  static_assert(ROWS >= 1 && ROWS <= 6, "pv_tile16 holds at most 6 rows");
  __m256 lo0 = _mm256_setzero_ps(), hi0 = lo0, lo1 = lo0, hi1 = lo0, lo2 = lo0, hi2 = lo0;
  __m256 lo3 = lo0, hi3 = lo0, lo4 = lo0, hi4 = lo0, lo5 = lo0, hi5 = lo0;
  LOCORE_ROW(0) LOCORE_ROW(1) LOCORE_ROW(2) LOCORE_ROW(3) LOCORE_ROW(4) LOCORE_ROW(5)
  const float* sp = S + r0;
  for (int64_t t = 0; t < nc; ++t, sp += BQ) {
    const float* vr = vp[t] + d0;
    _mm_prefetch(reinterpret_cast<const char*>(vp[t + PF_AHEAD] + d0), _MM_HINT_T0);
    const __m256 v0 = _mm256_loadu_ps(vr), v1 = _mm256_loadu_ps(vr + 8);
    LOCORE_ROW_FMA(0) LOCORE_ROW_FMA(1) LOCORE_ROW_FMA(2) LOCORE_ROW_FMA(3) LOCORE_ROW_FMA(4) LOCORE_ROW_FMA(5)
  }
  LOCORE_ROW_STORE(0) LOCORE_ROW_STORE(1) LOCORE_ROW_STORE(2) LOCORE_ROW_STORE(3) LOCORE_ROW_STORE(4)
  LOCORE_ROW_STORE(5)
}
#undef LOCORE_ROW
#undef LOCORE_ROW_FMA
#undef LOCORE_ROW_STORE

// Same for an 8-column tile (D % 16 == 8 tail), up to 6 rows.
template <int ROWS>
static inline void pv_tile8(const float* __restrict S, int r0, const float* const* vp, int64_t nc,
                            int64_t d0, float* __restrict acc, int64_t D, const float* alpha) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0;
#define LOCORE_INIT8(r) \
  if constexpr (ROWS > r) a##r = _mm256_mul_ps(_mm256_set1_ps(alpha[r0 + r]), _mm256_loadu_ps(acc + (r0 + r) * D + d0));
#define LOCORE_FMA8(r) \
  if constexpr (ROWS > r) a##r = _mm256_fmadd_ps(_mm256_broadcast_ss(sp + r), v0, a##r);
#define LOCORE_STORE8(r) \
  if constexpr (ROWS > r) _mm256_storeu_ps(acc + (r0 + r) * D + d0, a##r);
  LOCORE_INIT8(0) LOCORE_INIT8(1) LOCORE_INIT8(2) LOCORE_INIT8(3) LOCORE_INIT8(4) LOCORE_INIT8(5)
  const float* sp = S + r0;
  for (int64_t t = 0; t < nc; ++t, sp += BQ) {
    const __m256 v0 = _mm256_loadu_ps(vp[t] + d0);
    LOCORE_FMA8(0) LOCORE_FMA8(1) LOCORE_FMA8(2) LOCORE_FMA8(3) LOCORE_FMA8(4) LOCORE_FMA8(5)
  }
  LOCORE_STORE8(0) LOCORE_STORE8(1) LOCORE_STORE8(2) LOCORE_STORE8(3) LOCORE_STORE8(4) LOCORE_STORE8(5)
#undef LOCORE_INIT8
#undef LOCORE_FMA8
#undef LOCORE_STORE8
}

template <bool WIDE>
static inline void pv_rows(int rows, const float* S, int r0, const float* const* vp, int64_t nc,
                           int64_t d0, float* acc, int64_t D, const float* alpha) {
#define LOCORE_CASE(n)                                                                    \
  case n:                                                                                 \
    if constexpr (WIDE) pv_tile16<n>(S, r0, vp, nc, d0, acc, D, alpha);                   \
    else pv_tile8<n>(S, r0, vp, nc, d0, acc, D, alpha);                                   \
    break;
  switch (rows) {
    LOCORE_CASE(6) LOCORE_CASE(5) LOCORE_CASE(4) LOCORE_CASE(3) LOCORE_CASE(2) LOCORE_CASE(1)
    default: break;
  }
#undef LOCORE_CASE
}

// Rows split into ceil(R / 6) tiles of near-equal size (e.g. 32 = 6+6+5+5+5+5); the column tile is
// the outer loop so that one column slice of the chunk's value rows stays in L1 across row tiles.
static void pv_chunk(const float* S, int R, const float* const* vp, int64_t nc, float* acc,
                     int64_t D, const float* alpha) {
  const int64_t d16 = (D / 16) * 16;
  const int64_t d8 = (D / 8) * 8;
  const int ntiles = (R + PV_ROWS - 1) / PV_ROWS;
  auto for_tiles = [&](auto&& fn) {
    int r0 = 0;
    for (int tile = 0; tile < ntiles; ++tile) {
      const int rows = (R - r0) / (ntiles - tile);
      fn(r0, rows);
      r0 += rows;
    }
  };
  for (int64_t d0 = 0; d0 < d16; d0 += 16)
    for_tiles([&](int r0, int rows) { pv_rows<true>(rows, S, r0, vp, nc, d0, acc, D, alpha); });
  if (d8 > d16) for_tiles([&](int r0, int rows) { pv_rows<false>(rows, S, r0, vp, nc, d16, acc, D, alpha); });
  if (d8 < D) {  // scalar tail columns
    for (int r = 0; r < R; ++r)
      for (int64_t d = d8; d < D; ++d) {
        float x = acc[r * D + d] * alpha[r];
        for (int64_t t = 0; t < nc; ++t) x += S[t * BQ + r] * vp[t][d];
        acc[r * D + d] = x;
      }
  }
}

#else  // portable scalar loops (same structure and arithmetic order per row)

static void qk_chunk(const float* QT, int64_t D, const float* const* kp, int64_t nc, float* S) {
  for (int64_t t = 0; t < nc; ++t) {
    float acc[BQ] = {};
    for (int64_t d = 0; d < D; ++d) {
      const float kd = kp[t][d];
      for (int i = 0; i < BQ; ++i) acc[i] += kd * QT[d * BQ + i];
    }
    for (int i = 0; i < BQ; ++i) S[t * BQ + i] = acc[i];
  }
}

static void softmax_chunk(float* S, int64_t nc, float* m, float* l, float* alpha) {
  for (int i = 0; i < BQ; ++i) {
    float mx = NEG_INF;
    for (int64_t t = 0; t < nc; ++t) mx = std::max(mx, S[t * BQ + i]);
    const float mnew = std::max(m[i], mx);
    const float msafe = (mnew == NEG_INF) ? 0.0f : mnew;
    const float a = std::exp2(m[i] - msafe);
    float sum = 0.0f;
    for (int64_t t = 0; t < nc; ++t) {
      const float e = std::exp2(S[t * BQ + i] - msafe);
      S[t * BQ + i] = e;
      sum += e;
    }
    l[i] = l[i] * a + sum;
    m[i] = mnew;
    alpha[i] = a;
  }
}

static void pv_chunk(const float* S, int R, const float* const* vp, int64_t nc, float* acc,
                     int64_t D, const float* alpha) {
  for (int r = 0; r < R; ++r) {
    float* ar = acc + r * D;
    for (int64_t d = 0; d < D; ++d) ar[d] *= alpha[r];
    for (int64_t t = 0; t < nc; ++t) {
      const float p = S[t * BQ + r];
      const float* vr = vp[t];
      for (int64_t d = 0; d < D; ++d) ar[d] += p * vr[d];
    }
  }
}

#endif  // LOCORE_AVX2

// ---------------------------------------------------------------------------------------------
// One block of R query rows (already packed, scaled and transposed into sc.qt) against a key list.
// keys[0 .. n_free) are attended by every row; keys[n_free .. nk) only by rows with
// |rowpos[r] - key| <= w. Leaves unnormalised acc and the softmax sums l in sc.
// ---------------------------------------------------------------------------------------------
static void attend_block(Scratch& sc, int R, const float* Kbh, const float* Vbh, int64_t rs, int64_t D,
                         const int32_t* keys, int64_t nk, int64_t n_free, const int32_t* rowpos,
                         int64_t w) {
  float* S = sc.s.data();
  float* acc = sc.acc.data();
  float* m = sc.m.data();
  float* l = sc.l.data();
  float* alpha = sc.alpha.data();
  const float** kp = sc.kp.data();
  const float** vp = sc.vp.data();
  std::fill(m, m + BQ, NEG_INF);
  std::fill(l, l + BQ, 0.0f);
  std::fill(acc, acc + BQ * D, 0.0f);

  // rows farther than w from a key: only possible for keys outside [last_row - w, first_row + w]
  const int64_t all_lo = (rowpos && R > 0) ? int64_t(rowpos[R - 1]) - w : 0;
  const int64_t all_hi = (rowpos && R > 0) ? int64_t(rowpos[0]) + w : 0;

  for (int64_t c0 = 0; c0 < nk; c0 += KC) {
    const int64_t nc = std::min<int64_t>(KC, nk - c0);
    for (int64_t t = 0; t < nc; ++t) {
      const int64_t j = keys[c0 + t];
      kp[t] = Kbh + j * rs;
      vp[t] = Vbh + j * rs;
    }
    for (int64_t t = nc; t < nc + PF_AHEAD; ++t) {  // prefetch targets past the chunk: harmless repeats
      kp[t] = kp[nc - 1];
      vp[t] = vp[nc - 1];
    }
    qk_chunk(sc.qt.data(), D, kp, nc, S);
    if (rowpos) {
      for (int64_t t = std::max<int64_t>(n_free - c0, 0); t < nc; ++t) {
        const int64_t j = keys[c0 + t];
        if (j >= all_lo && j <= all_hi) continue;
        float* st = S + t * BQ;
        for (int r = 0; r < R; ++r) {
          const int64_t dist = std::abs(int64_t(rowpos[r]) - j);
          if (dist > w) st[r] = NEG_INF;
        }
      }
    }
    softmax_chunk(S, nc, m, l, alpha);
    pv_chunk(S, R, vp, nc, acc, D, alpha);
  }
}

// Natural-log normaliser log(sum_j exp(s_ij / sqrt(D))) from the log2-domain running max m and sum l.
static inline float lse_of(float m, float l) {
  return float((double(m) + std::log2(double(l))) * 0.6931471805599453);
}

static void check(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument(msg);
}

// ---------------------------------------------------------------------------------------------
// The layout as the kernels read it (shared by the attention and the rows entry)
// ---------------------------------------------------------------------------------------------
struct LayoutView {
  const int32_t* global_idx;   // [B, G]
  const int32_t* num_global;   // [B]
  const uint8_t* band_key;     // [B, N]
  const uint8_t* key_padding;  // [B, N]
  const uint8_t* is_global;    // [B, N]
  int64_t B, N, G, window;
};

// Per item: the valid token positions, ascending (the keys of the global rows).
struct ValidKeys {
  std::vector<int64_t> count;      // [B]
  std::vector<int32_t> positions;  // [B * N], item b's first count[b] entries used
};

// ---- step 1: validate -----------------------------------------------------------------------
// Dimensions, window and layout consistency: indices in range, globals listed exactly once in
// ascending order, band_key == valid & !global. Throws std::invalid_argument; reads only.
static ValidKeys validate_layout(const LayoutView& L, int64_t H, int64_t D) {
  const int64_t B = L.B, N = L.N, G = L.G;
  check(B >= 0 && N >= 0 && H >= 0 && D >= 0 && G >= 0, "negative dimension");
  check(L.window >= 1, "one_sided_window must be >= 1, got " + std::to_string(L.window));
  check(G <= N, "more global slots (G=" + std::to_string(G) + ") than tokens (N=" + std::to_string(N) + ")");
  ValidKeys vk;
  if (B == 0 || N == 0 || H == 0 || D == 0) return vk;
  check(N < (int64_t(1) << 31), "sequence length must fit in int32");
  vk.count.assign(B, 0);
  vk.positions.resize(size_t(B * N));
  for (int64_t b = 0; b < B; ++b) {
    const int64_t ng = L.num_global[b];
    check(ng >= 0 && ng <= G, "num_global[" + std::to_string(b) + "]=" + std::to_string(ng) +
                                  " is outside [0, G=" + std::to_string(G) + "]");
    int64_t count_global = 0;
    for (int64_t i = 0; i < N; ++i) {
      const bool pad = L.key_padding[b * N + i] != 0, glob = L.is_global[b * N + i] != 0;
      check(!(pad && glob), "token " + std::to_string(i) + " of batch item " + std::to_string(b) +
                                " is both padded and global");
      check((L.band_key[b * N + i] != 0) == (!pad && !glob),
            "band_key must equal ~key_padding & ~is_global (batch item " + std::to_string(b) + ")");
      count_global += glob;
      if (!pad) vk.positions[b * N + vk.count[b]++] = int32_t(i);
    }
    check(count_global == ng, "num_global[" + std::to_string(b) + "] does not match is_global");
    for (int64_t g = 0; g < ng; ++g) {
      const int64_t j = L.global_idx[b * G + g];
      check(j >= 0 && j < N, "global_idx out of range [0, N)");
      check(L.is_global[b * N + j] != 0, "global_idx points at a non-global token");
      check(g == 0 || L.global_idx[b * G + g - 1] < j, "global_idx must be strictly ascending");
    }
  }
  return vk;
}

// ---- the local rule on one block of rows (used by local tasks of both entries) --------------
// Up to BQ valid rows of item b, head h, positions ascending; where each query is read and each
// output row written.
struct RowBlock {
  int R = 0;
  int32_t pos[BQ];
  const float* q[BQ];
  float* out[BQ];
  float* lse = nullptr;  // optional: row r's log-sum-exp goes to lse[pos[r]] (the training forward)
};

// Rows of `blk` attend to every global key of item b, then to the band keys within
// [first row - w, last row + w] (each row masked to its own |i - j| <= w), one online softmax.
static void attend_local_rows(const LayoutView& L, int64_t b, const float* Kbh, const float* Vbh, int64_t rs,
                              int64_t D, float qscale, int64_t w, const RowBlock& blk, Scratch& sc) {
  const int R = blk.R;
  float* QT = sc.qt.data();
  for (int r = 0; r < R; ++r)
    for (int64_t d = 0; d < D; ++d) QT[d * BQ + r] = blk.q[r][d] * qscale;
  int32_t* keys = sc.keys.data();
  const int64_t ng = L.num_global[b];
  std::memcpy(keys, L.global_idx + b * L.G, sizeof(int32_t) * ng);
  int64_t nk = ng;
  const uint8_t* band = L.band_key + b * L.N;
  const int64_t lo = std::max<int64_t>(0, int64_t(blk.pos[0]) - w);
  const int64_t hi = std::min<int64_t>(L.N - 1, int64_t(blk.pos[R - 1]) + w);
  for (int64_t j = lo; j <= hi; ++j)
    if (band[j]) keys[nk++] = int32_t(j);
  attend_block(sc, R, Kbh, Vbh, rs, D, keys, nk, ng, blk.pos, w);
  for (int r = 0; r < R; ++r) {
    float* dst = blk.out[r];
    const float inv = 1.0f / sc.l.data()[r];
    const float* ar = sc.acc.data() + r * D;
    for (int64_t d = 0; d < D; ++d) dst[d] = ar[d] * inv;
    if (blk.lse) blk.lse[blk.pos[r]] = lse_of(sc.m.data()[r], sc.l.data()[r]);
  }
}

// ---- step 2: plan ----------------------------------------------------------------------------
// Task list of the attention entry: global tasks (b, block of BQ global rows, head, key split)
// first, then local tasks (b, head, block of BQ positions). Depends on shapes and layout only.
struct Plan {
  int64_t rs = 0;        // row stride of [B, N, H, D]
  float qscale = 0.0f;   // log2(e) / sqrt(D)
  int64_t w = 1;         // window clamped to N
  std::vector<std::pair<int64_t, int64_t>> gpairs;  // (b, first global row g0)
  int64_t n_gt = 0;      // global tasks before splitting: gpairs x H
  int64_t splits = 1;    // key splits per global task
  int64_t part_stride = 0;
  int64_t nblk = 0;      // position blocks per (b, h)
  int64_t n_tasks = 0;
  int64_t max_keys = 1;  // longest key list of a local task
};

static Plan plan_attention(const AttentionArgs& a, const ValidKeys& vk) {
  Plan p;
  p.rs = a.H * a.D;
  p.qscale = float(1.4426950408889634 / std::sqrt(double(a.D)));
  p.w = std::min(a.window, a.N);  // distances never exceed N - 1: same result, no overflow
  int64_t max_valid = 0;
  for (int64_t b = 0; b < a.B; ++b) {
    for (int64_t g0 = 0; g0 < a.num_global[b]; g0 += BQ) p.gpairs.emplace_back(b, g0);
    max_valid = std::max(max_valid, vk.count[b]);
  }
  p.n_gt = int64_t(p.gpairs.size()) * a.H;
  if (p.n_gt > 0 && p.n_gt < 16) {  // few rows, many keys: split the keys (depends on shapes only)
    p.splits = std::min<int64_t>((16 + p.n_gt - 1) / p.n_gt, std::max<int64_t>(1, max_valid / 512));
  }
  p.part_stride = BQ * (a.D + 2);
  p.nblk = (a.N + BQ - 1) / BQ;
  p.n_tasks = p.n_gt * p.splits + a.B * a.H * p.nblk;
  p.max_keys = std::max<int64_t>(a.G + std::min<int64_t>(a.N, BQ + 2 * p.w + 1), 1);
  return p;
}

// ---- step 3: local task ----------------------------------------------------------------------
// Block `blk` of positions of (b, h): padded rows written as exact zeros, global rows skipped (the
// global tasks own them), the valid non-global rows through attend_local_rows.
static void local_task(const AttentionArgs& a, const LayoutView& L, const Plan& p, int64_t lt, Scratch& sc) {
  const int64_t N = a.N, H = a.H, D = a.D, rs = p.rs;
  const int64_t blk = lt % p.nblk, bh = lt / p.nblk;
  const int64_t h = bh % H, b = bh / H;
  const int64_t i0 = blk * BQ, i1 = std::min(N, i0 + BQ);
  const uint8_t* pad = a.key_padding + b * N;
  const uint8_t* glob = a.is_global + b * N;
  RowBlock rows;
  if (a.lse) rows.lse = a.lse + (b * H + h) * N;
  for (int64_t i = i0; i < i1; ++i) {
    float* dst = a.out + (b * N + i) * rs + h * D;
    if (pad[i]) {
      std::memset(dst, 0, sizeof(float) * D);
    } else if (!glob[i]) {
      rows.pos[rows.R] = int32_t(i);
      rows.q[rows.R] = a.q + (b * N + i) * rs + h * D;
      rows.out[rows.R++] = dst;
    }
  }
  if (rows.R == 0) return;
  attend_local_rows(L, b, a.k + b * N * rs + h * D, a.v + b * N * rs + h * D, rs, D, p.qscale, p.w, rows, sc);
}

// ---- step 4: global task ---------------------------------------------------------------------
// Up to BQ global rows of (b, h) against key split s of the item's valid keys (k_global, v_global):
// the normalised rows when unsplit, else the partial softmax state (m, l, acc) into `partial`.
static void global_task(const AttentionArgs& a, const ValidKeys& vk, const Plan& p, int64_t task,
                        float* partial, Scratch& sc) {
  const int64_t N = a.N, H = a.H, D = a.D, G = a.G, rs = p.rs, splits = p.splits;
  const int64_t gt = task / splits, s = task % splits;
  const int64_t pair = gt / H, h = gt % H;
  const int64_t b = p.gpairs[pair].first, g0 = p.gpairs[pair].second;
  const int R = int(std::min<int64_t>(BQ, a.num_global[b] - g0));
  float* QT = sc.qt.data();
  for (int r = 0; r < R; ++r) {
    const float* src = a.qg + ((b * G + g0 + r) * H + h) * D;
    for (int64_t d = 0; d < D; ++d) QT[d * BQ + r] = src[d] * p.qscale;
  }
  const int64_t nv = vk.count[b];
  const int64_t k0 = s * nv / splits, k1 = (s + 1) * nv / splits;
  const int32_t* keys = vk.positions.data() + b * N + k0;
  attend_block(sc, R, a.kg + b * N * rs + h * D, a.vg + b * N * rs + h * D, rs, D, keys, k1 - k0, k1 - k0,
               nullptr, p.w);
  if (splits == 1) {
    for (int r = 0; r < R; ++r) {
      const int64_t i = a.global_idx[b * G + g0 + r];
      float* dst = a.out + (b * N + i) * rs + h * D;
      const float inv = 1.0f / sc.l.data()[r];
      const float* ar = sc.acc.data() + r * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = ar[d] * inv;
      if (a.lse) a.lse[(b * H + h) * N + i] = lse_of(sc.m.data()[r], sc.l.data()[r]);
    }
  } else {
    float* part = partial + (gt * splits + s) * p.part_stride;
    std::memcpy(part, sc.m.data(), sizeof(float) * BQ);
    std::memcpy(part + BQ, sc.l.data(), sizeof(float) * BQ);
    std::memcpy(part + 2 * BQ, sc.acc.data(), sizeof(float) * BQ * D);
  }
}

// ---- step 5: combine -------------------------------------------------------------------------
// Global task gt's key splits merged in split order (deterministic) and scattered to its rows.
static void combine_global_splits(const AttentionArgs& a, const Plan& p, int64_t gt, const float* partial) {
  const int64_t N = a.N, H = a.H, D = a.D, G = a.G, rs = p.rs, splits = p.splits;
  const int64_t pair = gt / H, h = gt % H;
  const int64_t b = p.gpairs[pair].first, g0 = p.gpairs[pair].second;
  const int R = int(std::min<int64_t>(BQ, a.num_global[b] - g0));
  const float* base = partial + gt * splits * p.part_stride;
  for (int r = 0; r < R; ++r) {
    float M = NEG_INF;
    for (int64_t s = 0; s < splits; ++s) M = std::max(M, base[s * p.part_stride + r]);
    float L = 0.0f;
    float* dst = a.out + (b * N + a.global_idx[b * G + g0 + r]) * rs + h * D;
    std::fill(dst, dst + D, 0.0f);
    for (int64_t s = 0; s < splits; ++s) {
      const float* part = base + s * p.part_stride;
      const float ms = part[r];
      if (ms == NEG_INF) continue;  // empty split
      const float f = std::exp2(ms - M);
      L += part[BQ + r] * f;
      const float* ar = part + 2 * BQ + r * D;
      for (int64_t d = 0; d < D; ++d) dst[d] += ar[d] * f;
    }
    const float inv = 1.0f / L;
    for (int64_t d = 0; d < D; ++d) dst[d] *= inv;
    if (a.lse) a.lse[(b * H + h) * N + a.global_idx[b * G + g0 + r]] = lse_of(M, L);
  }
}

// ---- step 6: run -----------------------------------------------------------------------------
// One OpenMP region: tasks 0..n_tasks-1 (dynamic schedule), then combine steps 0..n_combine-1.
// Scratch is allocated before the region, so a failed allocation throws normally instead of
// terminating inside OpenMP; task(sc, t) and combine(c) must not throw.
template <typename TaskFn, typename CombineFn>
static void run_tasks(int requested_threads, int64_t D, int64_t max_keys, int64_t n_tasks, TaskFn&& task,
                      int64_t n_combine, CombineFn&& combine) {
  int nthreads = requested_threads;
#if LOCORE_OPENMP
  if (nthreads <= 0) nthreads = omp_get_max_threads();
#else
  nthreads = 1;
#endif
  nthreads = int(std::max<int64_t>(1, std::min<int64_t>(nthreads, n_tasks)));
  std::vector<std::unique_ptr<Scratch>> scratch;
  for (int t = 0; t < nthreads; ++t) scratch.emplace_back(new Scratch(D, max_keys));

#if LOCORE_OPENMP
#pragma omp parallel num_threads(nthreads)
#endif
  {
#if LOCORE_OPENMP
    Scratch& sc = *scratch[omp_get_thread_num()];
#else
    Scratch& sc = *scratch[0];
#endif
#if LOCORE_OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t t = 0; t < n_tasks; ++t) {
      std::fill(sc.qt.data(), sc.qt.data() + D * BQ, 0.0f);
      task(sc, t);
    }
    if (n_combine > 0) {
#if LOCORE_OPENMP
#pragma omp for schedule(static)
#endif
      for (int64_t c = 0; c < n_combine; ++c) combine(c);
    }
  }
}

static LayoutView layout_view(const int32_t* global_idx, const int32_t* num_global, const uint8_t* band_key,
                              const uint8_t* key_padding, const uint8_t* is_global, int64_t B, int64_t N,
                              int64_t G, int64_t window) {
  return LayoutView{global_idx, num_global, band_key, key_padding, is_global, B, N, G, window};
}

}  // namespace

std::string simd_level() { return LOCORE_AVX2 ? "avx2+fma" : "scalar"; }
int query_block_rows() { return BQ; }
int key_chunk() { return int(KC); }

void longformer_attention_fp32(const AttentionArgs& a) {
  const LayoutView L = layout_view(a.global_idx, a.num_global, a.band_key, a.key_padding, a.is_global, a.B, a.N,
                                   a.G, a.window);
  const ValidKeys vk = validate_layout(L, a.H, a.D);
  if (a.B == 0 || a.N == 0 || a.H == 0 || a.D == 0) return;
  const Plan p = plan_attention(a, vk);
  std::vector<float> partial(p.splits > 1 ? size_t(p.n_gt * p.splits * p.part_stride) : 0);
  const int64_t n_global_tasks = p.n_gt * p.splits;
  run_tasks(
      a.num_threads, a.D, p.max_keys, p.n_tasks,
      [&](Scratch& sc, int64_t t) {
        if (t < n_global_tasks) global_task(a, vk, p, t, partial.data(), sc);
        else local_task(a, L, p, t - n_global_tasks, sc);
      },
      p.splits > 1 ? p.n_gt : 0, [&](int64_t gt) { combine_global_splits(a, p, gt, partial.data()); });
}

void longformer_rows_fp32(const RowsArgs& a) {
  const LayoutView L = layout_view(a.global_idx, a.num_global, a.band_key, a.key_padding, a.is_global, a.B, a.N,
                                   a.G, a.window);
  validate_layout(L, a.H, a.D);
  check(a.R >= 0, "negative number of rows");
  for (int64_t r = 0; r < a.R; ++r)
    check(a.rows[r] >= 0 && a.rows[r] < a.N, "rows[" + std::to_string(r) + "]=" + std::to_string(a.rows[r]) +
                                                 " is outside [0, N=" + std::to_string(a.N) + ")");
  if (a.B == 0 || a.N == 0 || a.H == 0 || a.D == 0 || a.R == 0) return;
  const int64_t N = a.N, H = a.H, D = a.D, R = a.R, rs = H * D;
  const float qscale = float(1.4426950408889634 / std::sqrt(double(D)));
  const int64_t w = std::min(a.window, N);
  // Rows in ascending position (stable: repeats keep their order), blocks of BQ of them: each
  // block's band is then one interval, and attend_block's |i - j| <= w shortcut holds.
  std::vector<int64_t> order(R);
  for (int64_t r = 0; r < R; ++r) order[r] = r;
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return a.rows[x] < a.rows[y]; });
  const int64_t nblk = (R + BQ - 1) / BQ;
  int64_t max_span = 0;
  for (int64_t blk = 0; blk < nblk; ++blk) {
    const int64_t last = std::min(R, (blk + 1) * BQ) - 1;
    max_span = std::max<int64_t>(max_span, a.rows[order[last]] - a.rows[order[blk * BQ]]);
  }
  const int64_t max_keys = std::max<int64_t>(a.G + std::min<int64_t>(N, max_span + 2 * w + 1), 1);
  run_tasks(
      a.num_threads, D, max_keys, a.B * H * nblk,
      [&](Scratch& sc, int64_t t) {
        const int64_t blk = t % nblk, bh = t / nblk;
        const int64_t h = bh % H, b = bh / H;
        RowBlock rows;
        for (int64_t e = blk * BQ; e < std::min(R, (blk + 1) * BQ); ++e) {
          const int64_t r = order[e], i = a.rows[r];
          float* dst = a.out + (b * R + r) * rs + h * D;
          if (a.key_padding[b * N + i]) {
            std::memset(dst, 0, sizeof(float) * D);
          } else {  // global or not, a listed row follows the non-global rule
            rows.pos[rows.R] = int32_t(i);
            rows.q[rows.R] = a.q_rows + (b * R + r) * rs + h * D;
            rows.out[rows.R++] = dst;
          }
        }
        if (rows.R > 0)
          attend_local_rows(L, b, a.k + b * N * rs + h * D, a.v + b * N * rs + h * D, rs, D, qscale, w, rows, sc);
      },
      0, [](int64_t) {});
}

}  // namespace locore
