// A typed, strided, read-only view of a 1-D numeric array owned by the caller.
//
// The bindings wrap numpy buffers in NumView without copying (any integer, float or bool
// dtype, any stride); the core validates kinds and values itself, so every check is also
// exercised by the native tests, which build NumViews from std::vector.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace ponder {

enum class DType : uint8_t { Bool, I8, I16, I32, I64, U8, U16, U32, U64, F32, F64, Other };

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::Bool: return "bool";
    case DType::I8: return "int8";
    case DType::I16: return "int16";
    case DType::I32: return "int32";
    case DType::I64: return "int64";
    case DType::U8: return "uint8";
    case DType::U16: return "uint16";
    case DType::U32: return "uint32";
    case DType::U64: return "uint64";
    case DType::F32: return "float32";
    case DType::F64: return "float64";
    default: return "unsupported";
  }
}

inline bool is_integer(DType d) { return d >= DType::I8 && d <= DType::U64; }
inline bool is_real(DType d) { return d >= DType::I8 && d <= DType::F64; }

struct NumView {
  const char* data = nullptr;
  int64_t size = 0;
  int64_t stride = 0;  // bytes between elements
  int ndim = 1;
  DType dtype = DType::I64;

  NumView() = default;
  NumView(const void* p, int64_t n, int64_t stride_bytes, DType t, int nd = 1)
      : data(static_cast<const char*>(p)), size(n), stride(stride_bytes), ndim(nd), dtype(t) {}

  template <typename T>
  static NumView of(const std::vector<T>& v);

  // Raw element access; callers check the dtype kind first.
  int64_t i64(int64_t i) const {
    const char* p = data + i * stride;
    switch (dtype) {
      case DType::Bool: return *reinterpret_cast<const uint8_t*>(p) ? 1 : 0;
      case DType::I8: return *reinterpret_cast<const int8_t*>(p);
      case DType::I16: return *reinterpret_cast<const int16_t*>(p);
      case DType::I32: return *reinterpret_cast<const int32_t*>(p);
      case DType::I64: return *reinterpret_cast<const int64_t*>(p);
      case DType::U8: return *reinterpret_cast<const uint8_t*>(p);
      case DType::U16: return *reinterpret_cast<const uint16_t*>(p);
      case DType::U32: return *reinterpret_cast<const uint32_t*>(p);
      case DType::U64: {
        uint64_t u = *reinterpret_cast<const uint64_t*>(p);
        // Saturate: callers range-check, so a huge value is reported instead of wrapping.
        return u > static_cast<uint64_t>(INT64_MAX) ? INT64_MAX : static_cast<int64_t>(u);
      }
      default: return 0;
    }
  }
  double f64(int64_t i) const {
    const char* p = data + i * stride;
    if (dtype == DType::F32) return *reinterpret_cast<const float*>(p);
    if (dtype == DType::F64) return *reinterpret_cast<const double*>(p);
    if (dtype == DType::U64) return static_cast<double>(*reinterpret_cast<const uint64_t*>(p));
    return static_cast<double>(i64(i));
  }
};

template <typename T> struct DTypeOf;
template <> struct DTypeOf<int8_t> { static constexpr DType value = DType::I8; };
template <> struct DTypeOf<int16_t> { static constexpr DType value = DType::I16; };
template <> struct DTypeOf<int32_t> { static constexpr DType value = DType::I32; };
template <> struct DTypeOf<int64_t> { static constexpr DType value = DType::I64; };
template <> struct DTypeOf<uint8_t> { static constexpr DType value = DType::U8; };
template <> struct DTypeOf<uint16_t> { static constexpr DType value = DType::U16; };
template <> struct DTypeOf<uint32_t> { static constexpr DType value = DType::U32; };
template <> struct DTypeOf<uint64_t> { static constexpr DType value = DType::U64; };
template <> struct DTypeOf<float> { static constexpr DType value = DType::F32; };
template <> struct DTypeOf<double> { static constexpr DType value = DType::F64; };
template <> struct DTypeOf<bool> { static constexpr DType value = DType::Bool; };

template <typename T>
NumView NumView::of(const std::vector<T>& v) {
  static_assert(!std::is_same<T, bool>::value, "std::vector<bool> is packed; use uint8_t");
  return NumView(v.data(), static_cast<int64_t>(v.size()), sizeof(T), DTypeOf<T>::value);
}

// ---- checked conversions: every failure names the argument and raises ValueError
// (std::invalid_argument) in Python.

inline void check_1d(const NumView& v, const char* name) {
  if (v.ndim != 1)
    throw std::invalid_argument(std::string(name) + " must be a 1-D array, got " +
                                std::to_string(v.ndim) + " dimensions");
}

namespace detail {

// Copies n integers of type In (strided) into out, checking each lies in [lo, hi]. Returns the
// index of the first value out of range, or -1. The contiguous case is a plain loop the
// compiler vectorizes; this is the hot path of every batched call.
template <typename In, typename Out>
int64_t convert_ints(const char* data, int64_t stride, int64_t n, Out* out, int64_t lo, int64_t hi) {
  auto ok = [lo, hi](In x) {
    if constexpr (std::is_unsigned<In>::value) {
      return (lo <= 0 || static_cast<uint64_t>(x) >= static_cast<uint64_t>(lo)) &&
             (hi >= 0 && static_cast<uint64_t>(x) <= static_cast<uint64_t>(hi));
    } else {
      return static_cast<int64_t>(x) >= lo && static_cast<int64_t>(x) <= hi;
    }
  };
  if (stride == static_cast<int64_t>(sizeof(In))) {
    const In* p = reinterpret_cast<const In*>(data);
    bool all = true;
    for (int64_t i = 0; i < n; ++i) {
      all &= ok(p[i]);
      out[i] = static_cast<Out>(p[i]);
    }
    if (all) return -1;
    for (int64_t i = 0; i < n; ++i)
      if (!ok(p[i])) return i;
  }
  for (int64_t i = 0; i < n; ++i) {
    const In x = *reinterpret_cast<const In*>(data + i * stride);
    if (!ok(x)) return i;
    out[i] = static_cast<Out>(x);
  }
  return -1;
}

}  // namespace detail

// Integer array -> values of type Out (int32_t or int64_t), each in [lo, hi] (a range that
// fits Out). Empty arrays of any dtype are accepted.
template <typename Out>
std::vector<Out> to_ints_as(const NumView& v, const char* name, int64_t lo, int64_t hi) {
  check_1d(v, name);
  std::vector<Out> out;
  if (v.size == 0) return out;
  if (!is_integer(v.dtype))
    throw std::invalid_argument(std::string(name) + " must be an integer array, got dtype " +
                                dtype_name(v.dtype));
  out.resize(static_cast<size_t>(v.size));
  int64_t bad = -1;
  switch (v.dtype) {
    case DType::I8: bad = detail::convert_ints<int8_t>(v.data, v.stride, v.size, out.data(), lo, hi); break;
    case DType::I16: bad = detail::convert_ints<int16_t>(v.data, v.stride, v.size, out.data(), lo, hi); break;
    case DType::I32: bad = detail::convert_ints<int32_t>(v.data, v.stride, v.size, out.data(), lo, hi); break;
    case DType::I64: bad = detail::convert_ints<int64_t>(v.data, v.stride, v.size, out.data(), lo, hi); break;
    case DType::U8: bad = detail::convert_ints<uint8_t>(v.data, v.stride, v.size, out.data(), lo, hi); break;
    case DType::U16: bad = detail::convert_ints<uint16_t>(v.data, v.stride, v.size, out.data(), lo, hi); break;
    case DType::U32: bad = detail::convert_ints<uint32_t>(v.data, v.stride, v.size, out.data(), lo, hi); break;
    case DType::U64: bad = detail::convert_ints<uint64_t>(v.data, v.stride, v.size, out.data(), lo, hi); break;
    default: break;
  }
  if (bad >= 0) {
    std::string value;
    if (v.dtype == DType::U64) {
      value = std::to_string(*reinterpret_cast<const uint64_t*>(v.data + bad * v.stride));
    } else {
      value = std::to_string(v.i64(bad));
    }
    throw std::invalid_argument(std::string(name) + "[" + std::to_string(bad) + "] = " + value +
                                " is out of range [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
  }
  return out;
}

// Integer array -> int64 values in [lo, hi].
inline std::vector<int64_t> to_ints(const NumView& v, const char* name, int64_t lo, int64_t hi) {
  return to_ints_as<int64_t>(v, name, lo, hi);
}

// Real array -> finite float64 values.
inline std::vector<double> to_finite_doubles(const NumView& v, const char* name) {
  check_1d(v, name);
  std::vector<double> out;
  if (v.size == 0) return out;
  if (!is_real(v.dtype))
    throw std::invalid_argument(std::string(name) + " must be a real-valued array, got dtype " +
                                dtype_name(v.dtype));
  out.resize(static_cast<size_t>(v.size));
  for (int64_t i = 0; i < v.size; ++i) {
    double x = v.f64(i);
    if (!(x == x) || x == 1.0 / 0.0 || x == -1.0 / 0.0)
      throw std::invalid_argument(std::string(name) + "[" + std::to_string(i) + "] = " +
                                  std::to_string(x) + " is not finite");
    out[static_cast<size_t>(i)] = x;
  }
  return out;
}

// Bool array (or integers 0/1) -> 0/1 bytes.
inline std::vector<uint8_t> to_bools(const NumView& v, const char* name) {
  check_1d(v, name);
  std::vector<uint8_t> out;
  if (v.size == 0) return out;
  if (v.dtype != DType::Bool && !is_integer(v.dtype))
    throw std::invalid_argument(std::string(name) + " must be a boolean array, got dtype " +
                                dtype_name(v.dtype));
  out.resize(static_cast<size_t>(v.size));
  for (int64_t i = 0; i < v.size; ++i) {
    int64_t x = v.i64(i);
    if (x != 0 && x != 1)
      throw std::invalid_argument(std::string(name) + "[" + std::to_string(i) + "] = " +
                                  std::to_string(x) + " is not a boolean (0 or 1)");
    out[static_cast<size_t>(i)] = static_cast<uint8_t>(x);
  }
  return out;
}

}  // namespace ponder
