// A borrowed, typed, strided view of an n-D tensor (up to 4-D) on the CPU or a CUDA device:
// what the data-plane kernels take instead of framework tensors (no Python, no torch).
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>

namespace ponder {

enum class ScalarType : uint8_t { Float32, Float16, BFloat16, Int32, Int64 };
enum class DeviceType : uint8_t { CPU, CUDA };

const char* scalar_type_name(ScalarType t);
size_t element_size(ScalarType t);
inline bool is_floating(ScalarType t) {
  return t == ScalarType::Float32 || t == ScalarType::Float16 || t == ScalarType::BFloat16;
}
inline bool is_index(ScalarType t) { return t == ScalarType::Int32 || t == ScalarType::Int64; }

constexpr int kMaxDims = 4;

// Strides are in elements and may be any value (kernels that require contiguity say so and
// validate it). The viewed memory is owned by the caller for the duration of the call.
struct TensorView {
  void* data = nullptr;
  ScalarType dtype = ScalarType::Float32;
  int ndim = 0;
  int64_t shape[kMaxDims] = {0, 0, 0, 0};
  int64_t strides[kMaxDims] = {0, 0, 0, 0};
  DeviceType device = DeviceType::CPU;
  int device_id = 0;

  int64_t numel() const;
  bool is_contiguous() const;  // row-major; dimensions of extent 1 may have any stride
  // A row-major contiguous view of `data`; std::invalid_argument for more than 4 dimensions.
  static TensorView contiguous(void* data, ScalarType dtype, std::initializer_list<int64_t> shape,
                               DeviceType device = DeviceType::CPU, int device_id = 0);
};

}  // namespace ponder
