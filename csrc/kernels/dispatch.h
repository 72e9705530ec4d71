// The data-plane entry points the Python bindings call: for each kernel, validate the
// metadata (validate_*), refuse CUDA tensors in a build without CUDA, check index values
// when asked (check_*_indices; for CUDA tensors on a host copy made on `stream`, which waits
// for it), then run the CPU or the CUDA kernel by the tensors' device.
//
// Plain C++ without Python: callers may (and the bindings do) release the GIL around them.
// Errors: std::invalid_argument (bad metadata or index values; nothing was written),
// std::runtime_error (a CUDA tensor in a build without CUDA, a CUDA launch/copy failure).
// `stream` is a cudaStream_t as an integer (0 = the legacy default stream), unused on the CPU.
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/kv_kernels.h"

namespace ponder::kernels {

void run_write_kv(const TensorView& k_cache, const TensorView& v_cache, const TensorView& k_new,
                  const TensorView& v_new, const TensorView& slot_mapping, intptr_t stream, bool check_indices);
void run_copy_blocks(const std::vector<TensorView>& k_caches, const std::vector<TensorView>& v_caches,
                     const TensorView& src, const TensorView& dst, intptr_t stream, bool check_indices);
void run_gather_kv(const TensorView& k_cache, const TensorView& v_cache, const TensorView& block_tables,
                   const TensorView& lengths, const TensorView& out_k, const TensorView& out_v, intptr_t stream,
                   bool check_indices);
void run_paged_decode_attention(const TensorView& out, const TensorView& q, const TensorView& k_cache,
                                const TensorView& v_cache, const TensorView& block_tables, const TensorView& lengths,
                                float scale, intptr_t stream, bool check_indices);

// A host-readable view of an index tensor: the tensor itself on the CPU; for a CUDA tensor a
// copy of the memory it spans, made on `stream` (this waits for the copy).
class HostIndex {
 public:
  HostIndex(const TensorView& v, intptr_t stream);
  const TensorView& view() const { return view_; }

 private:
  TensorView view_;
  std::vector<int64_t> buf_;
};

}  // namespace ponder::kernels
