#include "bindings/numpy_args.h"

namespace ponder::bindings {

DType dtype_of(const py::array& a) {
  const char kind = a.dtype().kind();
  const auto size = a.itemsize();
  if (kind == 'b') return DType::Bool;
  if (kind == 'i') return size == 1 ? DType::I8 : size == 2 ? DType::I16 : size == 4 ? DType::I32 : size == 8 ? DType::I64 : DType::Other;
  if (kind == 'u') return size == 1 ? DType::U8 : size == 2 ? DType::U16 : size == 4 ? DType::U32 : size == 8 ? DType::U64 : DType::Other;
  if (kind == 'f') return size == 4 ? DType::F32 : size == 8 ? DType::F64 : DType::Other;
  return DType::Other;
}

// A 1-D view of anything numpy can read as an array; zero-copy for numpy arrays (and
// tensor.numpy()) of a native-endian supported dtype, any stride. `keep` owns any array
// created on the way, for the duration of the call.

NumView Args::view(py::handle obj, const char* name) {
  py::array a = py::array::ensure(obj);
  if (!a) throw py::value_error(std::string(name) + " must be array-like (a numpy array or a list of numbers)");
  if (!a.dtype().attr("isnative").cast<bool>()) a = py::array::ensure(a.attr("astype")(a.dtype().attr("newbyteorder")("=")));
  const DType dt = dtype_of(a);
  if (dt == DType::Other && a.size() > 0)
    throw py::value_error(std::string(name) + " must be a numeric array, got dtype " + py::str(a.dtype()).cast<std::string>());
  keep_.push_back(a);
  const int nd = static_cast<int>(a.ndim());
  return NumView(a.data(), nd == 1 ? a.shape(0) : a.size(), nd == 1 ? a.strides(0) : a.itemsize(), dt, nd);
}

int64_t Args::scalar(py::handle obj, const char* name, int64_t lo, int64_t hi) {
  py::list one;
  one.append(obj);
  return ponder::to_ints(view(one, name), name, lo, hi)[0];
}

py::tuple ragged_to_numpy(ponder::tree::Ragged&& r) {
  return py::make_tuple(to_numpy(std::move(r.tokens)), to_numpy(std::move(r.offsets)));
}

py::array int32_matrix(std::vector<int32_t>&& v, int64_t rows, int64_t cols) {
  return to_numpy(std::move(v)).attr("reshape")(py::make_tuple(rows, cols));
}

std::string option(py::handle obj) {
  return py::isinstance<py::str>(obj) ? obj.cast<std::string>() : py::repr(obj).cast<std::string>();
}

}  // namespace ponder::bindings
