// pybind11 module locore_kernels._cpu: the CPU backend of the Longformer attention op.
#include <pybind11/pybind11.h>

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

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "LoCoRE CPU kernels (C++17, OpenMP)";
  m.def("openmp_enabled", []() { return bool(LOCORE_OPENMP); }, "True if built with OpenMP");
  m.def("max_threads", &openmp_max_threads, "OpenMP threads a parallel region would use");
}
