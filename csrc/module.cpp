// pybind11 module locore_kernels._cpu: the CPU backend of the Longformer attention op.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "attention.h"
#include "pyarray.h"
#include "attention_backward.h"

#if LOCORE_OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

static int openmp_max_threads() {
#if LOCORE_OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

namespace {

using locore::checked_array;  // the numpy checks, shared with the backward's bindings (pyarray.h)

py::ssize_t dim(const py::array& a, int i, const char* name, int ndim) {
  if (a.ndim() != ndim)
    throw std::invalid_argument(std::string(name) + " must have " + std::to_string(ndim) + " dimensions, got " +
                                std::to_string(a.ndim()));
  return a.shape(i);
}

// The layout arrays and settings both entries take (a.B, a.N, a.G already set): [B, G] global_idx,
// [B] num_global, [B, N] uint8 masks.
template <typename Args>
void bind_layout(Args& a, const py::array& global_idx, const py::array& num_global, const py::array& band_key,
                 const py::array& key_padding, const py::array& is_global, int64_t one_sided_window,
                 int num_threads) {
  const std::vector<py::ssize_t> bn{a.B, a.N};
  a.global_idx = checked_array<int32_t>(global_idx, "global_idx", {a.B, a.G});
  a.num_global = checked_array<int32_t>(num_global, "num_global", {a.B});
  a.band_key = checked_array<uint8_t>(band_key, "band_key", bn);
  a.key_padding = checked_array<uint8_t>(key_padding, "key_padding", bn);
  a.is_global = checked_array<uint8_t>(is_global, "is_global", bn);
  a.window = one_sided_window;
  a.num_threads = num_threads;
}

void attention_fp32(const py::array& q, const py::array& k, const py::array& v, const py::array& q_global,
                    const py::array& k_global, const py::array& v_global, py::array out,
                    const py::array& global_idx, const py::array& num_global, const py::array& band_key,
                    const py::array& key_padding, const py::array& is_global, int64_t one_sided_window,
                    int num_threads) {
  locore::AttentionArgs a;
  a.B = dim(q, 0, "q", 4);
  a.N = q.shape(1);
  a.H = q.shape(2);
  a.D = q.shape(3);
  a.G = dim(q_global, 1, "q_global", 4);
  const std::vector<py::ssize_t> bnhd{a.B, a.N, a.H, a.D}, bghd{a.B, a.G, a.H, a.D};
  a.q = checked_array<float>(q, "q", bnhd);
  a.k = checked_array<float>(k, "k", bnhd);
  a.v = checked_array<float>(v, "v", bnhd);
  a.qg = checked_array<float>(q_global, "q_global", bghd);
  a.kg = checked_array<float>(k_global, "k_global", bnhd);
  a.vg = checked_array<float>(v_global, "v_global", bnhd);
  a.out = checked_array<float>(out, "out", bnhd, /*writeable=*/true);
  bind_layout(a, global_idx, num_global, band_key, key_padding, is_global, one_sided_window, num_threads);
  const size_t out_bytes = size_t(a.B * a.N * a.H * a.D) * sizeof(float);
  const size_t qg_bytes = size_t(a.B * a.G * a.H * a.D) * sizeof(float);
  const std::pair<const float*, size_t> ins[] = {{a.q, out_bytes},  {a.k, out_bytes},  {a.v, out_bytes},
                                                 {a.qg, qg_bytes},  {a.kg, out_bytes}, {a.vg, out_bytes}};
  const char* o = reinterpret_cast<const char*>(a.out);
  for (const auto& in : ins) {  // the kernel reads inputs after writing rows of out: no aliasing allowed
    const char* p = reinterpret_cast<const char*>(in.first);
    if (out_bytes && in.second && p < o + out_bytes && o < p + in.second)
      throw std::invalid_argument("out must not overlap an input");
  }
  py::gil_scoped_release release;
  locore::longformer_attention_fp32(a);
}

void rows_fp32(const py::array& q_rows, const py::array& k, const py::array& v, const py::array& rows,
               py::array out, const py::array& global_idx, const py::array& num_global, const py::array& band_key,
               const py::array& key_padding, const py::array& is_global, int64_t one_sided_window,
               int num_threads) {
  locore::RowsArgs a;
  a.B = dim(k, 0, "k", 4);
  a.N = k.shape(1);
  a.H = k.shape(2);
  a.D = k.shape(3);
  a.R = dim(rows, 0, "rows", 1);
  a.G = dim(global_idx, 1, "global_idx", 2);
  const std::vector<py::ssize_t> bnhd{a.B, a.N, a.H, a.D}, brhd{a.B, a.R, a.H, a.D};
  a.q_rows = checked_array<float>(q_rows, "q_rows", brhd);
  a.k = checked_array<float>(k, "k", bnhd);
  a.v = checked_array<float>(v, "v", bnhd);
  a.rows = checked_array<int32_t>(rows, "rows", {a.R});
  a.out = checked_array<float>(out, "out", brhd, /*writeable=*/true);
  bind_layout(a, global_idx, num_global, band_key, key_padding, is_global, one_sided_window, num_threads);
  const size_t out_bytes = size_t(a.B * a.R * a.H * a.D) * sizeof(float);
  const size_t kv_bytes = size_t(a.B * a.N * a.H * a.D) * sizeof(float);
  const std::pair<const float*, size_t> ins[] = {{a.q_rows, out_bytes}, {a.k, kv_bytes}, {a.v, kv_bytes}};
  const char* o = reinterpret_cast<const char*>(a.out);
  for (const auto& in : ins) {  // rows of out are written while inputs are still read
    const char* p = reinterpret_cast<const char*>(in.first);
    if (out_bytes && in.second && p < o + out_bytes && o < p + in.second)
      throw std::invalid_argument("out must not overlap an input");
  }
  py::gil_scoped_release release;
  locore::longformer_rows_fp32(a);
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "LoCoRE CPU kernels (C++17, OpenMP)";
  m.def("openmp_enabled", []() { return bool(LOCORE_OPENMP); }, "True if built with OpenMP");
  m.def("max_threads", &openmp_max_threads, "OpenMP threads a parallel region would use");
  m.def("simd_level", &locore::simd_level, "inner loops compiled in: 'avx2+fma' or 'scalar'");
  m.def("query_block_rows", &locore::query_block_rows, "query rows per block of the attention kernel");
  m.def("key_chunk", &locore::key_chunk, "keys per online-softmax chunk of the attention kernel");
  m.def("longformer_attention_fp32", &attention_fp32,
        "Longformer sliding-window + global attention, fp32, into `out` (all arrays C-contiguous).\n"
        "q, k, v, k_global, v_global, out: float32 [B, N, H, D]; q_global: float32 [B, G, H, D] (gathered\n"
        "global queries); global_idx int32 [B, G]; num_global int32 [B]; band_key, key_padding, is_global\n"
        "uint8 [B, N]. Scores are scaled by 1/sqrt(D). Releases the GIL while computing.",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("q_global"), py::arg("k_global"), py::arg("v_global"),
        py::arg("out"), py::arg("global_idx"), py::arg("num_global"), py::arg("band_key"),
        py::arg("key_padding"), py::arg("is_global"), py::arg("one_sided_window"), py::arg("num_threads") = 0);
  m.def("longformer_rows_fp32", &rows_fp32,
        "The non-global rule for the rows `rows` only, fp32, into `out`: q_rows, out float32 [B, R, H, D];\n"
        "k, v float32 [B, N, H, D]; rows int32 [R] (positions, any order); layout arrays as in\n"
        "longformer_attention_fp32. Padded rows are exact zeros. Releases the GIL while computing.",
        py::arg("q_rows"), py::arg("k"), py::arg("v"), py::arg("rows"), py::arg("out"), py::arg("global_idx"),
        py::arg("num_global"), py::arg("band_key"), py::arg("key_padding"), py::arg("is_global"),
        py::arg("one_sided_window"), py::arg("num_threads") = 0);
  locore::register_backward(m);
}
