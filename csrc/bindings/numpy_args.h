// Marshalling of numpy-like arguments and results for the control-plane bindings (tree, kv).
// Inputs: any array-like becomes a 1-D NumView without copying when it is a numpy array of a
// native-endian supported dtype (any stride); results: std::vector -> numpy array without
// copying (the array owns the vector). Checks of kinds and values are the core's.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "common/num_view.h"
#include "tree/forest.h"

namespace ponder::bindings {

namespace py = pybind11;

constexpr int64_t kI64Max = INT64_MAX;
constexpr int64_t kI32Max = INT32_MAX;

// The NumView dtype of a numpy array (DType::Other when unsupported).
DType dtype_of(const py::array& a);

// A 1-D view of anything numpy can read as an array; zero-copy for numpy arrays (and
// tensor.numpy()) of a native-endian supported dtype, any stride. The Args object owns any
// array created on the way: keep it alive for the duration of the call.
class Args {
 public:
  // ValueError (naming `name`) when obj is not array-like or not numeric.
  NumView view(py::handle obj, const char* name);
  // A Python scalar checked like a one-element array: an integer in [lo, hi].
  int64_t scalar(py::handle obj, const char* name, int64_t lo, int64_t hi);

 private:
  std::vector<py::array> keep_;
};

// A 1-D numpy array that owns `v` (no copy); dtype: that of T unless named.
template <typename T>
py::array to_numpy(std::vector<T>&& v, const char* dtype = nullptr) {
  auto* heap = new std::vector<T>(std::move(v));
  py::capsule owner(heap, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  const py::dtype dt = dtype ? py::dtype(dtype) : py::dtype::of<T>();
  return py::array(dt, {static_cast<py::ssize_t>(heap->size())}, {static_cast<py::ssize_t>(sizeof(T))},
                   heap->data(), owner);
}

// (tokens, offsets) numpy arrays of a ragged result.
py::tuple ragged_to_numpy(ponder::tree::Ragged&& r);
// int32 [rows, cols] owning `v`.
py::array int32_matrix(std::vector<int32_t>&& v, int64_t rows, int64_t cols);
// A `how`-style option: strings pass through; anything else becomes its repr so the core
// rejects it with the list of valid choices (ValueError, like the twins).
std::string option(py::handle obj);

}  // namespace ponder::bindings
