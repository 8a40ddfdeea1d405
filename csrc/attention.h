// Longformer sliding-window + global-token attention on the CPU, fp32 (SPEC section 3).
//
// All tensors are C-contiguous. Projections and the output are [B, N, H, D] (row stride H*D);
// the global queries are gathered: [B, G, H, D], row g belongs to token global_idx[b, g].
#pragma once

#include <cstdint>
#include <string>

namespace locore {

struct AttentionArgs {
  const float* q = nullptr;   // [B, N, H, D] local projections
  const float* k = nullptr;
  const float* v = nullptr;
  const float* qg = nullptr;  // [B, G, H, D] global queries of the global tokens only
  const float* kg = nullptr;  // [B, N, H, D] global keys / values of every token
  const float* vg = nullptr;
  float* out = nullptr;       // [B, N, H, D] every row written (padded rows exactly 0)
  float* lse = nullptr;       // optional [B, H, N]: natural-log softmax normaliser of every valid row
                              // (for the backward); padded rows are left untouched. nullptr: not written

  const int32_t* global_idx = nullptr;  // [B, G] positions of the global tokens, first num_global[b] valid
  const int32_t* num_global = nullptr;  // [B]
  const uint8_t* band_key = nullptr;    // [B, N] valid and not global
  const uint8_t* key_padding = nullptr; // [B, N] 1 = padding
  const uint8_t* is_global = nullptr;   // [B, N]

  int64_t B = 0, N = 0, H = 0, D = 0, G = 0;
  int64_t window = 1;   // one-sided window w >= 1
  int num_threads = 0;  // <= 0: OpenMP default
};

// Throws std::invalid_argument on inconsistent layout data (indices out of range, ...).
void longformer_attention_fp32(const AttentionArgs& a);

// The non-global rule for a list of rows only (a layer whose outputs are read at a few rows).
struct RowsArgs {
  const float* q_rows = nullptr;  // [B, R, H, D] local queries of the listed rows
  const float* k = nullptr;       // [B, N, H, D] local keys / values of every token
  const float* v = nullptr;
  const int32_t* rows = nullptr;  // [R] positions in [0, N), any order, repeats allowed
  float* out = nullptr;           // [B, R, H, D] every row written (padded rows exactly 0)

  const int32_t* global_idx = nullptr;  // layout, as in AttentionArgs
  const int32_t* num_global = nullptr;
  const uint8_t* band_key = nullptr;
  const uint8_t* key_padding = nullptr;
  const uint8_t* is_global = nullptr;

  int64_t B = 0, N = 0, H = 0, D = 0, G = 0, R = 0;
  int64_t window = 1;
  int num_threads = 0;
};

// Row r (position i = rows[r], padded: exact zeros) attends to every global token and to the valid
// non-global tokens j with |i - j| <= w, one softmax; same arithmetic as the local rows of
// longformer_attention_fp32 (bit-identical for a row in a block of the same rows). Throws
// std::invalid_argument on inconsistent data.
void longformer_rows_fp32(const RowsArgs& a);

// "avx2+fma" or "scalar": which inner loops this build uses.
std::string simd_level();

// Rows per query block of the kernels (exposed so tests can pick shapes that are not a multiple).
int query_block_rows();
int key_chunk();

}  // namespace locore
