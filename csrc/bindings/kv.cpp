// ponder._core: the KV cache's control plane (csrc/kv/): BlockPool, PrefixIndex, KVCacheManager.
// Calls keep the GIL (they are short; it serializes concurrent use from several Python
// threads). Scalars are checked in parameter order here; arrays are parsed and checked by the core.
#include <cstring>

#include "bindings/bindings.h"
#include "bindings/numpy_args.h"
#include "kv/kv_manager.h"

namespace ponder::bindings {

namespace kvc = ponder::kv;

void bind_kv(py::module_& m) {
  py::register_exception<kvc::KVCacheFull>(m, "KVCacheFull", PyExc_RuntimeError);

  py::class_<kvc::BlockPool>(m, "BlockPool", R"doc(
Reference counts and a LIFO free list of num_blocks KV blocks of block_size tokens (C++).
Same API and results as ponder.twins.BlockPool, whose docstrings define every operation.
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
LRU eviction of unlocked leaves (C++). Same API and results as ponder.twins.PrefixIndex.)doc")
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
eviction of unused cached blocks (C++). Same API and results as ponder.twins.KVCacheManager,
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

}  // namespace ponder::bindings
