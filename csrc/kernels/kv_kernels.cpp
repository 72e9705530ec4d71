// CPU half of kv_kernels.h: checks and the OpenMP kernels.
#include "kernels/kv_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace ponder::kernels {

// Conversions (common/half.h) under the short names the kernels use.
namespace {
inline uint16_t to_half(float f) { return float_to_half_bits(f); }
inline float from_half(uint16_t h) { return half_bits_to_float(h); }
inline uint16_t to_bf16(float f) { return float_to_bf16_bits(f); }
inline float from_bf16(uint16_t b) { return bf16_bits_to_float(b); }
}  // namespace

// ============================================================================ checks
namespace {

[[noreturn]] void fail(const std::string& msg) { throw std::invalid_argument(msg); }

std::string shape_str(const TensorView& v) {
  std::string s = "[";
  for (int i = 0; i < v.ndim; ++i) {
    if (i) s += ", ";
    s += std::to_string(v.shape[i]);
  }
  return s + "]";
}

std::string device_str(const TensorView& v) {
  return v.device == DeviceType::CPU ? std::string("cpu") : "cuda:" + std::to_string(v.device_id);
}

void check_ndim(const TensorView& v, const char* name, int ndim, const char* layout) {
  if (v.ndim != ndim)
    fail(std::string(name) + " must be a " + std::to_string(ndim) + "-D tensor " + layout + ", got " +
         std::to_string(v.ndim) + "-D with shape " + shape_str(v));
}

void check_index_dtype(const TensorView& v, const char* name) {
  if (!is_index(v.dtype))
    fail(std::string(name) + " must be an int32 or int64 tensor, got " + scalar_type_name(v.dtype));
}

void check_same_dtype(const TensorView& v, const char* name, const TensorView& ref, const char* ref_name) {
  if (v.dtype != ref.dtype)
    fail(std::string(name) + " has dtype " + scalar_type_name(v.dtype) + " but " + ref_name + " has " +
         scalar_type_name(ref.dtype) + ": all data tensors of a call must share one dtype");
}

void check_same_shape(const TensorView& v, const char* name, const TensorView& ref, const char* ref_name) {
  bool same = v.ndim == ref.ndim;
  for (int i = 0; same && i < v.ndim; ++i) same = v.shape[i] == ref.shape[i];
  if (!same)
    fail(std::string(name) + " has shape " + shape_str(v) + " but " + ref_name + " has shape " + shape_str(ref) +
         ": they must match");
}

void check_contiguous(const TensorView& v, const char* name) {
  if (!v.is_contiguous())
    fail(std::string(name) + " must be contiguous (row-major), got shape " + shape_str(v) +
         " with non-contiguous strides; pass " + name + ".contiguous()");
}

// One layer's pool: [num_blocks, block_size, num_kv_heads, head_dim], contiguous, float dtype.
void check_cache(const TensorView& v, const char* name) {
  check_ndim(v, name, 4, "[num_blocks, block_size, num_kv_heads, head_dim]");
  if (!is_floating(v.dtype))
    fail(std::string(name) + " must be float32, float16 or bfloat16, got " + scalar_type_name(v.dtype));
  if (v.shape[1] < 1) fail(std::string(name) + " has block_size " + std::to_string(v.shape[1]) + ": it must be >= 1");
  check_contiguous(v, name);
}

void check_cache_pair(const TensorView& k, const char* kname, const TensorView& v, const char* vname) {
  check_cache(k, kname);
  check_cache(v, vname);
  check_same_dtype(v, vname, k, kname);
  check_same_shape(v, vname, k, kname);
  if (k.data != nullptr && k.data == v.data && k.numel() > 0)
    fail(std::string(kname) + " and " + vname + " are the same memory: K and V need separate pools");
}

struct Named {
  const TensorView* v;
  const char* name;
};

void check_same_device(std::initializer_list<Named> list) {
  const Named& first = *list.begin();
  for (const Named& n : list) {
    if (n.v->device != first.v->device || n.v->device_id != first.v->device_id)
      fail(std::string(n.name) + " is on " + device_str(*n.v) + " but " + first.name + " is on " +
           device_str(*first.v) + ": all tensors of a call must be on one device");
  }
}

void check_dim(const TensorView& v, const char* name, int dim, int64_t expected, const char* what) {
  if (v.shape[dim] != expected)
    fail(std::string(name) + " has shape " + shape_str(v) + ": dimension " + std::to_string(dim) + " (" + what +
         ") must be " + std::to_string(expected));
}

// Block-table / lengths pair shared by gather and decode.
void check_tables(const TensorView& block_tables, const TensorView& lengths, int64_t B) {
  check_ndim(block_tables, "block_tables", 2, "[batch, max_blocks]");
  check_index_dtype(block_tables, "block_tables");
  check_ndim(lengths, "lengths", 1, "[batch]");
  check_index_dtype(lengths, "lengths");
  check_dim(block_tables, "block_tables", 0, B, "batch");
  check_dim(lengths, "lengths", 0, B, "batch");
}

inline int64_t idx1(const TensorView& v, int64_t i) {
  const int64_t off = i * v.strides[0];
  return v.dtype == ScalarType::Int64 ? static_cast<const int64_t*>(v.data)[off]
                                      : static_cast<const int32_t*>(v.data)[off];
}

inline int64_t idx2(const TensorView& v, int64_t i, int64_t j) {
  const int64_t off = i * v.strides[0] + j * v.strides[1];
  return v.dtype == ScalarType::Int64 ? static_cast<const int64_t*>(v.data)[off]
                                      : static_cast<const int32_t*>(v.data)[off];
}

void check_host(const TensorView& v, const char* name) {
  if (v.device != DeviceType::CPU)
    fail(std::string("internal: ") + name + " must be host memory for the index checks");
}

}  // namespace

void validate_write_kv(const TensorView& k_cache, const TensorView& v_cache, const TensorView& k_new,
                       const TensorView& v_new, const TensorView& slot_mapping) {
  check_cache_pair(k_cache, "k_cache", v_cache, "v_cache");
  check_ndim(k_new, "k_new", 3, "[num_tokens, num_kv_heads, head_dim]");
  check_same_dtype(k_new, "k_new", k_cache, "k_cache");
  check_dim(k_new, "k_new", 1, k_cache.shape[2], "num_kv_heads of k_cache");
  check_dim(k_new, "k_new", 2, k_cache.shape[3], "head_dim of k_cache");
  check_ndim(v_new, "v_new", 3, "[num_tokens, num_kv_heads, head_dim]");
  check_same_dtype(v_new, "v_new", k_cache, "k_cache");
  check_same_shape(v_new, "v_new", k_new, "k_new");
  check_ndim(slot_mapping, "slot_mapping", 1, "[num_tokens]");
  check_index_dtype(slot_mapping, "slot_mapping");
  check_dim(slot_mapping, "slot_mapping", 0, k_new.shape[0], "num_tokens of k_new");
  check_same_device({{&k_cache, "k_cache"}, {&v_cache, "v_cache"}, {&k_new, "k_new"}, {&v_new, "v_new"},
                     {&slot_mapping, "slot_mapping"}});
}

void validate_copy_blocks(const std::vector<TensorView>& k_caches, const std::vector<TensorView>& v_caches,
                          const TensorView& src, const TensorView& dst) {
  if (k_caches.size() != v_caches.size())
    fail("k_caches and v_caches must have the same length (one pool per layer), got " +
         std::to_string(k_caches.size()) + " and " + std::to_string(v_caches.size()));
  check_ndim(src, "src", 1, "[num_pairs]");
  check_index_dtype(src, "src");
  check_ndim(dst, "dst", 1, "[num_pairs]");
  check_index_dtype(dst, "dst");
  if (src.shape[0] != dst.shape[0])
    fail("src and dst must have the same length, got " + std::to_string(src.shape[0]) + " and " +
         std::to_string(dst.shape[0]));
  check_same_device({{&src, "src"}, {&dst, "dst"}});
  for (size_t l = 0; l < k_caches.size(); ++l) {
    const std::string kn = "k_caches[" + std::to_string(l) + "]";
    const std::string vn = "v_caches[" + std::to_string(l) + "]";
    check_cache_pair(k_caches[l], kn.c_str(), v_caches[l], vn.c_str());
    if (l > 0) {
      check_same_dtype(k_caches[l], kn.c_str(), k_caches[0], "k_caches[0]");
      check_same_shape(k_caches[l], kn.c_str(), k_caches[0], "k_caches[0]");
    }
    check_same_device({{&src, "src"}, {&k_caches[l], kn.c_str()}, {&v_caches[l], vn.c_str()}});
  }
}

void validate_gather_kv(const TensorView& k_cache, const TensorView& v_cache, const TensorView& block_tables,
                        const TensorView& lengths, const TensorView& out_k, const TensorView& out_v) {
  check_cache_pair(k_cache, "k_cache", v_cache, "v_cache");
  check_ndim(block_tables, "block_tables", 2, "[batch, max_blocks]");
  check_tables(block_tables, lengths, block_tables.shape[0]);
  check_ndim(out_k, "out_k", 4, "[batch, max_len, num_kv_heads, head_dim]");
  check_same_dtype(out_k, "out_k", k_cache, "k_cache");
  check_dim(out_k, "out_k", 0, block_tables.shape[0], "batch of block_tables");
  check_dim(out_k, "out_k", 2, k_cache.shape[2], "num_kv_heads of k_cache");
  check_dim(out_k, "out_k", 3, k_cache.shape[3], "head_dim of k_cache");
  check_contiguous(out_k, "out_k");
  check_ndim(out_v, "out_v", 4, "[batch, max_len, num_kv_heads, head_dim]");
  check_same_dtype(out_v, "out_v", k_cache, "k_cache");
  check_same_shape(out_v, "out_v", out_k, "out_k");
  check_contiguous(out_v, "out_v");
  if (out_k.data != nullptr && out_k.data == out_v.data && out_k.numel() > 0)
    fail("out_k and out_v are the same memory");
  check_same_device({{&k_cache, "k_cache"}, {&v_cache, "v_cache"}, {&block_tables, "block_tables"},
                     {&lengths, "lengths"}, {&out_k, "out_k"}, {&out_v, "out_v"}});
}

void validate_paged_decode_attention(const TensorView& out, const TensorView& q, const TensorView& k_cache,
                                     const TensorView& v_cache, const TensorView& block_tables,
                                     const TensorView& lengths, float scale) {
  check_cache_pair(k_cache, "k_cache", v_cache, "v_cache");
  check_ndim(q, "q", 3, "[batch, num_q_heads, head_dim]");
  check_same_dtype(q, "q", k_cache, "k_cache");
  check_dim(q, "q", 2, k_cache.shape[3], "head_dim of k_cache");
  const int64_t hkv = k_cache.shape[2], hq = q.shape[1];
  if (hkv < 1) fail("k_cache has num_kv_heads 0: it must be >= 1");
  if (hq % hkv != 0)
    fail("q has " + std::to_string(hq) + " heads, not a multiple of the " + std::to_string(hkv) +
         " kv heads of k_cache (GQA needs num_q_heads % num_kv_heads == 0)");
  check_ndim(out, "out", 3, "[batch, num_q_heads, head_dim]");
  check_same_dtype(out, "out", q, "q");
  check_same_shape(out, "out", q, "q");
  check_contiguous(out, "out");
  check_tables(block_tables, lengths, q.shape[0]);
  if (!std::isfinite(scale)) fail("scale must be a finite number, got " + std::to_string(scale));
  check_same_device({{&q, "q"}, {&out, "out"}, {&k_cache, "k_cache"}, {&v_cache, "v_cache"},
                     {&block_tables, "block_tables"}, {&lengths, "lengths"}});
}

void check_slot_indices(const TensorView& k_cache, const TensorView& slot_mapping) {
  check_host(slot_mapping, "slot_mapping");
  const int64_t nslots = k_cache.shape[0] * k_cache.shape[1];
  const int64_t T = slot_mapping.shape[0];
  std::vector<std::pair<int64_t, int64_t>> used;  // (slot, token) of the real writes
  used.reserve(static_cast<size_t>(T));
  for (int64_t t = 0; t < T; ++t) {
    const int64_t s = idx1(slot_mapping, t);
    if (s >= nslots)
      fail("slot_mapping[" + std::to_string(t) + "] = " + std::to_string(s) + " is out of range: the pool has " +
           std::to_string(nslots) + " slots (num_blocks " + std::to_string(k_cache.shape[0]) + " x block_size " +
           std::to_string(k_cache.shape[1]) + "); use a negative slot for padding");
    if (s >= 0) used.emplace_back(s, t);
  }
  std::sort(used.begin(), used.end());
  for (size_t i = 1; i < used.size(); ++i)
    if (used[i].first == used[i - 1].first)
      fail("slot_mapping[" + std::to_string(used[i].second) + "] = " + std::to_string(used[i].first) +
           " repeats slot_mapping[" + std::to_string(used[i - 1].second) +
           "]: two tokens cannot be written to one slot");
}

void check_copy_indices(int64_t num_blocks, const TensorView& src, const TensorView& dst) {
  check_host(src, "src");
  check_host(dst, "dst");
  const int64_t m = src.shape[0];
  std::vector<std::pair<int64_t, int64_t>> dsts;
  dsts.reserve(static_cast<size_t>(m));
  for (int64_t i = 0; i < m; ++i) {
    const int64_t s = idx1(src, i), d = idx1(dst, i);
    if (s < 0 || s >= num_blocks)
      fail("src[" + std::to_string(i) + "] = " + std::to_string(s) + " is out of range [0, " +
           std::to_string(num_blocks) + ") (num_blocks)");
    if (d < 0 || d >= num_blocks)
      fail("dst[" + std::to_string(i) + "] = " + std::to_string(d) + " is out of range [0, " +
           std::to_string(num_blocks) + ") (num_blocks)");
    dsts.emplace_back(d, i);
  }
  std::sort(dsts.begin(), dsts.end());
  for (size_t i = 1; i < dsts.size(); ++i)
    if (dsts[i].first == dsts[i - 1].first)
      fail("dst[" + std::to_string(dsts[i].second) + "] = " + std::to_string(dsts[i].first) + " repeats dst[" +
           std::to_string(dsts[i - 1].second) + "]: each destination block can be written once per call");
  for (int64_t i = 0; i < m; ++i) {
    const int64_t s = idx1(src, i);
    auto it = std::lower_bound(dsts.begin(), dsts.end(), std::make_pair(s, std::numeric_limits<int64_t>::min()));
    if (it != dsts.end() && it->first == s)
      fail("block " + std::to_string(s) + " is both a source (src[" + std::to_string(i) +
           "]) and a destination (dst[" + std::to_string(it->second) +
           "]): the result would depend on the copy order; split the call");
  }
}

void check_block_table_indices(const TensorView& k_cache, const TensorView& block_tables,
                               const TensorView& lengths, int64_t max_len) {
  check_host(block_tables, "block_tables");
  check_host(lengths, "lengths");
  const int64_t nb = k_cache.shape[0], bs = k_cache.shape[1];
  const int64_t B = block_tables.shape[0], max_blocks = block_tables.shape[1];
  const int64_t capacity = max_blocks * bs;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = idx1(lengths, b);
    const std::string lb = "lengths[" + std::to_string(b) + "] = " + std::to_string(len);
    if (len < 0) fail(lb + " is negative");
    if (len > capacity)
      fail(lb + " exceeds what its block table row holds: max_blocks " + std::to_string(max_blocks) +
           " x block_size " + std::to_string(bs) + " = " + std::to_string(capacity) + " tokens");
    if (max_len >= 0 && len > max_len)
      fail(lb + " exceeds the output's max_len dimension (out_k.shape[1] = " + std::to_string(max_len) + ")");
    const int64_t used = (len + bs - 1) / bs;
    for (int64_t j = 0; j < used; ++j) {
      const int64_t id = idx2(block_tables, b, j);
      if (id < 0 || id >= nb)
        fail("block_tables[" + std::to_string(b) + ", " + std::to_string(j) + "] = " + std::to_string(id) +
             " is out of range [0, " + std::to_string(nb) + ") (num_blocks); it is used by the first " +
             std::to_string(len) + " tokens of sequence " + std::to_string(b));
    }
  }
}

// ============================================================================ CPU kernels
namespace {

void require_cpu(const TensorView& v, const char* name) {
  if (v.device != DeviceType::CPU)
    fail(std::string(name) + " is on " + device_str(v) + ": the CPU kernels need CPU tensors");
}

// Work below these many bytes runs on one thread. Besides thread start-up, an OpenMP pool
// keeps spinning after a parallel region, and inside a model forward the next op is torch's
// own (separate) OpenMP pool: on a 2-core machine the two pools fighting made a decode step
// of a tiny model 17x slower. So a kernel goes parallel only when its own work dwarfs that.
constexpr int64_t kParallelBytes = 1 << 23;      // decode attention (K/V bytes read)
constexpr int64_t kParallelCopyBytes = 1 << 23;  // write / copy / gather

inline int num_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// Copies row [h, d] of a [T, H, D] strided tensor at token t into a contiguous H*D row.
inline void copy_strided_row(char* dst, const TensorView& src, int64_t t, int64_t H, int64_t D, size_t es) {
  const char* base = static_cast<const char*>(src.data);
  for (int64_t h = 0; h < H; ++h) {
    const char* s = base + static_cast<int64_t>(es) * (t * src.strides[0] + h * src.strides[1]);
    char* d = dst + static_cast<int64_t>(es) * h * D;
    if (src.strides[2] == 1 || D == 1) {
      std::memcpy(d, s, es * static_cast<size_t>(D));
    } else {
      const int64_t step = static_cast<int64_t>(es) * src.strides[2];
      for (int64_t i = 0; i < D; ++i) std::memcpy(d + static_cast<int64_t>(es) * i, s + step * i, es);
    }
  }
}

// Element loads/stores as float.
template <ScalarType T> struct Elem;
template <> struct Elem<ScalarType::Float32> {
  using Storage = float;
  static float load(Storage x) { return x; }
  static Storage store(float x) { return x; }
};
template <> struct Elem<ScalarType::Float16> {
  using Storage = uint16_t;
  static float load(Storage x) { return from_half(x); }
  static Storage store(float x) { return to_half(x); }
};
template <> struct Elem<ScalarType::BFloat16> {
  using Storage = uint16_t;
  static float load(Storage x) { return from_bf16(x); }
  static Storage store(float x) { return to_bf16(x); }
};

template <ScalarType T>
void decode_cpu(const TensorView& out, const TensorView& q, const TensorView& k_cache, const TensorView& v_cache,
                const TensorView& block_tables, const TensorView& lengths, float scale) {
  using E = Elem<T>;
  using S = typename E::Storage;
  const int64_t B = q.shape[0], Hq = q.shape[1], D = q.shape[2];
  const int64_t nb = k_cache.shape[0], bs = k_cache.shape[1], Hkv = k_cache.shape[2];
  const int64_t G = Hq / Hkv, max_blocks = block_tables.shape[1];
  const int64_t row = Hkv * D;  // elements per token slot
  const S* kc = static_cast<const S*>(k_cache.data);
  const S* vc = static_cast<const S*>(v_cache.data);
  const S* qp = static_cast<const S*>(q.data);
  S* op = static_cast<S*>(out.data);
  const int64_t tasks = B * Hkv;
  if (tasks == 0 || D == 0) return;

  // Per-thread scratch, allocated up front so nothing inside the parallel region can throw.
  const int nt = num_threads();
  const size_t per = static_cast<size_t>(2 * G * D + 2 * D + 2 * G);
  std::vector<float> scratch(per * static_cast<size_t>(nt));
  int64_t total_tokens = 0;
  for (int64_t b = 0; b < B; ++b)
    total_tokens += std::min(std::max<int64_t>(0, idx1(lengths, b)), max_blocks * bs);
  const bool parallel = total_tokens * row * 2 * static_cast<int64_t>(sizeof(S)) >= kParallelBytes && tasks > 1;

#pragma omp parallel num_threads(nt) if (parallel)
  {
    float* buf = scratch.data() + per * static_cast<size_t>(thread_id());
    float* qf = buf;             // [G, D]
    float* acc = qf + G * D;     // [G, D]
    float* kf = acc + G * D;     // [D]
    float* vf = kf + D;          // [D]
    float* mx = vf + D;          // [G]
    float* sum = mx + G;         // [G]
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t b = task / Hkv, kvh = task % Hkv;
      const int64_t len = std::min(std::max<int64_t>(0, idx1(lengths, b)), max_blocks * bs);
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = kvh * G + g;
        for (int64_t d = 0; d < D; ++d)
          qf[g * D + d] = E::load(qp[b * q.strides[0] + h * q.strides[1] + d * q.strides[2]]) * scale;
        mx[g] = -std::numeric_limits<float>::infinity();
        sum[g] = 0.f;
        std::fill(acc + g * D, acc + (g + 1) * D, 0.f);
      }
      for (int64_t t = 0; t < len; ++t) {
        const int64_t blk = idx2(block_tables, b, t / bs);
        if (blk < 0 || blk >= nb) continue;  // unchecked bad id: the token is absent
        const int64_t off = (blk * bs + t % bs) * row + kvh * D;
        for (int64_t d = 0; d < D; ++d) kf[d] = E::load(kc[off + d]);
        for (int64_t d = 0; d < D; ++d) vf[d] = E::load(vc[off + d]);
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = qf + g * D;
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t d = 0; d < D; ++d) s += qg[d] * kf[d];
          float* ag = acc + g * D;
          if (s > mx[g]) {  // new running max: rescale what was accumulated so far
            const float c = std::exp(mx[g] - s);
            sum[g] *= c;
            for (int64_t d = 0; d < D; ++d) ag[d] *= c;
            mx[g] = s;
          }
          if (mx[g] == -std::numeric_limits<float>::infinity()) continue;  // s == -inf too
          const float p = std::exp(s - mx[g]);
          sum[g] += p;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) ag[d] += p * vf[d];
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = kvh * G + g;
        S* o = op + (b * Hq + h) * D;
        const float inv = sum[g] > 0.f ? 1.f / sum[g] : 0.f;
        for (int64_t d = 0; d < D; ++d) o[d] = E::store(acc[g * D + d] * inv);
      }
    }
  }
}

}  // namespace

void write_kv(const TensorView& k_cache, const TensorView& v_cache, const TensorView& k_new,
              const TensorView& v_new, const TensorView& slot_mapping) {
  validate_write_kv(k_cache, v_cache, k_new, v_new, slot_mapping);
  require_cpu(k_cache, "k_cache");
  const int64_t T = k_new.shape[0], H = k_new.shape[1], D = k_new.shape[2];
  const int64_t nslots = k_cache.shape[0] * k_cache.shape[1];
  const size_t es = element_size(k_cache.dtype);
  const int64_t row_bytes = H * D * static_cast<int64_t>(es);
  if (T == 0 || row_bytes == 0) return;
  char* kc = static_cast<char*>(k_cache.data);
  char* vc = static_cast<char*>(v_cache.data);
  const bool parallel = T * row_bytes * 2 >= kParallelCopyBytes && T > 1;
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t t = 0; t < T; ++t) {
    const int64_t s = idx1(slot_mapping, t);
    if (s < 0 || s >= nslots) continue;  // padding (or an unchecked bad slot)
    copy_strided_row(kc + s * row_bytes, k_new, t, H, D, es);
    copy_strided_row(vc + s * row_bytes, v_new, t, H, D, es);
  }
}

void copy_blocks(const std::vector<TensorView>& k_caches, const std::vector<TensorView>& v_caches,
                 const TensorView& src, const TensorView& dst) {
  validate_copy_blocks(k_caches, v_caches, src, dst);
  if (k_caches.empty()) return;
  require_cpu(k_caches[0], "k_caches[0]");
  const int64_t layers = static_cast<int64_t>(k_caches.size()), m = src.shape[0];
  const int64_t nb = k_caches[0].shape[0];
  const int64_t block_bytes =
      k_caches[0].shape[1] * k_caches[0].shape[2] * k_caches[0].shape[3] * static_cast<int64_t>(element_size(k_caches[0].dtype));
  if (m == 0 || block_bytes == 0) return;
  const bool parallel = layers * m * block_bytes * 2 >= kParallelCopyBytes && layers * m > 1;
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t task = 0; task < layers * m; ++task) {
    const int64_t l = task / m, i = task % m;
    const int64_t s = idx1(src, i), d = idx1(dst, i);
    if (s < 0 || s >= nb || d < 0 || d >= nb || s == d) continue;
    char* kc = static_cast<char*>(k_caches[static_cast<size_t>(l)].data);
    char* vc = static_cast<char*>(v_caches[static_cast<size_t>(l)].data);
    std::memcpy(kc + d * block_bytes, kc + s * block_bytes, static_cast<size_t>(block_bytes));
    std::memcpy(vc + d * block_bytes, vc + s * block_bytes, static_cast<size_t>(block_bytes));
  }
}

void gather_kv(const TensorView& k_cache, const TensorView& v_cache, const TensorView& block_tables,
               const TensorView& lengths, const TensorView& out_k, const TensorView& out_v) {
  validate_gather_kv(k_cache, v_cache, block_tables, lengths, out_k, out_v);
  require_cpu(k_cache, "k_cache");
  const int64_t B = out_k.shape[0], L = out_k.shape[1];
  const int64_t nb = k_cache.shape[0], bs = k_cache.shape[1], max_blocks = block_tables.shape[1];
  const int64_t row_bytes = k_cache.shape[2] * k_cache.shape[3] * static_cast<int64_t>(element_size(k_cache.dtype));
  if (B * L == 0 || row_bytes == 0) return;
  const char* kc = static_cast<const char*>(k_cache.data);
  const char* vc = static_cast<const char*>(v_cache.data);
  char* ok = static_cast<char*>(out_k.data);
  char* ov = static_cast<char*>(out_v.data);
  const int64_t limit = std::min(L, max_blocks * bs);
  const bool parallel = B * L * row_bytes * 2 >= kParallelCopyBytes && B * L > 1;
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t r = 0; r < B * L; ++r) {
    const int64_t b = r / L, t = r % L;
    const int64_t len = std::min(std::max<int64_t>(0, idx1(lengths, b)), limit);
    int64_t blk = -1;
    if (t < len) blk = idx2(block_tables, b, t / bs);
    if (blk >= 0 && blk < nb) {
      const int64_t off = (blk * bs + t % bs) * row_bytes;
      std::memcpy(ok + r * row_bytes, kc + off, static_cast<size_t>(row_bytes));
      std::memcpy(ov + r * row_bytes, vc + off, static_cast<size_t>(row_bytes));
    } else {
      std::memset(ok + r * row_bytes, 0, static_cast<size_t>(row_bytes));
      std::memset(ov + r * row_bytes, 0, static_cast<size_t>(row_bytes));
    }
  }
}

void paged_decode_attention(const TensorView& out, const TensorView& q, const TensorView& k_cache,
                            const TensorView& v_cache, const TensorView& block_tables,
                            const TensorView& lengths, float scale) {
  validate_paged_decode_attention(out, q, k_cache, v_cache, block_tables, lengths, scale);
  require_cpu(q, "q");
  switch (q.dtype) {
    case ScalarType::Float32:
      decode_cpu<ScalarType::Float32>(out, q, k_cache, v_cache, block_tables, lengths, scale);
      break;
    case ScalarType::Float16:
      decode_cpu<ScalarType::Float16>(out, q, k_cache, v_cache, block_tables, lengths, scale);
      break;
    case ScalarType::BFloat16:
      decode_cpu<ScalarType::BFloat16>(out, q, k_cache, v_cache, block_tables, lengths, scale);
      break;
    default:
      fail("q must be float32, float16 or bfloat16");
  }
}

}  // namespace ponder::kernels
