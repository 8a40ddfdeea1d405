// Backward of the Longformer sliding-window + global-token attention on the CPU (fp32 and fp64),
// and a plain forward that also returns the per-row log-sum-exp (any of the two dtypes).
//
// Same layout conventions as attention.h: projections, outputs and gradients are C-contiguous
// [B, N, H, D]; the global queries (and their gradient) are gathered [B, G, H, D]; lse is [B, H, N].
#pragma once

#include <cstdint>

namespace pybind11 { class module_; }

namespace locore {

template <typename T>
struct AttentionGradArgs {
  const T* q = nullptr;     // [B, N, H, D] local projections
  const T* k = nullptr;
  const T* v = nullptr;
  const T* qg = nullptr;    // [B, G, H, D] gathered global queries
  const T* kg = nullptr;    // [B, N, H, D] global keys / values of every token
  const T* vg = nullptr;
  const T* out = nullptr;   // [B, N, H, D] forward output
  const T* lse = nullptr;   // [B, H, N]   forward log-sum-exp of the scaled scores (valid rows)
  const T* dout = nullptr;  // [B, N, H, D] gradient of the loss w.r.t. out
  // Gradients, every element written (rows that receive nothing are exactly 0).
  T* dq = nullptr;   // [B, N, H, D]
  T* dk = nullptr;
  T* dv = nullptr;
  T* dqg = nullptr;  // [B, G, H, D]
  T* dkg = nullptr;  // [B, N, H, D]
  T* dvg = nullptr;

  const int32_t* global_idx = nullptr;  // [B, G]
  const int32_t* num_global = nullptr;  // [B]
  const uint8_t* band_key = nullptr;    // [B, N] valid and not global
  const uint8_t* key_padding = nullptr; // [B, N] 1 = padding
  const uint8_t* is_global = nullptr;   // [B, N]

  int64_t B = 0, N = 0, H = 0, D = 0, G = 0;
  int64_t window = 1;
  int num_threads = 0;
};

// Gradients of the attention (dq, dk, dv, dqg, dkg, dvg) from the saved forward output and LSE.
template <typename T>
void longformer_attention_backward(const AttentionGradArgs<T>& a);

// Forward with LSE in any of the two dtypes (two passes per row block: LSE, then the output).
// Reads q..vg and the layout; writes a.out (every row) and a.lse (valid rows; padded rows 0).
// The dq..dvg / out-gradient fields are ignored. The fast fp32 forward is attention.cpp's.
template <typename T>
void longformer_attention_forward_lse(const AttentionGradArgs<T>& a, T* out, T* lse);

// Adds the backward entry points to the pybind11 module (called from module.cpp).
void register_backward(pybind11::module_& m);

}  // namespace locore
