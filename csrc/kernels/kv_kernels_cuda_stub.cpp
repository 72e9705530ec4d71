// Stand-ins for the CUDA entry points of kv_kernels.h in a build without CUDA: each one throws.
#include <stdexcept>
#include <string>

#include "kernels/kv_kernels.h"

namespace ponder::kernels {
namespace {

[[noreturn]] void no_cuda(const char* what) {
  throw std::runtime_error(std::string("ponder was built without CUDA (no CUDA compiler was found, or PONDER_CUDA=OFF): ") +
                           what + " cannot run on CUDA tensors; pass CPU tensors, or reinstall ponder with "
                           "PONDER_CUDA=ON on a machine with nvcc");
}

}  // namespace

void write_kv_cuda(const TensorView&, const TensorView&, const TensorView&, const TensorView&, const TensorView&,
                   intptr_t) {
  no_cuda("write_kv");
}

void copy_blocks_cuda(const std::vector<TensorView>&, const std::vector<TensorView>&, const TensorView&,
                      const TensorView&, intptr_t) {
  no_cuda("copy_blocks");
}

void gather_kv_cuda(const TensorView&, const TensorView&, const TensorView&, const TensorView&, const TensorView&,
                    const TensorView&, intptr_t) {
  no_cuda("gather_kv");
}

void paged_decode_attention_cuda(const TensorView&, const TensorView&, const TensorView&, const TensorView&,
                                 const TensorView&, const TensorView&, float, intptr_t) {
  no_cuda("paged_decode_attention");
}

void copy_device_to_host(void*, const void*, size_t, int, intptr_t) { no_cuda("reading CUDA index tensors"); }

}  // namespace ponder::kernels
