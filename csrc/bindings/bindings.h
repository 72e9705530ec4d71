// The components' binding functions, called by module.cpp in this order.
#pragma once

#include <pybind11/pybind11.h>

namespace ponder::bindings {

void bind_tree(pybind11::module_& m);     // tree.cpp: Forest and the node status constants
void bind_kv(pybind11::module_& m);       // kv.cpp: BlockPool, PrefixIndex, KVCacheManager, KVCacheFull
void bind_kernels(pybind11::module_& m);  // kernels.cpp: write_kv, copy_blocks, gather_kv, paged_decode_attention

}  // namespace ponder::bindings
