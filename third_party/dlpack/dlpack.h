// DLPack: the stable C ABI for exchanging tensors between frameworks (torch, numpy, cupy, jax...).
//
// Written for ponder from the public DLPack specification (https://dmlc.github.io/dlpack/latest/,
// https://github.com/dmlc/dlpack, header v1.x). The structures below are the ABI itself: field
// order, types and enum values must match the specification exactly. DLPack is Copyright by its
// contributors and licensed under the Apache License 2.0; this file restates its ABI under the
// same license (ponder is Apache-2.0 too).
//
// Only what a consumer needs is declared: devices, data types, the tensor, the two managed
// tensor flavours (legacy "dltensor" capsules and versioned "dltensor_versioned" ones).
#ifndef PONDER_THIRD_PARTY_DLPACK_H_
#define PONDER_THIRD_PARTY_DLPACK_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// The ABI version this header describes.
#define DLPACK_MAJOR_VERSION 1
#define DLPACK_MINOR_VERSION 1

typedef struct {
  uint32_t major;  // a change of major version breaks the ABI
  uint32_t minor;  // minor versions only add things
} DLPackVersion;

typedef enum {
  kDLCPU = 1,
  kDLCUDA = 2,
  kDLCUDAHost = 3,  // pinned host memory (cudaMallocHost)
  kDLOpenCL = 4,
  kDLVulkan = 7,
  kDLMetal = 8,
  kDLVPI = 9,
  kDLROCM = 10,
  kDLROCMHost = 11,
  kDLExtDev = 12,
  kDLCUDAManaged = 13,
  kDLOneAPI = 14,
  kDLWebGPU = 15,
  kDLHexagon = 16,
  kDLMAIA = 17,
} DLDeviceType;

typedef struct {
  DLDeviceType device_type;
  int32_t device_id;  // ordinal of the device (0 for the CPU)
} DLDevice;

typedef enum {
  kDLInt = 0U,
  kDLUInt = 1U,
  kDLFloat = 2U,
  kDLOpaqueHandle = 3U,
  kDLBfloat = 4U,
  kDLComplex = 5U,
  kDLBool = 6U,
  kDLFloat8_e3m4 = 7U,
  kDLFloat8_e4m3 = 8U,
  kDLFloat8_e4m3b11fnuz = 9U,
  kDLFloat8_e4m3fn = 10U,
  kDLFloat8_e4m3fnuz = 11U,
  kDLFloat8_e5m2 = 12U,
  kDLFloat8_e5m2fnuz = 13U,
  kDLFloat8_e8m0fnu = 14U,
  kDLFloat6_e2m3fn = 15U,
  kDLFloat6_e3m2fn = 16U,
  kDLFloat4_e2m1fn = 17U,
} DLDataTypeCode;

typedef struct {
  uint8_t code;    // a DLDataTypeCode
  uint8_t bits;    // bits per lane: 8, 16, 32, 64...
  uint16_t lanes;  // 1 for scalars; > 1 for vector types
} DLDataType;

typedef struct {
  // Base pointer (device memory for a CUDA tensor). The first element is at
  // (char*)data + byte_offset.
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;    // [ndim]
  int64_t* strides;  // [ndim] in elements (not bytes); NULL means compact row-major
  uint64_t byte_offset;
} DLTensor;

// Legacy managed tensor, carried in a PyCapsule named "dltensor". The consumer that takes
// ownership renames the capsule "used_dltensor" and calls deleter when done; a consumer that
// only borrows leaves the name alone so that the capsule's own destructor releases it.
typedef struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(struct DLManagedTensor* self);
} DLManagedTensor;

// Bits of DLManagedTensorVersioned::flags.
#define DLPACK_FLAG_BITMASK_READ_ONLY (1UL << 0UL)
#define DLPACK_FLAG_BITMASK_IS_COPIED (1UL << 1UL)
#define DLPACK_FLAG_BITMASK_IS_SUBBYTE_TYPE_PADDED (1UL << 2UL)

// Versioned managed tensor (DLPack >= 1.0), carried in a PyCapsule named "dltensor_versioned"
// ("used_dltensor_versioned" once consumed). Note the field order: the version comes first so
// that a consumer can check it before reading anything else.
typedef struct DLManagedTensorVersioned {
  DLPackVersion version;
  void* manager_ctx;
  void (*deleter)(struct DLManagedTensorVersioned* self);
  uint64_t flags;
  DLTensor dl_tensor;
} DLManagedTensorVersioned;

#ifdef __cplusplus
}  // extern "C"
#endif

#endif  // PONDER_THIRD_PARTY_DLPACK_H_
