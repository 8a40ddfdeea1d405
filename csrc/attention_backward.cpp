// Backward of Longformer sliding-window + global-token attention, flash style, C++17 + OpenMP.
//
// Math, per (b, h), scale c = 1/sqrt(D). Forward: a row i with key set K(i) (SPEC section 3: a
// non-global row sees every global key and the valid non-global keys with |i - j| <= w, with q, k, v;
// a global row sees every valid key with qg, kg, vg) has
//     P_ij = exp(c q_i.k_j - lse_i),   out_i = sum_j P_ij v_j,   lse_i = log sum_{j in K(i)} exp(c q_i.k_j).
// Backward, with Delta_i = dout_i . out_i:
//     dP_ij = dout_i . v_j,   dS_ij = P_ij (dP_ij - Delta_i),
//     dq_i = c sum_j dS_ij k_j,   dk_j = c sum_i dS_ij q_i,   dv_j = sum_i P_ij dout_i.
// Only q, k, v, the gathered global queries, kg, vg, out and lse [B, H, N] are read: P is recomputed
// tile by tile (BR rows x BK keys), never stored; scratch is O(BR * (D + BK) + G + w) per thread.
//
// Work decomposition (every gradient row is owned by exactly one task, so there are no atomics and
// each sum runs in an order fixed by the shapes: results are bit-identical run to run and for any
// thread count):
//   A. local row block  (BR consecutive positions, their non-global valid rows): dq, over the
//      global keys then the band keys of the block (the forward's key list);
//   B. global row block (BR gathered global rows): dqg, over every valid key;
//   C. band key block   (BK consecutive positions, their band keys): dk, dv, over the non-global
//      valid rows in [j0 - w, j1 + w], in blocks of BR;
//   D. global key block (BK gathered global keys): dk, dv at the global tokens, over every
//      non-global valid row, in blocks of BR;
//   E. valid key block  (BK valid keys): dkg, dvg, over every global row, in blocks of BR.
// A and C (and B and E) recompute the same probabilities; that doubles the exp / QK work but keeps
// the reduction order fixed without atomics.
#include "attention_backward.h"

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#if LOCORE_OPENMP
#include <omp.h>
#endif

#include "attention.h"
#include "pyarray.h"

namespace locore {
namespace {

constexpr int BR = 32;  // query rows per tile
constexpr int BK = 64;  // keys per tile

template <typename T>
struct GradScratch {
  std::vector<T> qt, dot;          // [D][BR] rows' queries (scaled by c) and output gradients, transposed
  std::vector<T> p, ds;            // [BK][BR] probabilities and score gradients, key-major
  std::vector<T> lse, delta;       // [BR]
  std::vector<int32_t> rowpos;     // [BR] positions of the rows (band distance test)
  std::vector<const T*> qrow, dorow;  // [BR] row pointers (key-side accumulation)
  std::vector<T> acc, acc2;        // [max(BR, BK)][D] gradient accumulators of the task's rows / keys
  std::vector<T> m, l;             // [BR] online max / sum (forward LSE pass)
  std::vector<int32_t> keys, keypos;  // key list of a task and the positions of one tile's keys
  std::vector<const T*> kp, vp;    // [BK] key / value row pointers of one tile
  GradScratch(int64_t D, int64_t max_keys)
      : qt(D * BR), dot(D * BR), p(BK * BR), ds(BK * BR), lse(BR), delta(BR), rowpos(BR), qrow(BR),
        dorow(BR), acc(std::max(BR, BK) * D), acc2(std::max(BR, BK) * D), m(BR), l(BR),
        keys(std::max<int64_t>(max_keys, 1)), keypos(BK), kp(BK), vp(BK) {}
};

// Rows of one tile: R query rows, packed transposed (and q scaled by c) into sc.qt / sc.dot.
template <typename T>
void pack_rows(GradScratch<T>& sc, int R, int64_t D, T c) {
  std::fill(sc.qt.begin(), sc.qt.end(), T(0));
  std::fill(sc.dot.begin(), sc.dot.end(), T(0));
  for (int r = 0; r < R; ++r) {
    const T* q = sc.qrow[r];
    const T* g = sc.dorow[r];
    for (int64_t d = 0; d < D; ++d) {
      sc.qt[d * BR + r] = q[d] * c;
      if (g) sc.dot[d * BR + r] = g[d];
    }
  }
}

// Scores of the packed rows against the tile's nc keys: sc.p[t * BR + r] = c q_r . k_t, and with
// WITH_DP also sc.ds[t * BR + r] = dout_r . v_t. Vectorised across the BR rows.
template <typename T, bool WITH_DP>
void tile_scores(GradScratch<T>& sc, int nc, int64_t D) {
  const T* QT = sc.qt.data();
  const T* GT = sc.dot.data();
  for (int t = 0; t < nc; ++t) {
    T s[BR] = {}, dp[BR] = {};
    const T* k = sc.kp[t];
    const T* v = sc.vp[t];
    for (int64_t d = 0; d < D; ++d) {
      const T kd = k[d];
      const T* qd = QT + d * BR;
      for (int r = 0; r < BR; ++r) s[r] += kd * qd[r];
      if constexpr (WITH_DP) {
        const T vd = v[d];
        const T* gd = GT + d * BR;
        for (int r = 0; r < BR; ++r) dp[r] += vd * gd[r];
      }
    }
    std::memcpy(sc.p.data() + t * BR, s, sizeof(s));
    if constexpr (WITH_DP) std::memcpy(sc.ds.data() + t * BR, dp, sizeof(dp));
  }
}

// Whether row r may attend key t: keys [0, n_free) are seen by every row, the others (band keys)
// only within the window.
inline bool allowed(int t, int n_free, int64_t rowpos, int64_t keypos, int64_t w) {
  return t < n_free || std::abs(rowpos - keypos) <= w;
}

// P and dS of the tile from the scores (tile_scores<T, true>), masked entries exactly 0.
template <typename T>
void tile_probs(GradScratch<T>& sc, int R, int nc, int n_free, int64_t w) {
  for (int t = 0; t < nc; ++t) {
    T* p = sc.p.data() + t * BR;
    T* ds = sc.ds.data() + t * BR;
    const int64_t kpos = sc.keypos[t];
    for (int r = 0; r < R; ++r) {
      if (allowed(t, n_free, sc.rowpos[r], kpos, w)) {
        const T pr = std::exp(p[r] - sc.lse[r]);
        p[r] = pr;
        ds[r] = pr * (ds[r] - sc.delta[r]);
      } else {
        p[r] = T(0);
        ds[r] = T(0);
      }
    }
    for (int r = R; r < BR; ++r) p[r] = ds[r] = T(0);
  }
}

// Fill sc.kp / vp / keypos for keys list[0 .. nc) of a (b, h) slice.
template <typename T>
void set_keys(GradScratch<T>& sc, const int32_t* list, int nc, const T* Kbh, const T* Vbh, int64_t rs) {
  for (int t = 0; t < nc; ++t) {
    sc.keypos[t] = list[t];
    sc.kp[t] = Kbh + int64_t(list[t]) * rs;
    sc.vp[t] = Vbh + int64_t(list[t]) * rs;
  }
}

enum class RowPass { kLse, kOut, kGrad };

// Row-side task: the packed rows against the key list keys[0 .. nk) (keys[0 .. n_free) unmasked).
//   kLse : online max / sum of the scores -> sc.lse
//   kOut : acc[r] = sum_t P_rt v_t (needs sc.lse)
//   kGrad: acc[r] = sum_t dS_rt k_t (needs sc.lse, sc.delta; multiply by c afterwards)
template <typename T, RowPass PASS>
void row_task(GradScratch<T>& sc, int R, int64_t D, const int32_t* keys, int64_t nk, int64_t n_free,
              const T* Kbh, const T* Vbh, int64_t rs, int64_t w) {
  constexpr T NEG_INF = -std::numeric_limits<T>::infinity();
  std::fill(sc.acc.begin(), sc.acc.begin() + BR * D, T(0));
  if (PASS == RowPass::kLse) {
    std::fill(sc.m.begin(), sc.m.end(), NEG_INF);
    std::fill(sc.l.begin(), sc.l.end(), T(0));
  }
  for (int64_t c0 = 0; c0 < nk; c0 += BK) {
    const int nc = int(std::min<int64_t>(BK, nk - c0));
    const int free_here = int(std::clamp<int64_t>(n_free - c0, 0, nc));
    set_keys(sc, keys + c0, nc, Kbh, Vbh, rs);
    tile_scores<T, PASS == RowPass::kGrad>(sc, nc, D);
    if constexpr (PASS == RowPass::kLse) {
      for (int r = 0; r < R; ++r) {
        T mx = NEG_INF;
        for (int t = 0; t < nc; ++t)
          if (allowed(t, free_here, sc.rowpos[r], sc.keypos[t], w)) mx = std::max(mx, sc.p[t * BR + r]);
        if (mx == NEG_INF) continue;
        const T mnew = std::max(sc.m[r], mx);
        T sum = 0;
        for (int t = 0; t < nc; ++t)
          if (allowed(t, free_here, sc.rowpos[r], sc.keypos[t], w)) sum += std::exp(sc.p[t * BR + r] - mnew);
        sc.l[r] = sc.l[r] * std::exp(sc.m[r] - mnew) + sum;
        sc.m[r] = mnew;
      }
    } else {
      tile_probs(sc, R, nc, free_here, w);
      const T* coef = PASS == RowPass::kOut ? sc.p.data() : sc.ds.data();
      const auto& rows_of = PASS == RowPass::kOut ? sc.vp : sc.kp;
      for (int r = 0; r < R; ++r) {
        T* ar = sc.acc.data() + r * D;
        for (int t = 0; t < nc; ++t) {
          const T x = coef[t * BR + r];
          if (x == T(0)) continue;  // masked (or underflowed) entry: adds exactly nothing
          const T* kr = rows_of[t];
          for (int64_t d = 0; d < D; ++d) ar[d] += x * kr[d];
        }
      }
    }
  }
  if constexpr (PASS == RowPass::kLse)
    for (int r = 0; r < R; ++r) sc.lse[r] = sc.m[r] + std::log(sc.l[r]);
}

// Key-side step: the packed rows (R) against the tile's nc keys; acc[t] += dS_tr q_r (times c later),
// acc2[t] += P_tr dout_r.
template <typename T>
void key_step(GradScratch<T>& sc, int R, int nc, int n_free, int64_t D, int64_t w) {
  tile_scores<T, true>(sc, nc, D);
  tile_probs(sc, R, nc, n_free, w);
  for (int t = 0; t < nc; ++t) {
    T* dk = sc.acc.data() + t * D;
    T* dv = sc.acc2.data() + t * D;
    for (int r = 0; r < R; ++r) {
      const T ds = sc.ds[t * BR + r], p = sc.p[t * BR + r];
      if (p == T(0)) continue;  // masked: contributes nothing to either gradient
      const T* q = sc.qrow[r];
      const T* g = sc.dorow[r];
      for (int64_t d = 0; d < D; ++d) dk[d] += ds * q[d];
      for (int64_t d = 0; d < D; ++d) dv[d] += p * g[d];
    }
  }
}

void check(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument(msg);
}

// Per batch item: the positions of its valid tokens and of its non-global valid tokens, ascending.
struct Lists {
  std::vector<int32_t> valid, local;
  std::vector<int64_t> n_valid, n_local;
};

template <typename T>
Lists validate_and_list(const AttentionGradArgs<T>& a) {
  const int64_t B = a.B, N = a.N, G = a.G;
  check(a.window >= 1, "one_sided_window must be >= 1, got " + std::to_string(a.window));
  check(G <= N, "more global slots (G=" + std::to_string(G) + ") than tokens (N=" + std::to_string(N) + ")");
  check(N < (int64_t(1) << 31), "sequence length must fit in int32");
  Lists L;
  L.valid.resize(size_t(B * N));
  L.local.resize(size_t(B * N));
  L.n_valid.assign(B, 0);
  L.n_local.assign(B, 0);
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
      if (!pad) L.valid[b * N + L.n_valid[b]++] = int32_t(i);
      if (!pad && !glob) L.local[b * N + L.n_local[b]++] = int32_t(i);
    }
    check(count_global == ng, "num_global[" + std::to_string(b) + "] does not match is_global");
    for (int64_t g = 0; g < ng; ++g) {
      const int64_t j = a.global_idx[b * G + g];
      check(j >= 0 && j < N, "global_idx out of range [0, N)");
      check(a.is_global[b * N + j] != 0, "global_idx points at a non-global token");
      check(g == 0 || a.global_idx[b * G + g - 1] < j, "global_idx must be strictly ascending");
    }
  }
  return L;
}

int thread_count(int requested, int64_t n_tasks) {
  int n = requested;
#if LOCORE_OPENMP
  if (n <= 0) n = omp_get_max_threads();
#else
  n = 1;
#endif
  return int(std::max<int64_t>(1, std::min<int64_t>(n, n_tasks)));
}

int thread_id() {
#if LOCORE_OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

enum class Task : int { kLocalRows, kGlobalRows, kBandKeys, kGlobalKeys, kValidKeys };
struct TaskDesc {
  Task type;
  int64_t b, h, start;
};

// Row-side task lists shared by the forward and the backward (A and B).
void add_row_tasks(std::vector<TaskDesc>& tasks, int64_t B, int64_t H, int64_t N, const int32_t* num_global) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t g0 = 0; g0 < num_global[b]; g0 += BR) tasks.push_back({Task::kGlobalRows, b, h, g0});
      for (int64_t i0 = 0; i0 < N; i0 += BR) tasks.push_back({Task::kLocalRows, b, h, i0});
    }
}

// Rows of a row-side task packed into sc (q, dout pointers, positions, lse, delta). Returns R.
template <typename T>
int gather_task_rows(const AttentionGradArgs<T>& a, GradScratch<T>& sc, const TaskDesc& task,
                     const T* dout, const T* lse, const T* delta) {
  const int64_t N = a.N, H = a.H, D = a.D, G = a.G, rs = H * D, b = task.b, h = task.h;
  int R = 0;
  if (task.type == Task::kGlobalRows) {
    R = int(std::min<int64_t>(BR, a.num_global[b] - task.start));
    for (int r = 0; r < R; ++r) {
      const int64_t g = task.start + r, i = a.global_idx[b * G + g];
      sc.rowpos[r] = int32_t(i);
      sc.qrow[r] = a.qg + (b * G + g) * rs + h * D;
    }
  } else {
    for (int64_t i = task.start; i < std::min(N, task.start + BR); ++i)
      if (a.band_key[b * N + i]) {
        sc.rowpos[R] = int32_t(i);
        sc.qrow[R++] = a.q + (b * N + i) * rs + h * D;
      }
  }
  for (int r = 0; r < R; ++r) {
    const int64_t i = sc.rowpos[r];
    sc.dorow[r] = dout ? dout + (b * N + i) * rs + h * D : nullptr;
    if (lse) sc.lse[r] = lse[(b * H + h) * N + i];
    if (delta) sc.delta[r] = delta[(b * H + h) * N + i];
  }
  return R;
}

// Key list of a row-side task (globals first, then the band keys of the block) into sc.keys.
template <typename T>
int64_t task_keys(const AttentionGradArgs<T>& a, GradScratch<T>& sc, const TaskDesc& task, int R,
                  const Lists& L, int64_t w, int64_t* n_free, const int32_t** keys) {
  const int64_t b = task.b, N = a.N;
  if (task.type == Task::kGlobalRows) {
    *keys = L.valid.data() + b * N;
    *n_free = L.n_valid[b];
    return L.n_valid[b];
  }
  const int64_t ng = a.num_global[b];
  int32_t* list = sc.keys.data();
  std::memcpy(list, a.global_idx + b * a.G, sizeof(int32_t) * ng);
  int64_t nk = ng;
  const int64_t lo = std::max<int64_t>(0, int64_t(sc.rowpos[0]) - w);
  const int64_t hi = std::min<int64_t>(N - 1, int64_t(sc.rowpos[R - 1]) + w);
  for (int64_t j = lo; j <= hi; ++j)
    if (a.band_key[b * N + j]) list[nk++] = int32_t(j);
  *keys = list;
  *n_free = ng;
  return nk;
}

}  // namespace

template <typename T>
void longformer_attention_forward_lse(const AttentionGradArgs<T>& a, T* out, T* lse) {
  const int64_t B = a.B, N = a.N, H = a.H, D = a.D, G = a.G, rs = H * D;
  if (B == 0 || N == 0 || H == 0 || D == 0) return;
  const Lists L = validate_and_list(a);
  const int64_t w = std::min(a.window, N);
  const T c = T(1) / std::sqrt(T(D));
  std::fill(out, out + B * N * rs, T(0));
  std::fill(lse, lse + B * H * N, T(0));
  std::vector<TaskDesc> tasks;
  add_row_tasks(tasks, B, H, N, a.num_global);
  const int nthreads = thread_count(a.num_threads, int64_t(tasks.size()));
  const int64_t max_keys = G + std::min<int64_t>(N, BR + 2 * w + 1);
  std::vector<std::unique_ptr<GradScratch<T>>> scratch;
  for (int t = 0; t < nthreads; ++t) scratch.emplace_back(new GradScratch<T>(D, max_keys));
#if LOCORE_OPENMP
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
#endif
  for (int64_t ti = 0; ti < int64_t(tasks.size()); ++ti) {
    GradScratch<T>& sc = *scratch[thread_id()];
    const TaskDesc& task = tasks[ti];
    const int R = gather_task_rows<T>(a, sc, task, nullptr, nullptr, nullptr);
    if (R == 0) continue;
    pack_rows(sc, R, D, c);
    const bool glob = task.type == Task::kGlobalRows;
    const T* Kbh = (glob ? a.kg : a.k) + task.b * N * rs + task.h * D;
    const T* Vbh = (glob ? a.vg : a.v) + task.b * N * rs + task.h * D;
    int64_t n_free = 0;
    const int32_t* keys = nullptr;
    const int64_t nk = task_keys(a, sc, task, R, L, w, &n_free, &keys);
    row_task<T, RowPass::kLse>(sc, R, D, keys, nk, n_free, Kbh, Vbh, rs, w);
    row_task<T, RowPass::kOut>(sc, R, D, keys, nk, n_free, Kbh, Vbh, rs, w);
    for (int r = 0; r < R; ++r) {
      const int64_t i = sc.rowpos[r];
      std::memcpy(out + (task.b * N + i) * rs + task.h * D, sc.acc.data() + r * D, sizeof(T) * D);
      lse[(task.b * H + task.h) * N + i] = sc.lse[r];
    }
  }
}

template <typename T>
void longformer_attention_backward(const AttentionGradArgs<T>& a) {
  const int64_t B = a.B, N = a.N, H = a.H, D = a.D, G = a.G, rs = H * D;
  if (B * N * H * D > 0) {
    for (T* g : {a.dq, a.dk, a.dv, a.dkg, a.dvg}) std::fill(g, g + B * N * rs, T(0));
  }
  if (B * G * H * D > 0) std::fill(a.dqg, a.dqg + B * G * rs, T(0));
  if (B == 0 || N == 0 || H == 0 || D == 0) return;
  const Lists L = validate_and_list(a);
  const int64_t w = std::min(a.window, N);
  const T c = T(1) / std::sqrt(T(D));

  // Delta_i = dout_i . out_i per (b, h, i), valid rows (padded rows: out = 0 and nothing reads them).
  std::vector<T> delta(size_t(B * H * N), T(0));
  std::vector<TaskDesc> tasks;
  add_row_tasks(tasks, B, H, N, a.num_global);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t j0 = 0; j0 < N; j0 += BK) tasks.push_back({Task::kBandKeys, b, h, j0});
      for (int64_t g0 = 0; g0 < a.num_global[b]; g0 += BK) tasks.push_back({Task::kGlobalKeys, b, h, g0});
      if (a.num_global[b] > 0)
        for (int64_t k0 = 0; k0 < L.n_valid[b]; k0 += BK) tasks.push_back({Task::kValidKeys, b, h, k0});
    }
  const int nthreads = thread_count(a.num_threads, int64_t(tasks.size()));
  const int64_t max_keys = G + std::min<int64_t>(N, BR + 2 * w + 1);
  std::vector<std::unique_ptr<GradScratch<T>>> scratch;
  for (int t = 0; t < nthreads; ++t) scratch.emplace_back(new GradScratch<T>(D, max_keys));

#if LOCORE_OPENMP
#pragma omp parallel num_threads(nthreads)
#endif
  {
#if LOCORE_OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t bn = 0; bn < B * N; ++bn) {
      if (a.key_padding[bn]) continue;
      const int64_t b = bn / N, i = bn % N;
      for (int64_t h = 0; h < H; ++h) {
        const T* o = a.out + bn * rs + h * D;
        const T* g = a.dout + bn * rs + h * D;
        T s = 0;
        for (int64_t d = 0; d < D; ++d) s += o[d] * g[d];
        delta[(b * H + h) * N + i] = s;
      }
    }
#if LOCORE_OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t ti = 0; ti < int64_t(tasks.size()); ++ti) {
      GradScratch<T>& sc = *scratch[thread_id()];
      const TaskDesc& task = tasks[ti];
      const int64_t b = task.b, h = task.h;
      const int64_t bh_lse = (b * H + h) * N;
      if (task.type == Task::kLocalRows || task.type == Task::kGlobalRows) {
        const int R = gather_task_rows<T>(a, sc, task, a.dout, a.lse, delta.data());
        if (R == 0) continue;
        pack_rows(sc, R, D, c);
        const bool glob = task.type == Task::kGlobalRows;
        const T* Kbh = (glob ? a.kg : a.k) + b * N * rs + h * D;
        const T* Vbh = (glob ? a.vg : a.v) + b * N * rs + h * D;
        int64_t n_free = 0;
        const int32_t* keys = nullptr;
        const int64_t nk = task_keys(a, sc, task, R, L, w, &n_free, &keys);
        row_task<T, RowPass::kGrad>(sc, R, D, keys, nk, n_free, Kbh, Vbh, rs, w);
        for (int r = 0; r < R; ++r) {
          T* dst = glob ? a.dqg + (b * G + task.start + r) * rs + h * D
                        : a.dq + (b * N + sc.rowpos[r]) * rs + h * D;
          const T* ar = sc.acc.data() + r * D;
          for (int64_t d = 0; d < D; ++d) dst[d] = ar[d] * c;
        }
        continue;
      }
      // ---- key-side tasks: the tile's keys are fixed, rows stream past in blocks of BR ----
      const bool to_global = task.type == Task::kValidKeys;  // gradients of kg / vg (global rows)
      int32_t* klist = sc.keys.data();
      int nc = 0;
      if (task.type == Task::kBandKeys) {
        for (int64_t j = task.start; j < std::min(N, task.start + BK); ++j)
          if (a.band_key[b * N + j]) klist[nc++] = int32_t(j);
      } else if (task.type == Task::kGlobalKeys) {
        nc = int(std::min<int64_t>(BK, a.num_global[b] - task.start));
        std::memcpy(klist, a.global_idx + b * G + task.start, sizeof(int32_t) * nc);
      } else {
        nc = int(std::min<int64_t>(BK, L.n_valid[b] - task.start));
        std::memcpy(klist, L.valid.data() + b * N + task.start, sizeof(int32_t) * nc);
      }
      if (nc == 0) continue;
      const T* Kbh = (to_global ? a.kg : a.k) + b * N * rs + h * D;
      const T* Vbh = (to_global ? a.vg : a.v) + b * N * rs + h * D;
      set_keys(sc, klist, nc, Kbh, Vbh, rs);
      std::fill(sc.acc.begin(), sc.acc.begin() + BK * D, T(0));
      std::fill(sc.acc2.begin(), sc.acc2.begin() + BK * D, T(0));
      const int n_free = task.type == Task::kBandKeys ? 0 : nc;

      // rows: [r_begin, r_end) of the list `rows` (positions), or gathered global rows
      const int32_t* rows = nullptr;
      int64_t r_begin = 0, r_end = 0;
      if (task.type == Task::kBandKeys) {
        const int32_t* loc = L.local.data() + b * N;
        const int32_t* loc_end = loc + L.n_local[b];
        rows = loc;
        r_begin = std::lower_bound(loc, loc_end, int32_t(std::max<int64_t>(0, klist[0] - w))) - loc;
        r_end = std::upper_bound(loc, loc_end, int32_t(std::min<int64_t>(N - 1, klist[nc - 1] + w))) - loc;
      } else if (task.type == Task::kGlobalKeys) {
        rows = L.local.data() + b * N;
        r_end = L.n_local[b];
      } else {
        rows = a.global_idx + b * G;
        r_end = a.num_global[b];
      }
      for (int64_t r0 = r_begin; r0 < r_end; r0 += BR) {
        const int R = int(std::min<int64_t>(BR, r_end - r0));
        for (int r = 0; r < R; ++r) {
          const int64_t i = rows[r0 + r];
          sc.rowpos[r] = int32_t(i);
          sc.qrow[r] = to_global ? a.qg + (b * G + r0 + r) * rs + h * D : a.q + (b * N + i) * rs + h * D;
          sc.dorow[r] = a.dout + (b * N + i) * rs + h * D;
          sc.lse[r] = a.lse[bh_lse + i];
          sc.delta[r] = delta[bh_lse + i];
        }
        pack_rows(sc, R, D, c);
        key_step(sc, R, nc, n_free, D, w);
      }
      T* dK = (to_global ? a.dkg : a.dk) + b * N * rs + h * D;
      T* dV = (to_global ? a.dvg : a.dv) + b * N * rs + h * D;
      for (int t = 0; t < nc; ++t) {
        T* dk = dK + int64_t(klist[t]) * rs;
        T* dv = dV + int64_t(klist[t]) * rs;
        const T* ak = sc.acc.data() + t * D;
        const T* av = sc.acc2.data() + t * D;
        for (int64_t d = 0; d < D; ++d) {
          dk[d] = ak[d] * c;
          dv[d] = av[d];
        }
      }
    }
  }
}

template void longformer_attention_backward<float>(const AttentionGradArgs<float>&);
template void longformer_attention_backward<double>(const AttentionGradArgs<double>&);
template void longformer_attention_forward_lse<float>(const AttentionGradArgs<float>&, float*, float*);
template void longformer_attention_forward_lse<double>(const AttentionGradArgs<double>&, double*, double*);

// ---------------------------------------------------------------------------------------------
// Python bindings
// ---------------------------------------------------------------------------------------------
namespace py = pybind11;
namespace {

// Inputs common to every entry: q, k, v, qg, kg, vg and the layout arrays.
template <typename T>
AttentionGradArgs<T> common_args(const py::array& q, const py::array& k, const py::array& v, const py::array& qg,
                                 const py::array& kg, const py::array& vg, const py::array& global_idx,
                                 const py::array& num_global, const py::array& band_key,
                                 const py::array& key_padding, const py::array& is_global, int64_t window,
                                 int num_threads) {
  AttentionGradArgs<T> a;
  if (q.ndim() != 4 || qg.ndim() != 4) throw std::invalid_argument("q and q_global must have shape [B, N|G, H, D]");
  a.B = q.shape(0); a.N = q.shape(1); a.H = q.shape(2); a.D = q.shape(3); a.G = qg.shape(1);
  const std::vector<py::ssize_t> bnhd{a.B, a.N, a.H, a.D}, bghd{a.B, a.G, a.H, a.D}, bn{a.B, a.N};
  a.q = checked_array<T>(q, "q", bnhd, false);
  a.k = checked_array<T>(k, "k", bnhd, false);
  a.v = checked_array<T>(v, "v", bnhd, false);
  a.qg = checked_array<T>(qg, "q_global", bghd, false);
  a.kg = checked_array<T>(kg, "k_global", bnhd, false);
  a.vg = checked_array<T>(vg, "v_global", bnhd, false);
  a.global_idx = checked_array<int32_t>(global_idx, "global_idx", {a.B, a.G}, false);
  a.num_global = checked_array<int32_t>(num_global, "num_global", {a.B}, false);
  a.band_key = checked_array<uint8_t>(band_key, "band_key", bn, false);
  a.key_padding = checked_array<uint8_t>(key_padding, "key_padding", bn, false);
  a.is_global = checked_array<uint8_t>(is_global, "is_global", bn, false);
  a.window = window;
  a.num_threads = num_threads;
  return a;
}

template <typename T>
void forward_lse_t(const py::array& q, const py::array& k, const py::array& v, const py::array& qg,
                   const py::array& kg, const py::array& vg, py::array out, py::array lse,
                   const py::array& global_idx, const py::array& num_global, const py::array& band_key,
                   const py::array& key_padding, const py::array& is_global, int64_t window, int num_threads) {
  auto a = common_args<T>(q, k, v, qg, kg, vg, global_idx, num_global, band_key, key_padding, is_global, window,
                          num_threads);
  T* o = checked_array<T>(out, "out", {a.B, a.N, a.H, a.D}, true);
  T* l = checked_array<T>(lse, "lse", {a.B, a.H, a.N}, true);
  py::gil_scoped_release release;
  longformer_attention_forward_lse<T>(a, o, l);
}

template <typename T>
void backward_t(const py::array& q, const py::array& k, const py::array& v, const py::array& qg, const py::array& kg,
                const py::array& vg, const py::array& out, const py::array& lse, const py::array& dout, py::array dq,
                py::array dk, py::array dv, py::array dqg, py::array dkg, py::array dvg, const py::array& global_idx,
                const py::array& num_global, const py::array& band_key, const py::array& key_padding,
                const py::array& is_global, int64_t window, int num_threads) {
  auto a = common_args<T>(q, k, v, qg, kg, vg, global_idx, num_global, band_key, key_padding, is_global, window,
                          num_threads);
  const std::vector<py::ssize_t> bnhd{a.B, a.N, a.H, a.D}, bghd{a.B, a.G, a.H, a.D};
  a.out = checked_array<T>(out, "out", bnhd, false);
  a.lse = checked_array<T>(lse, "lse", {a.B, a.H, a.N}, false);
  a.dout = checked_array<T>(dout, "grad_out", bnhd, false);
  a.dq = checked_array<T>(dq, "dq", bnhd, true);
  a.dk = checked_array<T>(dk, "dk", bnhd, true);
  a.dv = checked_array<T>(dv, "dv", bnhd, true);
  a.dqg = checked_array<T>(dqg, "dq_global", bghd, true);
  a.dkg = checked_array<T>(dkg, "dk_global", bnhd, true);
  a.dvg = checked_array<T>(dvg, "dv_global", bnhd, true);
  py::gil_scoped_release release;
  longformer_attention_backward<T>(a);
}

bool is_f64(const py::array& a) { return py::isinstance<py::array_t<double>>(a); }

}  // namespace

void register_backward(py::module_& m) {
  m.def(
      "longformer_attention_lse_fp32",
      [](const py::array& q, const py::array& k, const py::array& v, const py::array& qg, const py::array& kg,
         const py::array& vg, py::array out, py::array lse, const py::array& global_idx, const py::array& num_global,
         const py::array& band_key, const py::array& key_padding, const py::array& is_global, int64_t window,
         int num_threads) {
        auto a = common_args<float>(q, k, v, qg, kg, vg, global_idx, num_global, band_key, key_padding, is_global,
                                    window, num_threads);
        AttentionArgs f;
        f.q = a.q; f.k = a.k; f.v = a.v; f.qg = a.qg; f.kg = a.kg; f.vg = a.vg;
        f.out = checked_array<float>(out, "out", {a.B, a.N, a.H, a.D}, true);
        f.lse = checked_array<float>(lse, "lse", {a.B, a.H, a.N}, true);
        f.global_idx = a.global_idx; f.num_global = a.num_global; f.band_key = a.band_key;
        f.key_padding = a.key_padding; f.is_global = a.is_global;
        f.B = a.B; f.N = a.N; f.H = a.H; f.D = a.D; f.G = a.G;
        f.window = window; f.num_threads = num_threads;
        py::gil_scoped_release release;
        longformer_attention_fp32(f);
      },
      "The fast fp32 forward (as longformer_attention_fp32) that also writes lse [B, H, N] (valid rows).",
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("q_global"), py::arg("k_global"), py::arg("v_global"),
      py::arg("out"), py::arg("lse"), py::arg("global_idx"), py::arg("num_global"), py::arg("band_key"),
      py::arg("key_padding"), py::arg("is_global"), py::arg("one_sided_window"), py::arg("num_threads") = 0);
  m.def(
      "longformer_attention_forward_lse",
      [](const py::array& q, const py::array& k, const py::array& v, const py::array& qg, const py::array& kg,
         const py::array& vg, py::array out, py::array lse, const py::array& global_idx, const py::array& num_global,
         const py::array& band_key, const py::array& key_padding, const py::array& is_global, int64_t window,
         int num_threads) {
        (is_f64(q) ? forward_lse_t<double> : forward_lse_t<float>)(q, k, v, qg, kg, vg, out, lse, global_idx,
                                                                    num_global, band_key, key_padding, is_global,
                                                                    window, num_threads);
      },
      "Plain two-pass forward with lse, float32 or float64 (for float64 gradients; the fp32 fast path is\n"
      "longformer_attention_lse_fp32). Same arguments.",
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("q_global"), py::arg("k_global"), py::arg("v_global"),
      py::arg("out"), py::arg("lse"), py::arg("global_idx"), py::arg("num_global"), py::arg("band_key"),
      py::arg("key_padding"), py::arg("is_global"), py::arg("one_sided_window"), py::arg("num_threads") = 0);
  m.def(
      "longformer_attention_backward",
      [](const py::array& q, const py::array& k, const py::array& v, const py::array& qg, const py::array& kg,
         const py::array& vg, const py::array& out, const py::array& lse, const py::array& dout, py::array dq,
         py::array dk, py::array dv, py::array dqg, py::array dkg, py::array dvg, const py::array& global_idx,
         const py::array& num_global, const py::array& band_key, const py::array& key_padding,
         const py::array& is_global, int64_t window, int num_threads) {
        (is_f64(q) ? backward_t<double> : backward_t<float>)(q, k, v, qg, kg, vg, out, lse, dout, dq, dk, dv, dqg,
                                                              dkg, dvg, global_idx, num_global, band_key,
                                                              key_padding, is_global, window, num_threads);
      },
      "Gradients of the attention, float32 or float64 (all float arrays one dtype, C-contiguous): writes\n"
      "dq, dk, dv, dk_global, dv_global [B, N, H, D] and dq_global [B, G, H, D] (gathered) from the saved\n"
      "inputs, out, lse [B, H, N] and grad_out. Deterministic for any thread count. Releases the GIL.",
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("q_global"), py::arg("k_global"), py::arg("v_global"),
      py::arg("out"), py::arg("lse"), py::arg("grad_out"), py::arg("dq"), py::arg("dk"), py::arg("dv"),
      py::arg("dq_global"), py::arg("dk_global"), py::arg("dv_global"), py::arg("global_idx"),
      py::arg("num_global"), py::arg("band_key"), py::arg("key_padding"), py::arg("is_global"),
      py::arg("one_sided_window"), py::arg("num_threads") = 0);
}

}  // namespace locore
