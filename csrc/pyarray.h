// Checks on the numpy arrays the Python bindings receive (dtype, exact shape, C-contiguity, writeable):
// one definition for the forward entries (module.cpp) and the backward ones (attention_backward.cpp).
// Nothing is ever copied: a check returns the array's own data pointer.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>
#include <vector>

namespace locore {

inline std::string shape_str(const std::vector<pybind11::ssize_t>& s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + (s.size() == 1 ? ",)" : ")");
}

// dtype T, the exact `shape`, C-contiguous (and writeable when asked): the data pointer, else
// std::invalid_argument naming the array and what was expected.
template <typename T>
T* checked_array(const pybind11::array& arr, const char* name, const std::vector<pybind11::ssize_t>& shape,
                 bool writeable = false) {
  namespace py = pybind11;
  if (!py::isinstance<py::array_t<T>>(arr))
    throw std::invalid_argument(std::string(name) + " must be a " + std::string(py::str(py::dtype::of<T>())) +
                                " array, got dtype " + std::string(py::str(arr.dtype())));
  std::vector<py::ssize_t> got(arr.shape(), arr.shape() + arr.ndim());
  if (got != shape)
    throw std::invalid_argument(std::string(name) + " has shape " + shape_str(got) + ", expected " +
                                shape_str(shape));
  if (!(arr.flags() & py::array::c_style)) throw std::invalid_argument(std::string(name) + " must be C-contiguous");
  if (writeable && !arr.writeable()) throw std::invalid_argument(std::string(name) + " must be writeable");
  return static_cast<T*>(const_cast<void*>(arr.data()));
}

}  // namespace locore
