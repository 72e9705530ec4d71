// ponder._core: the only file that knows pybind11. It marshals arguments (numpy buffers ->
// NumView without copying, std::vector results -> numpy arrays without copying) and leaves
// every check to the core, whose C++ exceptions pybind11 turns into Python ones:
//   std::invalid_argument -> ValueError, std::out_of_range -> IndexError,
//   std::overflow_error -> OverflowError.
// Forest calls keep the GIL: they are short, and the GIL is what serializes concurrent use
// of one Forest from several Python threads.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "common/num_view.h"
#include "cuda/runtime.h"
#include "kernels/kv_kernels.h"
#include "kv/kv_manager.h"
#include "tree/forest.h"
// DLPack ABI (tensor exchange with torch/numpy); third_party/ is not on the include path of _core.
#include "../third_party/dlpack/dlpack.h"

namespace py = pybind11;
using ponder::DType;
using ponder::NumView;
using ponder::tree::Forest;

namespace {

#ifndef PONDER_VERSION
#define PONDER_VERSION "0.0.0"
#endif
#ifndef PONDER_WITH_CUDA
#define PONDER_WITH_CUDA 0
#endif
#ifndef PONDER_CUDA_ARCHS
#define PONDER_CUDA_ARCHS ""
#endif
#ifndef PONDER_CUDA_VERSION
#define PONDER_CUDA_VERSION ""
#endif
#ifndef PONDER_SANITIZERS
#define PONDER_SANITIZERS ""
#endif
#ifndef PONDER_BUILD_TYPE
#define PONDER_BUILD_TYPE ""
#endif

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
class Args {
 public:
  NumView view(py::handle obj, const char* name) {
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
  // A Python scalar checked like a one-element array.
  int64_t scalar(py::handle obj, const char* name, int64_t lo, int64_t hi) {
    py::list one;
    one.append(obj);
    return ponder::to_ints(view(one, name), name, lo, hi)[0];
  }

 private:
  std::vector<py::array> keep_;
};

template <typename T>
py::array to_numpy(std::vector<T>&& v, const char* dtype = nullptr) {
  auto* heap = new std::vector<T>(std::move(v));
  py::capsule owner(heap, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  const py::dtype dt = dtype ? py::dtype(dtype) : py::dtype::of<T>();
  return py::array(dt, {static_cast<py::ssize_t>(heap->size())}, {static_cast<py::ssize_t>(sizeof(T))},
                   heap->data(), owner);
}

py::tuple ragged_to_numpy(ponder::tree::Ragged&& r) {
  return py::make_tuple(to_numpy(std::move(r.tokens)), to_numpy(std::move(r.offsets)));
}

py::list split_list(const std::string& joined) {
  py::list out;
  size_t start = 0;
  while (start < joined.size()) {
    size_t end = joined.find(',', start);
    if (end == std::string::npos) end = joined.size();
    if (end > start) out.append(joined.substr(start, end - start));
    start = end + 1;
  }
  return out;
}

py::dict build_info() {
  py::dict d;
  d["version"] = PONDER_VERSION;
  d["cuda"] = static_cast<bool>(PONDER_WITH_CUDA);
  d["cuda_architectures"] = split_list(PONDER_CUDA_ARCHS);
  d["cuda_version"] = std::string(PONDER_CUDA_VERSION);
#ifdef _OPENMP
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
  d["sanitizers"] = split_list(PONDER_SANITIZERS);
  d["build_type"] = std::string(PONDER_BUILD_TYPE);
#if defined(__clang__)
  d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  d["compiler"] = std::string("gcc ") + __VERSION__;
#else
  d["compiler"] = std::string("unknown");
#endif
  d["node_page_size"] = Forest::kPageSize;
  return d;
}

// A `how`-style option: strings pass through; anything else becomes its repr so the core
// rejects it with the list of valid choices (ValueError, like the reference).
std::string option(py::handle obj) {
  return py::isinstance<py::str>(obj) ? obj.cast<std::string>() : py::repr(obj).cast<std::string>();
}

constexpr int64_t kI64Max = INT64_MAX;
constexpr int64_t kI32Max = INT32_MAX;

// ============================================================================ kv (control plane)
// The paged KV cache's bookkeeping (csrc/kv/): block pool, prefix index, sequences. Calls keep
// the GIL (they are short; it serializes concurrent use from several Python threads). Scalars
// are checked in parameter order here; arrays are parsed and checked by the core.
namespace kvc = ponder::kv;

py::array int32_matrix(std::vector<int32_t>&& v, int64_t rows, int64_t cols) {
  return to_numpy(std::move(v)).attr("reshape")(py::make_tuple(rows, cols));
}

void bind_kv(py::module_& m) {
  py::register_exception<kvc::KVCacheFull>(m, "KVCacheFull", PyExc_RuntimeError);

  py::class_<kvc::BlockPool>(m, "BlockPool", R"doc(
Reference counts and a LIFO free list of num_blocks KV blocks of block_size tokens (C++).
Same API and results as ponder.reference.BlockPool, whose docstrings define every operation.
A new pool hands out blocks 0, 1, 2, ...; a freed block is the next one handed out.)doc")
      .def(py::init([](py::handle num_blocks, py::handle block_size) {
             Args a;
             const int64_t nb = a.scalar(num_blocks, "num_blocks", 1, kI32Max);
             const int64_t bs = a.scalar(block_size, "block_size", 1, kI32Max);
             return std::make_unique<kvc::BlockPool>(nb, bs);
           }),
           py::arg("num_blocks"), py::arg("block_size"))
      .def(
          "allocate",
          [](kvc::BlockPool& p, py::handle n) {
            Args a;
            return to_numpy(p.allocate(a.scalar(n, "n", 0, kI32Max)));
          },
          py::arg("n"), "int32 [n]: blocks off the free list, reference count 1 each; KVCacheFull if n > num_free.")
      .def(
          "incref",
          [](kvc::BlockPool& p, py::handle ids) {
            Args a;
            p.incref(a.view(ids, "block_ids"));
          },
          py::arg("block_ids"), "block_ids int [n] (allocated blocks): +1 per occurrence.")
      .def(
          "decref",
          [](kvc::BlockPool& p, py::handle ids) {
            Args a;
            p.decref(a.view(ids, "block_ids"));
          },
          py::arg("block_ids"),
          "block_ids int [n]: -1 per occurrence, in order; blocks reaching 0 return to the free list. "
          "ValueError (nothing changed) if any count would drop below 0.")
      .def(
          "refcounts",
          [](const kvc::BlockPool& p, py::handle ids) {
            Args a;
            return to_numpy(p.refcounts(a.view(ids, "block_ids")));
          },
          py::arg("block_ids"), "int32 [n]: the reference count of each block.")
      .def_property_readonly("num_blocks", &kvc::BlockPool::num_blocks)
      .def_property_readonly("block_size", &kvc::BlockPool::block_size)
      .def_property_readonly("num_free", &kvc::BlockPool::num_free);

  // PrefixIndex.match and .insert run once per request of a prefix cache, where Args (array
  // conversion, a dtype attribute lookup: ~0.4 us a view) would cost more than the index work:
  // a 1-D native int32 ndarray is viewed directly; anything else goes through Args as usual.
  static constexpr auto int32_view = [](py::handle obj, Args& a, const char* name) -> NumView {
    const auto& api = py::detail::npy_api::get();
    if (api.PyArray_Check_(obj.ptr())) {
      const auto* arr = py::detail::array_proxy(obj.ptr());
      const auto* d = py::detail::array_descriptor_proxy(arr->descr);
      const char swapped = __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__ ? '>' : '<';
      if (arr->nd == 1 && d->type_num == py::detail::npy_api::NPY_INT32_ && d->byteorder != swapped)
        return NumView(arr->data, arr->dimensions[0], arr->strides[0], DType::I32, 1);
    }
    return a.view(obj, name);
  };
  py::class_<kvc::PrefixIndex>(m, "PrefixIndex", R"doc(
A radix tree of full KV blocks (block_size tokens each) named by block id, with lock counts and
LRU eviction of unlocked leaves (C++). Same API and results as ponder.reference.PrefixIndex.)doc")
      .def(py::init([](py::handle block_size) {
             Args a;
             return std::make_unique<kvc::PrefixIndex>(a.scalar(block_size, "block_size", 1, kI32Max));
           }),
           py::arg("block_size"))
      .def(
          "match",
          [](kvc::PrefixIndex& x, py::handle tokens) {
            Args a;
            kvc::PrefixIndex::Match r = x.match(int32_view(tokens, a, "tokens"));
            // A copy into a fresh array: cheaper than to_numpy's capsule for these short results.
            py::array_t<int32_t> blocks(static_cast<py::ssize_t>(r.blocks.size()));
            if (!r.blocks.empty()) std::memcpy(blocks.mutable_data(), r.blocks.data(), sizeof(int32_t) * r.blocks.size());
            return py::make_tuple(r.tokens, std::move(blocks));
          },
          py::arg("tokens"),
          "tokens int [n] -> (matched_tokens: int, block_ids int32 [k]), matched_tokens = k * block_size; "
          "stamps the matched nodes as used now.")
      .def(
          "insert",
          [](kvc::PrefixIndex& x, py::handle tokens, py::handle ids) {
            Args a;
            const NumView t = int32_view(tokens, a, "tokens");
            return x.insert(t, int32_view(ids, a, "block_ids"));
          },
          py::arg("tokens"), py::arg("block_ids"),
          "tokens int [n], block_ids int [n // block_size] -> number of new nodes. Existing nodes are kept "
          "(their given ids ignored); new ids must not be in the index.")
      .def(
          "lock",
          [](kvc::PrefixIndex& x, py::handle ids) {
            Args a;
            x.lock(a.view(ids, "block_ids"));
          },
          py::arg("block_ids"), "block_ids int [n] (in the index): lock count +1 per occurrence.")
      .def(
          "unlock",
          [](kvc::PrefixIndex& x, py::handle ids) {
            Args a;
            x.unlock(a.view(ids, "block_ids"));
          },
          py::arg("block_ids"), "block_ids int [n] (in the index): lock count -1 per occurrence (never below 0).")
      .def(
          "lock_counts",
          [](const kvc::PrefixIndex& x, py::handle ids) {
            Args a;
            return to_numpy(x.lock_counts(a.view(ids, "block_ids")));
          },
          py::arg("block_ids"), "int32 [n]: the lock count of each node.")
      .def(
          "evict",
          [](kvc::PrefixIndex& x, py::handle n) {
            Args a;
            return to_numpy(x.evict(a.scalar(n, "n", 0, kI64Max)));
          },
          py::arg("n"), "int32 [<= n]: removes up to n LRU leaves with lock count 0 (ties: lower id), in order.")
      .def(
          "contains",
          [](const kvc::PrefixIndex& x, py::handle block_id) {
            Args a;
            return x.contains(a.scalar(block_id, "block_id", INT64_MIN, kI64Max));
          },
          py::arg("block_id"))
      .def_property_readonly("num_nodes", &kvc::PrefixIndex::num_nodes)
      .def_property_readonly("num_evictable", &kvc::PrefixIndex::num_evictable,
                             "Nodes whose whole subtree has lock count 0.")
      .def_property_readonly("block_size", &kvc::PrefixIndex::block_size);

  py::class_<kvc::KVCacheManager>(m, "KVCacheManager", R"doc(
Sequences (block tables) over one pool of num_blocks KV blocks of block_size tokens, with
prefix caching, fork with shared blocks, copy-on-write of shared partial blocks and LRU
eviction of unused cached blocks (C++). Same API and results as ponder.reference.KVCacheManager,
whose docstrings define every operation.)doc")
      .def(py::init([](py::handle num_blocks, py::handle block_size) {
             Args a;
             const int64_t nb = a.scalar(num_blocks, "num_blocks", 1, kI32Max);
             const int64_t bs = a.scalar(block_size, "block_size", 1, kI32Max);
             return std::make_unique<kvc::KVCacheManager>(nb, bs);
           }),
           py::arg("num_blocks"), py::arg("block_size"))
      .def(
          "new_sequence",
          [](kvc::KVCacheManager& k, py::handle tokens) {
            Args a;
            const auto r = k.new_sequence(a.view(tokens, "tokens"));
            return py::make_tuple(r.first, r.second);
          },
          py::arg("tokens"),
          "tokens int [n] -> (seq_id: int, cached_tokens: int). Reuses the longest cached prefix, at most "
          "n - 1 tokens in whole blocks; the sequence's length is cached_tokens: append the rest.")
      .def(
          "fork",
          [](kvc::KVCacheManager& k, py::handle seq_id, py::handle count) {
            Args a;
            const int64_t s = a.scalar(seq_id, "seq_id", INT64_MIN, kI64Max);
            const int64_t n = a.scalar(count, "k", 0, kI32Max);
            return to_numpy(k.fork(s, n));
          },
          py::arg("seq_id"), py::arg("k"),
          "int32 [k]: new sequences sharing seq_id's blocks (a partial last block too) and length.")
      .def(
          "append",
          [](kvc::KVCacheManager& k, py::handle seq_ids, py::handle n_tokens, py::handle token_ids) {
            Args a;
            const NumView s = a.view(seq_ids, "seq_ids");
            const NumView n = a.view(n_tokens, "n_tokens");
            const NumView t = a.view(token_ids, "token_ids");
            kvc::KVCacheManager::Append r = k.append(s, n, t);
            return py::make_tuple(to_numpy(std::move(r.slots)), to_numpy(std::move(r.copy_src)),
                                  to_numpy(std::move(r.copy_dst)));
          },
          py::arg("seq_ids"), py::arg("n_tokens"), py::arg("token_ids"),
          "seq_ids int [B] (live, unique), n_tokens int [B] (>= 0), token_ids int [sum(n_tokens)] -> "
          "(slot_mapping int64 [sum(n_tokens)], copy_src int32 [m], copy_dst int32 [m]): perform the block "
          "copies src -> dst first, then write token j's K/V at slot_mapping[j] = block * block_size + offset. "
          "KVCacheFull (nothing changed) when free + evictable blocks do not suffice.")
      .def(
          "block_table",
          [](const kvc::KVCacheManager& k, py::handle seq_ids) {
            Args a;
            kvc::KVCacheManager::Table t = k.block_table(a.view(seq_ids, "seq_ids"));
            return py::make_tuple(int32_matrix(std::move(t.blocks), t.rows, t.cols), to_numpy(std::move(t.lengths)));
          },
          py::arg("seq_ids"),
          "seq_ids int [B] -> (block_tables int32 [B, max_blocks] padded with -1, lengths int64 [B]).")
      .def(
          "free",
          [](kvc::KVCacheManager& k, py::handle seq_ids) {
            Args a;
            k.free(a.view(seq_ids, "seq_ids"));
          },
          py::arg("seq_ids"), "seq_ids int [n] (live, unique): drop the sequences; cached blocks stay evictable.")
      .def(
          "seq_len",
          [](const kvc::KVCacheManager& k, py::handle seq_ids) {
            Args a;
            return to_numpy(k.seq_len(a.view(seq_ids, "seq_ids")));
          },
          py::arg("seq_ids"), "int64 [n]: the length of each sequence.")
      .def(
          "evict",
          [](kvc::KVCacheManager& k, py::handle n) {
            Args a;
            return to_numpy(k.evict(a.scalar(n, "n", 0, kI64Max)));
          },
          py::arg("n"), "int32 [<= n]: evicts up to n unused cached blocks (LRU leaves first) to the free list.")
      .def(
          "refcounts",
          [](const kvc::KVCacheManager& k, py::handle ids) {
            Args a;
            return to_numpy(k.refcounts(a.view(ids, "block_ids")));
          },
          py::arg("block_ids"), "int32 [n]: pool reference counts (holding sequences + 1 if cached).")
      .def_property_readonly("num_sequences", &kvc::KVCacheManager::num_sequences)
      .def_property_readonly("num_blocks", &kvc::KVCacheManager::num_blocks)
      .def_property_readonly("block_size", &kvc::KVCacheManager::block_size)
      .def(
          "stats",
          [](const kvc::KVCacheManager& k) {
            const kvc::KVStats s = k.stats();
            py::dict d;
            d["tokens_requested"] = s.tokens_requested;
            d["tokens_from_cache"] = s.tokens_from_cache;
            d["tokens_appended"] = s.tokens_appended;
            d["blocks_total"] = s.blocks_total;
            d["blocks_free"] = s.blocks_free;
            d["blocks_in_use"] = s.blocks_in_use;
            d["blocks_cached"] = s.blocks_cached;
            d["blocks_evictable"] = s.blocks_evictable;
            d["cow_copies"] = s.cow_copies;
            d["evictions"] = s.evictions;
            return d;
          },
          "dict of ints: tokens_requested, tokens_from_cache, tokens_appended, blocks_total, blocks_free, "
          "blocks_in_use, blocks_cached, blocks_evictable, cow_copies, evictions.");
}

// ============================================================================ kernels (data plane)
// Tensors arrive through DLPack: any object with __dlpack__ (torch tensors, numpy arrays, ...)
// is borrowed for the duration of the call, zero-copy. Its capsule is kept alive and never
// renamed, so the producer's capsule destructor releases it afterwards. Everything is checked
// while holding the GIL (std::invalid_argument / py::value_error -> ValueError naming the
// argument); then the GIL is released and the kernel runs. CUDA tensors: the work is enqueued
// on `stream` (an integer cudaStream_t; 0 = the legacy default stream), which is also handed
// to __dlpack__ so that the producer orders its pending work before ours.
namespace kern = ponder::kernels;

std::string dl_dtype_name(const DLDataType& t) {
  std::string base;
  switch (t.code) {
    case kDLInt: base = "int"; break;
    case kDLUInt: base = "uint"; break;
    case kDLFloat: base = "float"; break;
    case kDLBfloat: base = "bfloat"; break;
    case kDLComplex: base = "complex"; break;
    case kDLBool: return t.lanes == 1 ? "bool" : "bool x" + std::to_string(t.lanes);
    default: base = "dlpack-type-" + std::to_string(t.code) + "-bits-"; break;
  }
  std::string s = base + std::to_string(t.bits);
  if (t.lanes != 1) s += " x" + std::to_string(t.lanes);
  return s;
}

std::string dl_shape_str(const DLTensor& t) {
  std::string s = "[";
  for (int i = 0; i < t.ndim; ++i) s += (i ? ", " : "") + std::to_string(t.shape[i]);
  return s + "]";
}

// Which kind of tensor an argument must be, for the messages.
enum class Want { Data, Index };

// Borrows `obj` through DLPack; `keep` holds its capsule for the call.
kern::TensorView dl_view(py::handle obj, const std::string& name, int ndim, const char* layout, Want want,
                         bool writable, int64_t stream, std::vector<py::object>& keep) {
  if (obj.is_none()) throw py::value_error(name + " must be a tensor " + layout + ", got None");
  if (!py::hasattr(obj, "__dlpack__"))
    throw py::value_error(name + " must be a tensor or array that supports DLPack (torch.Tensor, numpy.ndarray), got " +
                          py::str(py::type::handle_of(obj).attr("__name__")).cast<std::string>());
  if (py::hasattr(obj, "requires_grad") && py::bool_(obj.attr("requires_grad")))
    throw py::value_error(name + " requires grad: pass " + name + ".detach() (these kernels are not differentiable)");
  int dev_type = kDLCPU;
  if (py::hasattr(obj, "__dlpack_device__")) {
    try {
      dev_type = py::tuple(obj.attr("__dlpack_device__")())[0].cast<int>();
    } catch (py::error_already_set& e) {
      throw py::value_error(name + ".__dlpack_device__() failed: " + e.what());
    } catch (py::cast_error&) {
      throw py::value_error(name + ".__dlpack_device__() did not return a (device_type, device_id) tuple");
    }
  }
  py::dict kwargs;
  // DLPack reserves 0 for CUDA; 1 names the legacy default stream.
  if (dev_type == kDLCUDA || dev_type == kDLCUDAManaged) kwargs["stream"] = stream == 0 ? int64_t(1) : stream;
  py::object cap;
  try {
    py::dict versioned = py::reinterpret_steal<py::dict>(PyDict_Copy(kwargs.ptr()));  // not an alias
    versioned["max_version"] = py::make_tuple(DLPACK_MAJOR_VERSION, 0);
    cap = obj.attr("__dlpack__")(**versioned);
  } catch (py::error_already_set& e) {
    if (!e.matches(PyExc_TypeError)) throw py::value_error(name + " cannot be exported through DLPack: " + e.what());
    try {  // a producer older than DLPack 1.0 does not know max_version
      cap = obj.attr("__dlpack__")(**kwargs);
    } catch (py::error_already_set& e2) {
      throw py::value_error(name + " cannot be exported through DLPack: " + e2.what());
    }
  }
  PyObject* c = cap.ptr();
  if (!PyCapsule_CheckExact(c)) throw py::value_error(name + ".__dlpack__() did not return a PyCapsule");
  const char* cname = PyCapsule_GetName(c);
  DLTensor* t = nullptr;
  bool read_only = false;
  if (cname && std::strcmp(cname, "dltensor_versioned") == 0) {
    auto* mt = static_cast<DLManagedTensorVersioned*>(PyCapsule_GetPointer(c, cname));
    if (!mt) throw py::error_already_set();
    if (mt->version.major != DLPACK_MAJOR_VERSION)
      throw py::value_error(name + ": DLPack version " + std::to_string(mt->version.major) + "." +
                            std::to_string(mt->version.minor) + " is not supported (this build reads 1.x)");
    read_only = (mt->flags & DLPACK_FLAG_BITMASK_READ_ONLY) != 0;
    t = &mt->dl_tensor;
  } else if (cname && std::strcmp(cname, "dltensor") == 0) {
    auto* mt = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(c, cname));
    if (!mt) throw py::error_already_set();
    t = &mt->dl_tensor;
  } else {
    throw py::value_error(name + ".__dlpack__() returned a capsule named '" + (cname ? cname : "") +
                          "' (expected 'dltensor' or 'dltensor_versioned')");
  }
  keep.push_back(cap);

  if (t->ndim != ndim)
    throw py::value_error(name + " must be a " + std::to_string(ndim) + "-D tensor " + layout + ", got " +
                          std::to_string(t->ndim) + "-D with shape " + dl_shape_str(*t));
  kern::TensorView v;
  const DLDataType dt = t->dtype;
  bool ok_type = dt.lanes == 1;
  if (ok_type && dt.code == kDLFloat && dt.bits == 32) v.dtype = kern::ScalarType::Float32;
  else if (ok_type && dt.code == kDLFloat && dt.bits == 16) v.dtype = kern::ScalarType::Float16;
  else if (ok_type && dt.code == kDLBfloat && dt.bits == 16) v.dtype = kern::ScalarType::BFloat16;
  else if (ok_type && dt.code == kDLInt && dt.bits == 32) v.dtype = kern::ScalarType::Int32;
  else if (ok_type && dt.code == kDLInt && dt.bits == 64) v.dtype = kern::ScalarType::Int64;
  else ok_type = false;
  const bool want_index = want == Want::Index;
  if (!ok_type || kern::is_index(v.dtype) != want_index)
    throw py::value_error(name + " has dtype " + dl_dtype_name(dt) + "; it must be " +
                          (want_index ? "int32 or int64" : "float32, float16 or bfloat16"));
  switch (t->device.device_type) {
    case kDLCPU:
    case kDLCUDAHost: v.device = kern::DeviceType::CPU; v.device_id = 0; break;
    case kDLCUDA: v.device = kern::DeviceType::CUDA; v.device_id = t->device.device_id; break;
    default:
      throw py::value_error(name + " is on an unsupported device (DLPack device type " +
                            std::to_string(static_cast<int>(t->device.device_type)) + "); use a CPU or CUDA tensor");
  }
  if (writable && read_only) throw py::value_error(name + " is read-only; the kernel writes into it");
  v.ndim = ndim;
  int64_t expected = 1;
  for (int i = ndim - 1; i >= 0; --i) {
    if (t->shape[i] < 0) throw py::value_error(name + " has a negative extent");
    v.shape[i] = t->shape[i];
    v.strides[i] = t->strides ? t->strides[i] : expected;
    expected *= t->shape[i];
  }
  v.data = static_cast<char*>(t->data) + t->byte_offset;
  return v;
}

// A host-readable view of an index tensor: the tensor itself on the CPU, a copy of the memory
// it spans for a CUDA tensor (made on `stream`, with the GIL released while waiting).
class HostIndex {
 public:
  HostIndex(const kern::TensorView& v, int64_t stream) : view_(v) {
    if (v.device == kern::DeviceType::CPU || v.numel() == 0) return;
    const int64_t es = static_cast<int64_t>(kern::element_size(v.dtype));
    int64_t lo = 0, hi = 0;  // element offsets spanned
    for (int i = 0; i < v.ndim; ++i) {
      const int64_t reach = (v.shape[i] - 1) * v.strides[i];
      (reach < 0 ? lo : hi) += reach;
    }
    const size_t bytes = static_cast<size_t>((hi - lo + 1) * es);
    buf_.resize((bytes + 7) / 8);
    {
      py::gil_scoped_release nogil;
      kern::copy_device_to_host(buf_.data(), static_cast<const char*>(v.data) + lo * es, bytes, v.device_id,
                                static_cast<intptr_t>(stream));
    }
    view_.data = reinterpret_cast<char*>(buf_.data()) - lo * es;
    view_.device = kern::DeviceType::CPU;
    view_.device_id = 0;
  }
  const kern::TensorView& view() const { return view_; }

 private:
  kern::TensorView view_;
  std::vector<int64_t> buf_;
};

void require_cuda_build(const kern::TensorView& v, const char* op) {
  if (v.device == kern::DeviceType::CUDA && !PONDER_WITH_CUDA)
    throw std::runtime_error(std::string("ponder was built without CUDA (no CUDA compiler was found, or PONDER_CUDA=OFF): ") +
                             op + " got CUDA tensors; pass CPU tensors, or reinstall ponder with PONDER_CUDA=ON "
                             "on a machine with nvcc");
}

constexpr const char* kCacheLayout = "[num_blocks, block_size, num_kv_heads, head_dim]";

std::vector<kern::TensorView> dl_list(py::handle obj, const char* name, int64_t stream, std::vector<py::object>& keep) {
  if (py::hasattr(obj, "__dlpack__"))
    throw py::value_error(std::string(name) + " must be a list of tensors (one pool per layer), got a single tensor; "
                          "wrap it in a list");
  if (!py::isinstance<py::list>(obj) && !py::isinstance<py::tuple>(obj))
    throw py::value_error(std::string(name) + " must be a list or tuple of tensors (one pool per layer), got " +
                          py::str(py::type::handle_of(obj).attr("__name__")).cast<std::string>());
  std::vector<kern::TensorView> out;
  py::sequence seq = py::reinterpret_borrow<py::sequence>(obj);
  for (size_t i = 0; i < seq.size(); ++i)
    out.push_back(dl_view(seq[i], std::string(name) + "[" + std::to_string(i) + "]", 4, kCacheLayout, Want::Data,
                          true, stream, keep));
  return out;
}

void bind_kernels(py::module_& m) {
  m.def(
      "write_kv",
      [](py::handle k_cache, py::handle v_cache, py::handle k_new, py::handle v_new, py::handle slot_mapping,
         int64_t stream, bool check_indices) {
        std::vector<py::object> keep;  // declared first: outlives the GIL release below
        const auto kc = dl_view(k_cache, "k_cache", 4, kCacheLayout, Want::Data, true, stream, keep);
        const auto vc = dl_view(v_cache, "v_cache", 4, kCacheLayout, Want::Data, true, stream, keep);
        const auto kn = dl_view(k_new, "k_new", 3, "[num_tokens, num_kv_heads, head_dim]", Want::Data, false, stream, keep);
        const auto vn = dl_view(v_new, "v_new", 3, "[num_tokens, num_kv_heads, head_dim]", Want::Data, false, stream, keep);
        const auto sm = dl_view(slot_mapping, "slot_mapping", 1, "[num_tokens]", Want::Index, false, stream, keep);
        kern::validate_write_kv(kc, vc, kn, vn, sm);
        require_cuda_build(kc, "write_kv");
        if (check_indices) kern::check_slot_indices(kc, HostIndex(sm, stream).view());
        py::gil_scoped_release nogil;
        if (kc.device == kern::DeviceType::CUDA)
          kern::write_kv_cuda(kc, vc, kn, vn, sm, static_cast<intptr_t>(stream));
        else
          kern::write_kv(kc, vc, kn, vn, sm);
      },
      py::arg("k_cache"), py::arg("v_cache"), py::arg("k_new"), py::arg("v_new"), py::arg("slot_mapping"),
      py::kw_only(), py::arg("stream") = 0, py::arg("check_indices") = true,
      R"doc(Scatter new tokens' K/V into a layer's paged pool (in place).

k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim], contiguous, float32/float16/bfloat16.
k_new, v_new: [T, num_kv_heads, head_dim], same dtype, any strides.
slot_mapping: int32/int64 [T]; token t goes to slot s = block * block_size + offset; s < 0 skips it.
stream: cudaStream_t as an int for CUDA tensors (0 = legacy default stream); ignored on the CPU.
check_indices: check slot values first (slots < num_blocks * block_size, no slot twice); for CUDA
tensors this copies slot_mapping to the host and waits. Unchecked bad slots are skipped.)doc");

  m.def(
      "copy_blocks",
      [](py::handle k_caches, py::handle v_caches, py::handle src, py::handle dst, int64_t stream,
         bool check_indices) {
        std::vector<py::object> keep;
        const auto kcs = dl_list(k_caches, "k_caches", stream, keep);
        const auto vcs = dl_list(v_caches, "v_caches", stream, keep);
        const auto s = dl_view(src, "src", 1, "[num_pairs]", Want::Index, false, stream, keep);
        const auto d = dl_view(dst, "dst", 1, "[num_pairs]", Want::Index, false, stream, keep);
        kern::validate_copy_blocks(kcs, vcs, s, d);
        require_cuda_build(s, "copy_blocks");
        if (check_indices && !kcs.empty())
          kern::check_copy_indices(kcs[0].shape[0], HostIndex(s, stream).view(), HostIndex(d, stream).view());
        py::gil_scoped_release nogil;
        if (s.device == kern::DeviceType::CUDA)
          kern::copy_blocks_cuda(kcs, vcs, s, d, static_cast<intptr_t>(stream));
        else
          kern::copy_blocks(kcs, vcs, s, d);
      },
      py::arg("k_caches"), py::arg("v_caches"), py::arg("src"), py::arg("dst"), py::kw_only(), py::arg("stream") = 0,
      py::arg("check_indices") = true,
      R"doc(Copy whole blocks src[i] -> dst[i] in every layer's K and V pool (copy-on-write), in one call.

k_caches, v_caches: lists (one entry per layer) of [num_blocks, block_size, num_kv_heads, head_dim]
contiguous pools, all of one shape, dtype and device. src, dst: int32/int64 [m].
check_indices: check ids in [0, num_blocks), dst entries distinct, no block both a source and a
destination (CUDA: copies src/dst to the host and waits). Unchecked bad pairs are skipped.)doc");

  m.def(
      "gather_kv",
      [](py::handle k_cache, py::handle v_cache, py::handle block_tables, py::handle lengths, py::handle out_k,
         py::handle out_v, int64_t stream, bool check_indices) {
        std::vector<py::object> keep;
        const auto kc = dl_view(k_cache, "k_cache", 4, kCacheLayout, Want::Data, false, stream, keep);
        const auto vc = dl_view(v_cache, "v_cache", 4, kCacheLayout, Want::Data, false, stream, keep);
        const auto bt = dl_view(block_tables, "block_tables", 2, "[batch, max_blocks]", Want::Index, false, stream, keep);
        const auto ln = dl_view(lengths, "lengths", 1, "[batch]", Want::Index, false, stream, keep);
        const auto ok = dl_view(out_k, "out_k", 4, "[batch, max_len, num_kv_heads, head_dim]", Want::Data, true, stream, keep);
        const auto ov = dl_view(out_v, "out_v", 4, "[batch, max_len, num_kv_heads, head_dim]", Want::Data, true, stream, keep);
        kern::validate_gather_kv(kc, vc, bt, ln, ok, ov);
        require_cuda_build(kc, "gather_kv");
        if (check_indices)
          kern::check_block_table_indices(kc, HostIndex(bt, stream).view(), HostIndex(ln, stream).view(), ok.shape[1]);
        py::gil_scoped_release nogil;
        if (kc.device == kern::DeviceType::CUDA)
          kern::gather_kv_cuda(kc, vc, bt, ln, ok, ov, static_cast<intptr_t>(stream));
        else
          kern::gather_kv(kc, vc, bt, ln, ok, ov);
      },
      py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"), py::arg("lengths"), py::arg("out_k"),
      py::arg("out_v"), py::kw_only(), py::arg("stream") = 0, py::arg("check_indices") = true,
      R"doc(Gather each sequence's cached K/V into dense tensors.

out_k[b, t] = k_cache[block_tables[b, t // block_size], t % block_size] for t < lengths[b]; zeros after.
block_tables: int32/int64 [B, max_blocks]; lengths: int32/int64 [B];
out_k, out_v: [B, L, num_kv_heads, head_dim] contiguous, same dtype as the pool, L >= max(lengths).
check_indices: check 0 <= lengths[b] <= min(max_blocks * block_size, L) and the block ids a sequence
uses (CUDA: copies block_tables/lengths to the host and waits).)doc");

  m.def(
      "paged_decode_attention",
      [](py::handle out, py::handle q, py::handle k_cache, py::handle v_cache, py::handle block_tables,
         py::handle lengths, double scale, int64_t stream, bool check_indices) {
        std::vector<py::object> keep;
        const auto o = dl_view(out, "out", 3, "[batch, num_q_heads, head_dim]", Want::Data, true, stream, keep);
        const auto qv = dl_view(q, "q", 3, "[batch, num_q_heads, head_dim]", Want::Data, false, stream, keep);
        const auto kc = dl_view(k_cache, "k_cache", 4, kCacheLayout, Want::Data, false, stream, keep);
        const auto vc = dl_view(v_cache, "v_cache", 4, kCacheLayout, Want::Data, false, stream, keep);
        const auto bt = dl_view(block_tables, "block_tables", 2, "[batch, max_blocks]", Want::Index, false, stream, keep);
        const auto ln = dl_view(lengths, "lengths", 1, "[batch]", Want::Index, false, stream, keep);
        if (!std::isfinite(scale) || std::fabs(scale) > 3.0e38)
          throw py::value_error("scale must be a finite float32 number, got " + py::repr(py::float_(scale)).cast<std::string>());
        const float s = static_cast<float>(scale);
        kern::validate_paged_decode_attention(o, qv, kc, vc, bt, ln, s);
        require_cuda_build(kc, "paged_decode_attention");
        if (check_indices)
          kern::check_block_table_indices(kc, HostIndex(bt, stream).view(), HostIndex(ln, stream).view(), -1);
        py::gil_scoped_release nogil;
        if (kc.device == kern::DeviceType::CUDA)
          kern::paged_decode_attention_cuda(o, qv, kc, vc, bt, ln, s, static_cast<intptr_t>(stream));
        else
          kern::paged_decode_attention(o, qv, kc, vc, bt, ln, s);
      },
      py::arg("out"), py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"),
      py::arg("lengths"), py::arg("scale"), py::kw_only(), py::arg("stream") = 0, py::arg("check_indices") = true,
      R"doc(Single-token (decode) attention over a paged KV cache; writes out.

out, q: [B, num_q_heads, head_dim] (out contiguous; q any strides), same dtype as the pools.
k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]; num_q_heads % num_kv_heads == 0
(query head h reads kv head h // (num_q_heads // num_kv_heads)).
block_tables: int32/int64 [B, max_blocks]; lengths: int32/int64 [B], the cached tokens of each
sequence (including the current one); lengths[b] == 0 gives zeros.
out[b, h] = softmax(scale * q[b, h] . K^T) V, accumulated in float32 (online softmax).
check_indices: as for gather_kv (lengths[b] <= max_blocks * block_size, used block ids in range).)doc");
}

// ============================================================================ tree (search forest)
void bind_tree(py::module_& m) {
  m.attr("ACTIVE") = static_cast<int>(ponder::tree::kActive);
  m.attr("FINISHED") = static_cast<int>(ponder::tree::kFinished);
  m.attr("PRUNED") = static_cast<int>(ponder::tree::kPruned);
  m.attr("NO_ANSWER") = ponder::tree::kNoAnswer;

  m.def("build_info", &build_info,
        "What this extension was compiled with: version, cuda (bool), cuda_architectures, cuda_version, "
        "openmp, sanitizers, build_type, compiler.");
  m.def(
      "cuda_runtime_ok",
      []() {
        std::string why;
        return ponder::cuda::runtime_ok(&why);
      },
      "True when a probe CUDA kernel of this build launches and runs on device 0 now.");
  m.def(
      "cuda_status",
      []() {
        std::string why;
        py::dict d;
        const int n = ponder::cuda::device_count(&why);
        const bool ok = n > 0 && ponder::cuda::runtime_ok(&why);
        d["device_count"] = n;
        d["kernels_run"] = ok;
        d["reason"] = ok ? std::string() : why;
        return d;
      },
      "dict(device_count, kernels_run, reason): why CUDA kernels can or cannot run now.");

  py::class_<Forest>(m, "Forest", R"doc(
Search trees of many problems in one node arena (C++). Same API and results as
ponder.reference.Forest, whose docstrings define every operation; inputs are 1-D array-likes
(numpy arrays of any integer/float/bool dtype and stride are read without copying).)doc")
      .def(py::init<>())
      .def(
          "add_roots",
          [](Forest& f, py::handle problem_ids, py::handle subtree_ids, py::handle flat, py::handle offsets) {
            Args a;
            return to_numpy(f.add_roots(a.view(problem_ids, "problem_ids"), a.view(subtree_ids, "subtree_ids"),
                                        a.view(flat, "prompt_tokens_flat"), a.view(offsets, "prompt_offsets")));
          },
          py::arg("problem_ids"), py::arg("subtree_ids"), py::arg("prompt_tokens_flat"), py::arg("prompt_offsets"),
          "One root per entry. problem_ids int [n], subtree_ids int [n], prompt_tokens_flat int [total], "
          "prompt_offsets int [n + 1]. Returns int32 [n] root ids.")
      .def(
          "expand",
          [](Forest& f, py::handle parent_ids, py::handle counts) {
            Args a;
            return to_numpy(f.expand(a.view(parent_ids, "parent_ids"), a.view(counts, "counts")));
          },
          py::arg("parent_ids"), py::arg("counts"),
          "parent_ids int [n], counts int [n] -> int32 [sum(counts)] child ids, grouped by parent in input order.")
      .def(
          "set_steps",
          [](Forest& f, py::handle ids, py::handle flat, py::handle offsets, py::handle scores, py::handle finished) {
            Args a;
            f.set_steps(a.view(ids, "node_ids"), a.view(flat, "tokens_flat"), a.view(offsets, "offsets"),
                        a.view(scores, "step_scores"), a.view(finished, "finished"));
          },
          py::arg("node_ids"), py::arg("tokens_flat"), py::arg("offsets"), py::arg("step_scores"),
          py::arg("finished"),
          "node_ids int [n], tokens_flat int [total], offsets int [n + 1], step_scores float [n], "
          "finished bool [n]. Sets each step and its path aggregates.")
      .def(
          "set_answers",
          [](Forest& f, py::handle ids, py::handle answers) {
            Args a;
            f.set_answers(a.view(ids, "node_ids"), a.view(answers, "answer_ids"));
          },
          py::arg("node_ids"), py::arg("answer_ids"), "node_ids int [n], answer_ids int64 [n] (not NO_ANSWER).")
      .def(
          "prune",
          [](Forest& f, py::handle ids) {
            Args a;
            f.prune(a.view(ids, "node_ids"));
          },
          py::arg("node_ids"))
      .def(
          "release_problem",
          [](Forest& f, py::handle problem_id) {
            Args a;
            f.release_problem(a.scalar(problem_id, "problem_id", 0, kI64Max));
          },
          py::arg("problem_id"))
      .def(
          "aggregate",
          [](const Forest& f, py::handle ids, py::handle how) {
            Args a;
            return to_numpy(f.aggregate(a.view(ids, "node_ids"), option(how)));
          },
          py::arg("node_ids"), py::arg("how"), "float32 [n] path scores; how: last | min | prod | mean.")
      .def(
          "path_tokens",
          [](const Forest& f, py::handle ids) {
            Args a;
            return ragged_to_numpy(f.path_tokens(a.view(ids, "node_ids")));
          },
          py::arg("node_ids"), "(int32 [total], int64 [n + 1]): prompt + steps of each path.")
      .def(
          "step_tokens",
          [](const Forest& f, py::handle ids) {
            Args a;
            return ragged_to_numpy(f.step_tokens(a.view(ids, "node_ids")));
          },
          py::arg("node_ids"), "(int32 [total], int64 [n + 1]): each node's own tokens.")
      .def(
          "nodes",
          [](const Forest& f, py::handle ids) {
            Args a;
            ponder::tree::NodeFields n = f.nodes(a.view(ids, "node_ids"));
            py::dict d;
            d["parent"] = to_numpy(std::move(n.parent));
            d["problem"] = to_numpy(std::move(n.problem));
            d["subtree"] = to_numpy(std::move(n.subtree));
            d["depth"] = to_numpy(std::move(n.depth));
            d["num_tokens"] = to_numpy(std::move(n.num_tokens));
            d["has_step"] = to_numpy(std::move(n.has_step), "bool");
            d["score"] = to_numpy(std::move(n.score));
            d["status"] = to_numpy(std::move(n.status));
            d["answer"] = to_numpy(std::move(n.answer));
            return d;
          },
          py::arg("node_ids"))
      .def(
          "problem_nodes",
          [](const Forest& f, py::handle problem_id) {
            Args a;
            return to_numpy(f.problem_nodes(a.scalar(problem_id, "problem_id", 0, kI64Max)));
          },
          py::arg("problem_id"))
      .def("problems", [](const Forest& f) { return to_numpy(f.problems()); })
      .def_property_readonly("num_nodes", &Forest::num_nodes)
      .def("__len__", &Forest::num_nodes)
      .def(
          "select_beam",
          [](const Forest& f, py::handle ids, py::handle keep, py::handle how, bool dedupe) {
            Args a;
            const int64_t k = a.scalar(keep, "keep_per_problem", 0, kI32Max);
            return to_numpy(f.select_beam(a.view(ids, "candidate_ids"), k, option(how), dedupe));
          },
          py::arg("candidate_ids"), py::arg("keep_per_problem"), py::arg("how"), py::arg("dedupe") = false,
          "int32 ids: per problem (first-appearance order) the best keep_per_problem candidates, best first.")
      .def(
          "select_dvts",
          [](const Forest& f, py::handle ids, py::handle how) {
            Args a;
            return to_numpy(f.select_dvts(a.view(ids, "candidate_ids"), option(how)));
          },
          py::arg("candidate_ids"), py::arg("how"), "int32 ids: the best candidate per (problem, subtree).")
      .def(
          "vote",
          [](const Forest& f, py::handle ids, py::handle how, py::handle agg) {
            Args a;
            ponder::tree::VoteResult v = f.vote(a.view(ids, "node_ids"), option(how), option(agg));
            py::dict d;
            d["problem_ids"] = to_numpy(std::move(v.problem_ids));
            d["answer_ids"] = to_numpy(std::move(v.answer_ids));
            d["node_ids"] = to_numpy(std::move(v.node_ids));
            d["weights"] = to_numpy(std::move(v.weights));
            return d;
          },
          py::arg("node_ids"), py::arg("how"), py::arg("agg") = "last",
          "Per problem the winning answer: dict of problem_ids int64, answer_ids int64, node_ids int32, "
          "weights float32. how: majority | weighted | best; agg: last | min | prod | mean.")
      .def("stats", [](const Forest& f) {
        const ponder::tree::ForestStats s = f.stats();
        py::dict d;
        d["live_nodes"] = s.live_nodes;
        d["ids_given"] = s.ids_given;
        d["problems"] = s.problems;
        d["pages_in_use"] = s.pages_in_use;
        d["spare_pages"] = s.spare_pages;
        d["token_capacity"] = s.token_capacity;
        d["bytes_reserved"] = s.bytes_reserved;
        return d;
      });
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "ponder's compiled core. Semantics: ponder.reference (the pure-Python twins).";
  m.attr("__version__") = PONDER_VERSION;
  bind_tree(m);
  bind_kv(m);
  bind_kernels(m);
}
