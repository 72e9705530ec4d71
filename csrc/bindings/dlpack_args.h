// Borrowing tensors through DLPack for the data-plane bindings. Any object with __dlpack__
// (torch tensors, numpy arrays, ...) is borrowed for the duration of the call, zero-copy: its
// capsule is kept alive in `keep` and never renamed, so the producer's capsule destructor
// releases it afterwards. CUDA tensors are exported for `stream` (an integer cudaStream_t;
// 0 = the legacy default stream), so that the producer orders its pending work before ours.
// Must be called with the GIL held; errors are ValueErrors naming the argument.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

#include "common/tensor_view.h"

namespace ponder::bindings {

namespace py = pybind11;

// Which kind of tensor an argument must be (float32/float16/bfloat16 data or int32/int64 indices).
enum class Want { Data, Index };

constexpr const char* kCacheLayout = "[num_blocks, block_size, num_kv_heads, head_dim]";

// A view of `obj`, which must have `ndim` dimensions (`layout` names them in messages), the
// dtype kind `want`, a CPU or CUDA device, and (if `writable`) no read-only flag.
TensorView dl_view(py::handle obj, const std::string& name, int ndim, const char* layout, Want want, bool writable,
                   int64_t stream, std::vector<py::object>& keep);

// Views of a list or tuple of writable 4-D pools (one per layer); a single tensor is refused.
std::vector<TensorView> dl_list(py::handle obj, const char* name, int64_t stream, std::vector<py::object>& keep);

}  // namespace ponder::bindings
