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
  x = _mm256_max_ps(x, lo);
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

static void check(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument(msg);
}

}  // namespace

std::string simd_level() { return LOCORE_AVX2 ? "avx2+fma" : "scalar"; }
int query_block_rows() { return BQ; }
int key_chunk() { return int(KC); }

void longformer_attention_fp32(const AttentionArgs& a) {
  const int64_t B = a.B, N = a.N, H = a.H, D = a.D, G = a.G;
  check(B >= 0 && N >= 0 && H >= 0 && D >= 0 && G >= 0, "negative dimension");
  check(a.window >= 1, "one_sided_window must be >= 1, got " + std::to_string(a.window));
  const int64_t w = std::min(a.window, N);  // distances never exceed N - 1: same result, no overflow
  check(G <= N, "more global slots (G=" + std::to_string(G) + ") than tokens (N=" + std::to_string(N) + ")");
  if (B == 0 || N == 0 || H == 0 || D == 0) return;
  check(N < (int64_t(1) << 31), "sequence length must fit in int32");

  // Layout consistency: indices in range, globals listed exactly once, band_key == valid & !global.
  std::vector<int64_t> nvalid(B, 0);
  std::vector<int32_t> valid_keys(size_t(B * N));  // per b: positions of the valid tokens, ascending
  for (int64_t b = 0; b < B; ++b) {
    const int64_t ng = a.num_global[b];
    check(ng >= 0 && ng <= G, "num_global[" + std::to_string(b) + "]=" + std::to_string(ng) +
                                  " is outside [0, G=" + std::to_string(G) + "]");
    int64_t count_global = 0;
    for (int64_t i = 0; i < N; ++i) {
      const bool pad = a.key_padding[b * N + i] != 0, glob = a.is_global[b * N + i] != 0;
      check(!(pad && glob), "token " + std::to_string(i) + " of batch item " + std::to_string(b) +
                                " is both padded and global");
      check((a.band_key[b * N + i] != 0) == (!pad && !glob),
            "band_key must equal ~key_padding & ~is_global (batch item " + std::to_string(b) + ")");
      count_global += glob;
      if (!pad) valid_keys[b * N + nvalid[b]++] = int32_t(i);
    }
    check(count_global == ng, "num_global[" + std::to_string(b) + "] does not match is_global");
    for (int64_t g = 0; g < ng; ++g) {
      const int64_t j = a.global_idx[b * G + g];
      check(j >= 0 && j < N, "global_idx out of range [0, N)");
      check(a.is_global[b * N + j] != 0, "global_idx points at a non-global token");
      check(g == 0 || a.global_idx[b * G + g - 1] < j, "global_idx must be strictly ascending");
    }
  }

  const int64_t rs = H * D;  // row stride of [B, N, H, D]
  const float qscale = float(1.4426950408889634 / std::sqrt(double(D)));  // log2(e) / sqrt(D)

  // Global tasks: (b, block of BQ global rows) pairs x heads x key splits.
  std::vector<std::pair<int64_t, int64_t>> gpairs;
  int64_t max_valid = 0;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t g0 = 0; g0 < a.num_global[b]; g0 += BQ) gpairs.emplace_back(b, g0);
    max_valid = std::max(max_valid, nvalid[b]);
  }
  const int64_t n_gt = int64_t(gpairs.size()) * H;
  int64_t splits = 1;
  if (n_gt > 0 && n_gt < 16) {  // few rows, many keys: split the keys (depends on shapes only)
    splits = std::min<int64_t>((16 + n_gt - 1) / n_gt, std::max<int64_t>(1, max_valid / 512));
  }
  const int64_t part_stride = BQ * (D + 2);
  std::vector<float> partial(splits > 1 ? size_t(n_gt * splits * part_stride) : 0);

  const int64_t nblk = (N + BQ - 1) / BQ;
  const int64_t n_lt = B * H * nblk;
  const int64_t n_tasks = n_gt * splits + n_lt;
  const int64_t max_keys = std::max<int64_t>(G + std::min<int64_t>(N, BQ + 2 * w + 1), 1);

  int nthreads = a.num_threads;
#if LOCORE_OPENMP
  if (nthreads <= 0) nthreads = omp_get_max_threads();
#else
  nthreads = 1;
#endif
  nthreads = int(std::max<int64_t>(1, std::min<int64_t>(nthreads, n_tasks)));
  // Scratch is allocated here, outside the parallel region, so that a failed allocation throws
  // normally instead of terminating inside OpenMP.
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
    float* QT = sc.qt.data();
#if LOCORE_OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t task = 0; task < n_tasks; ++task) {
      std::fill(QT, QT + D * BQ, 0.0f);
      if (task < n_gt * splits) {
        // ---------------- global rows ----------------
        const int64_t gt = task / splits, s = task % splits;
        const int64_t pair = gt / H, h = gt % H;
        const int64_t b = gpairs[pair].first, g0 = gpairs[pair].second;
        const int R = int(std::min<int64_t>(BQ, a.num_global[b] - g0));
        for (int r = 0; r < R; ++r) {
          const float* src = a.qg + ((b * G + g0 + r) * H + h) * D;
          for (int64_t d = 0; d < D; ++d) QT[d * BQ + r] = src[d] * qscale;
        }
        const int64_t nv = nvalid[b];
        const int64_t k0 = s * nv / splits, k1 = (s + 1) * nv / splits;
        const int32_t* keys = valid_keys.data() + b * N + k0;
        attend_block(sc, R, a.kg + b * N * rs + h * D, a.vg + b * N * rs + h * D, rs, D, keys, k1 - k0,
                        k1 - k0, nullptr, w);
        if (splits == 1) {
          for (int r = 0; r < R; ++r) {
            const int64_t i = a.global_idx[b * G + g0 + r];
            float* dst = a.out + (b * N + i) * rs + h * D;
            const float inv = 1.0f / sc.l.data()[r];
            const float* ar = sc.acc.data() + r * D;
            for (int64_t d = 0; d < D; ++d) dst[d] = ar[d] * inv;
          }
        } else {
          float* part = partial.data() + (gt * splits + s) * part_stride;
          std::memcpy(part, sc.m.data(), sizeof(float) * BQ);
          std::memcpy(part + BQ, sc.l.data(), sizeof(float) * BQ);
          std::memcpy(part + 2 * BQ, sc.acc.data(), sizeof(float) * BQ * D);
        }
      } else {
        // ---------------- local (non-global) rows ----------------
        const int64_t lt = task - n_gt * splits;
        const int64_t blk = lt % nblk, bh = lt / nblk;
        const int64_t h = bh % H, b = bh / H;
        const int64_t i0 = blk * BQ, i1 = std::min(N, i0 + BQ);
        const uint8_t* pad = a.key_padding + b * N;
        const uint8_t* glob = a.is_global + b * N;
        const uint8_t* band = a.band_key + b * N;
        int32_t* rowpos = sc.rowpos.data();
        int R = 0;
        for (int64_t i = i0; i < i1; ++i) {
          if (pad[i]) {
            std::memset(a.out + (b * N + i) * rs + h * D, 0, sizeof(float) * D);
          } else if (!glob[i]) {
            rowpos[R++] = int32_t(i);
          }
        }
        if (R == 0) continue;
        for (int r = 0; r < R; ++r) {
          const float* src = a.q + (b * N + rowpos[r]) * rs + h * D;
          for (int64_t d = 0; d < D; ++d) QT[d * BQ + r] = src[d] * qscale;
        }
        int32_t* keys = sc.keys.data();
        const int64_t ng = a.num_global[b];
        std::memcpy(keys, a.global_idx + b * G, sizeof(int32_t) * ng);
        int64_t nk = ng;
        const int64_t lo = std::max<int64_t>(0, int64_t(rowpos[0]) - w);
        const int64_t hi = std::min<int64_t>(N - 1, int64_t(rowpos[R - 1]) + w);
        for (int64_t j = lo; j <= hi; ++j)
          if (band[j]) keys[nk++] = int32_t(j);
        attend_block(sc, R, a.k + b * N * rs + h * D, a.v + b * N * rs + h * D, rs, D, keys, nk, ng,
                        rowpos, w);
        for (int r = 0; r < R; ++r) {
          float* dst = a.out + (b * N + rowpos[r]) * rs + h * D;
          const float inv = 1.0f / sc.l.data()[r];
          const float* ar = sc.acc.data() + r * D;
          for (int64_t d = 0; d < D; ++d) dst[d] = ar[d] * inv;
        }
      }
    }

    if (splits > 1) {
      // deterministic combine of the key splits, in split order
#if LOCORE_OPENMP
#pragma omp for schedule(static)
#endif
      for (int64_t gt = 0; gt < n_gt; ++gt) {
        const int64_t pair = gt / H, h = gt % H;
        const int64_t b = gpairs[pair].first, g0 = gpairs[pair].second;
        const int R = int(std::min<int64_t>(BQ, a.num_global[b] - g0));
        const float* base = partial.data() + gt * splits * part_stride;
        for (int r = 0; r < R; ++r) {
          float M = NEG_INF;
          for (int64_t s = 0; s < splits; ++s) M = std::max(M, base[s * part_stride + r]);
          float L = 0.0f;
          float* dst = a.out + (b * N + a.global_idx[b * G + g0 + r]) * rs + h * D;
          std::fill(dst, dst + D, 0.0f);
          for (int64_t s = 0; s < splits; ++s) {
            const float* part = base + s * part_stride;
            const float ms = part[r];
            if (ms == NEG_INF) continue;  // empty split
            const float f = std::exp2(ms - M);
            L += part[BQ + r] * f;
            const float* ar = part + 2 * BQ + r * D;
            for (int64_t d = 0; d < D; ++d) dst[d] += ar[d] * f;
          }
          const float inv = 1.0f / L;
          for (int64_t d = 0; d < D; ++d) dst[d] *= inv;
        }
      }
    }
  }
}

}  // namespace locore
