// ponder._core: the KV data-plane kernels (csrc/kernels/). Marshalling only: tensors are
// borrowed through DLPack with the GIL held (dlpack_args.h); then the GIL is released and
// kernels/dispatch.h validates, checks indices and runs the CPU or CUDA kernel. Its C++
// exceptions become Python ones (std::invalid_argument -> ValueError, std::runtime_error ->
// RuntimeError).
#include <cmath>
#include <string>
#include <vector>

#include "bindings/bindings.h"
#include "bindings/dlpack_args.h"
#include "kernels/dispatch.h"

namespace ponder::bindings {

namespace kern = ponder::kernels;

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
        py::gil_scoped_release nogil;
        kern::run_write_kv(kc, vc, kn, vn, sm, static_cast<intptr_t>(stream), check_indices);
      },
      py::arg("k_cache"), py::arg("v_cache"), py::arg("k_new"), py::arg("v_new"), py::arg("slot_mapping"),
      py::kw_only(), py::arg("stream") = 0, py::arg("check_indices") = true,
      R"doc(Scatter new tokens' K/V into a layer's paged pool (in place).

k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim], contiguous, float32/float16/bfloat16.
k_new, v_new: [T, num_kv_heads, head_dim], same dtype, any strides.
slot_mapping: int32/int64 [T]; token t goes to slot s = block * block_size + offset; s < 0 skips it.
stream: cudaStream_t as an int for CUDA tensors (0 = legacy default stream); ignored on the CPU.
check_indices: check slot values first (slots < num_blocks * block_size, no slot twice); for CUDA
tensors this copies slot_mapping to the host and waits. Unchecked: out-of-range slots are skipped;
a slot given twice is undefined on CUDA (which token lands is unspecified).)doc");

  m.def(
      "copy_blocks",
      [](py::handle k_caches, py::handle v_caches, py::handle src, py::handle dst, int64_t stream,
         bool check_indices) {
        std::vector<py::object> keep;
        const auto kcs = dl_list(k_caches, "k_caches", stream, keep);
        const auto vcs = dl_list(v_caches, "v_caches", stream, keep);
        const auto s = dl_view(src, "src", 1, "[num_pairs]", Want::Index, false, stream, keep);
        const auto d = dl_view(dst, "dst", 1, "[num_pairs]", Want::Index, false, stream, keep);
        py::gil_scoped_release nogil;
        kern::run_copy_blocks(kcs, vcs, s, d, static_cast<intptr_t>(stream), check_indices);
      },
      py::arg("k_caches"), py::arg("v_caches"), py::arg("src"), py::arg("dst"), py::kw_only(), py::arg("stream") = 0,
      py::arg("check_indices") = true,
      R"doc(Copy whole blocks src[i] -> dst[i] in every layer's K and V pool (copy-on-write), in one call.

k_caches, v_caches: lists (one entry per layer) of [num_blocks, block_size, num_kv_heads, head_dim]
contiguous pools, all of one shape, dtype and device. src, dst: int32/int64 [m].
check_indices: check ids in [0, num_blocks), dst entries distinct, no block both a source and a
destination (CUDA: copies src/dst to the host and waits). Unchecked: out-of-range pairs are
skipped; a repeated dst, or a block both source and destination, is undefined on CUDA.)doc");

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
        py::gil_scoped_release nogil;
        kern::run_gather_kv(kc, vc, bt, ln, ok, ov, static_cast<intptr_t>(stream), check_indices);
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
        py::gil_scoped_release nogil;
        kern::run_paged_decode_attention(o, qv, kc, vc, bt, ln, s, static_cast<intptr_t>(stream), check_indices);
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

}  // namespace ponder::bindings
