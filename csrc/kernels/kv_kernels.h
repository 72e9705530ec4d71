// Paged KV-cache data plane: scatter new K/V into the block pool, copy blocks (copy-on-write),
// gather a sequence's pages into a dense tensor, and single-token (decode) attention over pages.
//
// Plain C++: kernels take `TensorView`s (pointer, dtype, shape, strides in elements, device);
// no Python, no torch. CPU versions live in kv_kernels.cpp (OpenMP), CUDA versions in
// kv_kernels.cu (or kv_kernels_cuda_stub.cpp in a build without CUDA, whose entry points throw
// std::runtime_error).
//
// Layout of one layer's pool: K and V each [num_blocks, block_size, num_kv_heads, head_dim],
// contiguous. Token slot s lives at block s / block_size, offset s % block_size.
// Data dtypes: float32, float16, bfloat16 (all data tensors of a call share one dtype and one
// device). Index tensors: int32 or int64, any stride.
//
// Checks. Every entry point first runs the matching `validate_*` function (shapes, dtypes,
// devices, contiguity; throws std::invalid_argument naming the argument, never touches data).
// Index *values* are checked by the `check_*_indices` functions, which read host memory: the
// entry points of kernels/dispatch.h run them (on a host copy for CUDA tensors) unless asked
// not to. The kernels themselves never read or write out of bounds whatever the index values:
// a slot outside the pool is skipped, a block id outside the pool reads as an empty (absent)
// token, a negative length counts as 0 and a length above the table's capacity (or above L) is
// clamped.
//
// Duplicates are *undefined* unless checked: two tokens with one slot in write_kv, a block
// named twice in copy_blocks' dst, or a block that is both a source and a destination. On
// CUDA (and on the CPU once a call is large enough to run multithreaded) which write lands,
// or whether a copy reads the old or the new block, is unspecified. The checks reject all
// three; callers that pass check_indices=false must guarantee them (the block manager does).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "common/half.h"
#include "common/tensor_view.h"

namespace ponder::kernels {

// TensorView and its types, and the fp16/bf16 conversions, live in common/.
using ponder::DeviceType;
using ponder::element_size;
using ponder::is_floating;
using ponder::is_index;
using ponder::kMaxDims;
using ponder::scalar_type_name;
using ponder::ScalarType;
using ponder::TensorView;
using ponder::bf16_bits_to_float;
using ponder::float_to_bf16_bits;
using ponder::float_to_half_bits;
using ponder::half_bits_to_float;

// ---------------------------------------------------------------- checks
// Metadata only (shape, dtype, device, contiguity); throw std::invalid_argument.
void validate_write_kv(const TensorView& k_cache, const TensorView& v_cache, const TensorView& k_new,
                       const TensorView& v_new, const TensorView& slot_mapping);
void validate_copy_blocks(const std::vector<TensorView>& k_caches, const std::vector<TensorView>& v_caches,
                          const TensorView& src, const TensorView& dst);
void validate_gather_kv(const TensorView& k_cache, const TensorView& v_cache, const TensorView& block_tables,
                        const TensorView& lengths, const TensorView& out_k, const TensorView& out_v);
void validate_paged_decode_attention(const TensorView& out, const TensorView& q, const TensorView& k_cache,
                                     const TensorView& v_cache, const TensorView& block_tables,
                                     const TensorView& lengths, float scale);

// Index values; the index views must be host-readable (CPU). Throw std::invalid_argument.
// slot_mapping[t] < num_blocks * block_size (negative = padding).
void check_slot_indices(const TensorView& k_cache, const TensorView& slot_mapping);
// src[i], dst[i] in [0, num_blocks); dst entries distinct; no block both a source and a destination.
void check_copy_indices(int64_t num_blocks, const TensorView& src, const TensorView& dst);
// 0 <= lengths[b] <= min(max_blocks * block_size, max_len) (max_len < 0: no such bound), and
// block_tables[b, j] in [0, num_blocks) for every j < ceil(lengths[b] / block_size) (entries
// past a sequence's length are never read, so they may hold anything, e.g. -1).
void check_block_table_indices(const TensorView& k_cache, const TensorView& block_tables,
                               const TensorView& lengths, int64_t max_len);

// ---------------------------------------------------------------- CPU kernels
// k_new / v_new [T, Hkv, D], any strides; slot_mapping [T] (negative = skip).
void write_kv(const TensorView& k_cache, const TensorView& v_cache, const TensorView& k_new,
              const TensorView& v_new, const TensorView& slot_mapping);
// For every layer l and pair i: k_caches[l][dst[i]] = k_caches[l][src[i]] (and V).
void copy_blocks(const std::vector<TensorView>& k_caches, const std::vector<TensorView>& v_caches,
                 const TensorView& src, const TensorView& dst);
// out[b, t] = cache[block_tables[b, t / bs], t % bs] for t < lengths[b], 0 after.
void gather_kv(const TensorView& k_cache, const TensorView& v_cache, const TensorView& block_tables,
               const TensorView& lengths, const TensorView& out_k, const TensorView& out_v);
// out [B, Hq, D] (contiguous) = softmax(scale * q K^T) V over each sequence's lengths[b] tokens.
void paged_decode_attention(const TensorView& out, const TensorView& q, const TensorView& k_cache,
                            const TensorView& v_cache, const TensorView& block_tables,
                            const TensorView& lengths, float scale);

// ---------------------------------------------------------------- CUDA kernels
// Same contracts on CUDA tensors, enqueued on `stream` (a cudaStream_t as an integer; 0 = the
// legacy default stream) of the tensors' device. They return after the launch; errors of the
// launch throw std::runtime_error. In a build without CUDA they all throw std::runtime_error.
void write_kv_cuda(const TensorView& k_cache, const TensorView& v_cache, const TensorView& k_new,
                   const TensorView& v_new, const TensorView& slot_mapping, intptr_t stream);
void copy_blocks_cuda(const std::vector<TensorView>& k_caches, const std::vector<TensorView>& v_caches,
                      const TensorView& src, const TensorView& dst, intptr_t stream);
void gather_kv_cuda(const TensorView& k_cache, const TensorView& v_cache, const TensorView& block_tables,
                    const TensorView& lengths, const TensorView& out_k, const TensorView& out_v,
                    intptr_t stream);
void paged_decode_attention_cuda(const TensorView& out, const TensorView& q, const TensorView& k_cache,
                                 const TensorView& v_cache, const TensorView& block_tables,
                                 const TensorView& lengths, float scale, intptr_t stream);
// Copies `bytes` bytes of device memory of device `device_id` to host memory, ordered on
// `stream`, and waits for it (used to check index values of CUDA tensors).
void copy_device_to_host(void* dst, const void* src, size_t bytes, int device_id, intptr_t stream);

}  // namespace ponder::kernels
