// CUDA half of kv_kernels.h.
//
// write_kv / copy_blocks / gather_kv are pure data movement: one thread block per token row
// (or per block pair), threads striding over the row in the widest unit (16/8/4/2 bytes) that
// every pointer, stride and row length allows. No dtype conversion: results are bit-exact.
//
// paged_decode_attention: one thread block (128 threads) per (sequence, query head). The block's
// threads form groups of `lpt` lanes (a power of two <= 32); a group processes one token at a
// time, each lane holding VEC * NV elements of head_dim (vector loads of VEC elements), and keeps
// its own online-softmax state (running max, sum, fp32 accumulator). Tokens are dealt to groups
// in warp-uniform tiles of UNROLL tokens per group (K and V of a tile are loaded before use), so
// every lane of a warp runs the same number of iterations and the shuffles stay convergent. At the
// end the groups' states are merged through shared memory. The K/V of a kv head are read by the
// Hq/Hkv query heads of its group in adjacent blocks, which mostly hit L2.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernels/kv_kernels.h"

namespace ponder::kernels {
namespace {

// ============================================================================ host helpers
void check_cuda(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return;
  cudaGetLastError();  // clear a non-sticky error so that later calls start clean
  throw std::runtime_error(std::string("ponder CUDA: ") + what + " failed: " + cudaGetErrorString(err));
}

// Makes `device` current for the scope, restoring the previous device afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check_cuda(cudaGetDevice(&prev_), "cudaGetDevice");
    if (prev_ != device) {
      check_cuda(cudaSetDevice(device), "cudaSetDevice");
      changed_ = true;
    }
  }
  ~DeviceGuard() {
    if (changed_) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
  bool changed_ = false;
};

void require_cuda(const TensorView& v, const char* name) {
  if (v.device != DeviceType::CUDA)
    throw std::invalid_argument(std::string(name) + " is a CPU tensor: the CUDA kernels need CUDA tensors");
}

void require_aligned(const TensorView& v, const char* name) {
  if (reinterpret_cast<uintptr_t>(v.data) % element_size(v.dtype) != 0)
    throw std::invalid_argument(std::string(name) + "'s data pointer is not aligned to its element size");
}

struct NamedView {
  const TensorView* v;
  const char* name;
};

void require_aligned(std::initializer_list<NamedView> list) {
  for (const NamedView& n : list) require_aligned(*n.v, n.name);
}

void require_int(int64_t x, const char* what) {
  if (x > INT_MAX) throw std::invalid_argument(std::string(what) + " = " + std::to_string(x) + " is too large for the CUDA kernels (> 2^31 - 1)");
}

cudaStream_t as_stream(intptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

void check_launch(const char* what) { check_cuda(cudaGetLastError(), what); }

// The widest unit (16, 8, 4 or 2 bytes, never below the element size) dividing every value.
int pick_unit(size_t es, std::initializer_list<int64_t> values) {
  for (int u : {16, 8, 4, 2}) {
    if (static_cast<size_t>(u) < es) break;
    bool ok = true;
    for (int64_t v : values) ok = ok && (v % u == 0);
    if (ok) return u;
  }
  return static_cast<int>(es);
}

int64_t addr(const void* p) { return static_cast<int64_t>(reinterpret_cast<uintptr_t>(p) & 0xffff); }

// Stride of a dimension, 0 where the extent is 1 (its stride never matters then).
int64_t eff_stride(const TensorView& v, int dim) { return v.shape[dim] == 1 ? 0 : v.strides[dim]; }

unsigned grid_for(int64_t items, int64_t cap = INT_MAX) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(items, cap)));
}

unsigned threads_for(int64_t row_units) {
  const int64_t t = (row_units + 31) / 32 * 32;
  return static_cast<unsigned>(std::max<int64_t>(32, std::min<int64_t>(256, t)));
}

template <int BYTES> struct UnitOf;
template <> struct UnitOf<16> { using type = uint4; };
template <> struct UnitOf<8> { using type = uint2; };
template <> struct UnitOf<4> { using type = uint32_t; };
template <> struct UnitOf<2> { using type = uint16_t; };

// ============================================================================ device helpers
struct Idx1 {
  const void* p;
  int64_t stride;
  bool is64;
  __device__ __forceinline__ int64_t operator()(int64_t i) const {
    return is64 ? static_cast<const int64_t*>(p)[i * stride]
                : static_cast<int64_t>(static_cast<const int32_t*>(p)[i * stride]);
  }
};

struct Idx2 {
  const void* p;
  int64_t s0, s1;
  bool is64;
  __device__ __forceinline__ int64_t operator()(int64_t i, int64_t j) const {
    const int64_t off = i * s0 + j * s1;
    return is64 ? static_cast<const int64_t*>(p)[off] : static_cast<int64_t>(static_cast<const int32_t*>(p)[off]);
  }
};

__device__ __forceinline__ int64_t clamp64(int64_t x, int64_t lo, int64_t hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

Idx1 idx1(const TensorView& v) { return Idx1{v.data, v.strides[0], v.dtype == ScalarType::Int64}; }
Idx2 idx2(const TensorView& v) { return Idx2{v.data, v.strides[0], v.strides[1], v.dtype == ScalarType::Int64}; }

template <typename T> struct Conv;
template <> struct Conv<float> {
  __device__ __forceinline__ static float to_f(float x) { return x; }
  __device__ __forceinline__ static float from_f(float x) { return x; }
};
template <> struct Conv<__half> {
  __device__ __forceinline__ static float to_f(__half x) { return __half2float(x); }
  __device__ __forceinline__ static __half from_f(float x) { return __float2half_rn(x); }
};
template <> struct Conv<__nv_bfloat16> {
  __device__ __forceinline__ static float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ __forceinline__ static __nv_bfloat16 from_f(float x) { return __float2bfloat16_rn(x); }
};

// VEC consecutive elements at p (aligned to VEC * sizeof(T)) as floats, in one load.
template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* p, float* out) {
  using V = typename UnitOf<VEC * sizeof(T)>::type;
  const V raw = *reinterpret_cast<const V*>(p);
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = Conv<T>::to_f(e[i]);
}

// ============================================================================ kernels
// Unit-typed copies: U is the copy unit; all strides and lengths are in units.
template <typename U>
__global__ void write_kv_kernel(U* __restrict__ kc, U* __restrict__ vc, const U* __restrict__ kn,
                                const U* __restrict__ vn, Idx1 slots, int64_t T, int64_t nslots, int H, int du,
                                int64_t ks0, int64_t ks1, int64_t ks2, int64_t vs0, int64_t vs1, int64_t vs2) {
  const int row = H * du;
  for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
    const int64_t s = slots(t);
    if (s < 0 || s >= nslots) continue;  // padding (or an unchecked bad slot)
    U* kd = kc + s * row;
    U* vd = vc + s * row;
    for (int i = threadIdx.x; i < row; i += blockDim.x) {
      const int h = i / du, d = i - h * du;
      kd[i] = kn[t * ks0 + h * ks1 + d * ks2];
      vd[i] = vn[t * vs0 + h * vs1 + d * vs2];
    }
  }
}

constexpr int kLayersPerLaunch = 32;
struct LayerPtrs {
  void* k[kLayersPerLaunch];
  void* v[kLayersPerLaunch];
};

// grid: x = pairs (strided), y = layer within this launch, z = 0 for K, 1 for V.
template <typename U>
__global__ void copy_blocks_kernel(LayerPtrs ptrs, Idx1 src, Idx1 dst, int64_t m, int64_t nb, int64_t block_units) {
  U* base = static_cast<U*>(blockIdx.z == 0 ? ptrs.k[blockIdx.y] : ptrs.v[blockIdx.y]);
  for (int64_t i = blockIdx.x; i < m; i += gridDim.x) {
    const int64_t s = src(i), d = dst(i);
    if (s < 0 || s >= nb || d < 0 || d >= nb || s == d) continue;
    const U* from = base + s * block_units;
    U* to = base + d * block_units;
    for (int64_t j = threadIdx.x; j < block_units; j += blockDim.x) to[j] = from[j];
  }
}

template <typename U>
__global__ void gather_kv_kernel(const U* __restrict__ kc, const U* __restrict__ vc, U* __restrict__ ok,
                                 U* __restrict__ ov, Idx2 bt, Idx1 lens, int64_t B, int64_t L, int64_t nb, int64_t bs,
                                 int64_t limit, int row) {
  for (int64_t r = blockIdx.x; r < B * L; r += gridDim.x) {
    const int64_t b = r / L, t = r - b * L;
    const int64_t len = clamp64(lens(b), 0, limit);
    const int64_t blk = t < len ? bt(b, t / bs) : -1;
    U* dk = ok + r * row;
    U* dv = ov + r * row;
    if (blk >= 0 && blk < nb) {
      const int64_t off = (blk * bs + t % bs) * row;
      for (int i = threadIdx.x; i < row; i += blockDim.x) {
        dk[i] = kc[off + i];
        dv[i] = vc[off + i];
      }
    } else {
      const U zero = U();
      for (int i = threadIdx.x; i < row; i += blockDim.x) {
        dk[i] = zero;
        dv[i] = zero;
      }
    }
  }
}

constexpr int kDecodeThreads = 128;
constexpr int kDecodeUnroll = 2;  // tokens per group per iteration
constexpr int kDecodeMaxHeadDim = 512;
constexpr int kMaxPerLane = kDecodeMaxHeadDim / 32;  // head_dim elements held by one lane

struct DecodeArgs {
  const void* q;
  int64_t qs0, qs1, qs2;
  const void* kc;
  const void* vc;
  void* out;
  Idx2 bt;
  Idx1 lens;
  int B, Hq, Hkv, D, bs, max_blocks;
  int64_t nb;
  float scale;
  int lpt;  // lanes per token group: a power of two <= 32
};

template <typename T, int VEC, int NV>
__global__ void __launch_bounds__(kDecodeThreads) decode_kernel(DecodeArgs a) {
  extern __shared__ float smem[];
  const int lpt = a.lpt;
  const int ngroups = blockDim.x / lpt;
  const int grp = threadIdx.x / lpt;
  const int sub = threadIdx.x & (lpt - 1);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int D = a.D;
  float* s_acc = smem;                  // [ngroups, D]
  float* s_m = s_acc + ngroups * D;     // [ngroups]
  float* s_l = s_m + ngroups;           // [ngroups]
  float* s_w = s_l + ngroups;           // [ngroups]
  float* s_inv = s_w + ngroups;         // [1]
  const T* q = static_cast<const T*>(a.q);
  const T* kc = static_cast<const T*>(a.kc);
  const T* vc = static_cast<const T*>(a.vc);
  T* out = static_cast<T*>(a.out);
  const int G = a.Hq / a.Hkv;
  const int64_t row = static_cast<int64_t>(a.Hkv) * D;
  const float NEG_INF = -INFINITY;

  for (int64_t bh = blockIdx.x; bh < static_cast<int64_t>(a.B) * a.Hq; bh += gridDim.x) {
    const int b = static_cast<int>(bh / a.Hq), h = static_cast<int>(bh % a.Hq);
    const int kvh = h / G;
    const int len = static_cast<int>(clamp64(a.lens(b), 0, static_cast<int64_t>(a.max_blocks) * a.bs));

    // This lane's slice of head_dim: chunks c = j * lpt + sub (j < NV), elements c*VEC .. c*VEC+VEC-1.
    float qr[NV][VEC], acc[NV][VEC];
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int d0 = (j * lpt + sub) * VEC;
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const int d = d0 + i;
        qr[j][i] = d < D ? Conv<T>::to_f(q[b * a.qs0 + h * a.qs1 + d * a.qs2]) * a.scale : 0.f;
        acc[j][i] = 0.f;
      }
    }
    float m = NEG_INF, l = 0.f;

    // Warp-uniform loop: every lane runs the same iterations (tokens past len are masked).
    for (int t0 = 0; t0 < len; t0 += ngroups * kDecodeUnroll) {
      float kr[kDecodeUnroll][NV][VEC], vr[kDecodeUnroll][NV][VEC], s[kDecodeUnroll];
#pragma unroll
      for (int u = 0; u < kDecodeUnroll; ++u) {
        const int t = t0 + u * ngroups + grp;
        int64_t blk = -1;
        if (t < len) blk = a.bt(b, t / a.bs);
        const bool valid = blk >= 0 && blk < a.nb;
        const int64_t off = valid ? (blk * a.bs + t % a.bs) * row + static_cast<int64_t>(kvh) * D : 0;
#pragma unroll
        for (int j = 0; j < NV; ++j) {
          const int d0 = (j * lpt + sub) * VEC;
          if (valid && d0 < D) {
            load_vec<T, VEC>(kc + off + d0, kr[u][j]);
            load_vec<T, VEC>(vc + off + d0, vr[u][j]);
          } else {
#pragma unroll
            for (int i = 0; i < VEC; ++i) kr[u][j][i] = vr[u][j][i] = 0.f;
          }
        }
        s[u] = valid ? 0.f : NEG_INF;
      }
#pragma unroll
      for (int u = 0; u < kDecodeUnroll; ++u) {
        float part = 0.f;
#pragma unroll
        for (int j = 0; j < NV; ++j)
#pragma unroll
          for (int i = 0; i < VEC; ++i) part = fmaf(qr[j][i], kr[u][j][i], part);
        for (int o = lpt >> 1; o > 0; o >>= 1) part += __shfl_xor_sync(0xffffffffu, part, o);
        s[u] = s[u] == NEG_INF ? NEG_INF : part;
      }
      float m_new = m;
#pragma unroll
      for (int u = 0; u < kDecodeUnroll; ++u) m_new = fmaxf(m_new, s[u]);
      if (m_new == NEG_INF) continue;  // nothing valid so far
      const float corr = expf(m - m_new);  // 0 when m == -inf
      l *= corr;
#pragma unroll
      for (int j = 0; j < NV; ++j)
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[j][i] *= corr;
#pragma unroll
      for (int u = 0; u < kDecodeUnroll; ++u) {
        const float p = expf(s[u] - m_new);  // 0 for a masked token
        l += p;
#pragma unroll
        for (int j = 0; j < NV; ++j)
#pragma unroll
          for (int i = 0; i < VEC; ++i) acc[j][i] = fmaf(p, vr[u][j][i], acc[j][i]);
      }
      m = m_new;
    }

    // Merge the groups' (m, l, acc) states.
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int d0 = (j * lpt + sub) * VEC;
#pragma unroll
      for (int i = 0; i < VEC; ++i)
        if (d0 + i < D) s_acc[grp * D + d0 + i] = acc[j][i];
    }
    if (sub == 0) {
      s_m[grp] = m;
      s_l[grp] = l;
    }
    __syncthreads();
    if (warp == 0) {
      float M = NEG_INF;
      for (int g = lane; g < ngroups; g += 32) M = fmaxf(M, s_m[g]);
      for (int o = 16; o > 0; o >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, o));
      float total = 0.f;
      for (int g = lane; g < ngroups; g += 32) {
        const float w = s_m[g] == NEG_INF ? 0.f : expf(s_m[g] - M);
        s_w[g] = w;
        total += s_l[g] * w;
      }
      for (int o = 16; o > 0; o >>= 1) total += __shfl_xor_sync(0xffffffffu, total, o);
      if (lane == 0) s_inv[0] = total > 0.f ? 1.f / total : 0.f;
    }
    __syncthreads();
    const float inv = s_inv[0];
    T* o = out + bh * D;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
      float x = 0.f;
      for (int g = 0; g < ngroups; ++g) x = fmaf(s_acc[g * D + d], s_w[g], x);
      o[d] = Conv<T>::from_f(x * inv);
    }
    __syncthreads();  // the next (b, h) reuses the shared memory
  }
}

// ============================================================================ launchers
template <int UNIT>
void launch_write(const TensorView& kc, const TensorView& vc, const TensorView& kn, const TensorView& vn,
                  const TensorView& slots, int64_t nslots, size_t es, bool rows, cudaStream_t st) {
  using U = typename UnitOf<UNIT>::type;
  const int64_t T = kn.shape[0];
  const int H = static_cast<int>(kn.shape[1]);
  const int64_t per = UNIT / static_cast<int64_t>(es);  // elements per unit
  const int du = static_cast<int>(kn.shape[2] / per);
  // Contiguous rows: consecutive units, stride 1. Otherwise the unit is the element (per == 1)
  // and the element strides carry over.
  const int64_t ks2 = rows ? 1 : eff_stride(kn, 2), vs2 = rows ? 1 : eff_stride(vn, 2);
  write_kv_kernel<U><<<grid_for(T, 1 << 16), threads_for(static_cast<int64_t>(H) * du), 0, st>>>(
      static_cast<U*>(kc.data), static_cast<U*>(vc.data), static_cast<const U*>(kn.data),
      static_cast<const U*>(vn.data), idx1(slots), T, nslots, H, du, eff_stride(kn, 0) / per,
      eff_stride(kn, 1) / per, ks2, eff_stride(vn, 0) / per, eff_stride(vn, 1) / per, vs2);
}

template <int UNIT>
void launch_copy(const std::vector<TensorView>& kcs, const std::vector<TensorView>& vcs, const TensorView& src,
                 const TensorView& dst, int64_t block_bytes, cudaStream_t st) {
  using U = typename UnitOf<UNIT>::type;
  const int64_t m = src.shape[0], nb = kcs[0].shape[0];
  const int64_t units = block_bytes / UNIT;
  for (size_t first = 0; first < kcs.size(); first += kLayersPerLaunch) {
    const size_t n = std::min<size_t>(kLayersPerLaunch, kcs.size() - first);
    LayerPtrs p{};
    for (size_t l = 0; l < n; ++l) {
      p.k[l] = kcs[first + l].data;
      p.v[l] = vcs[first + l].data;
    }
    const dim3 grid(grid_for(m, 1 << 16), static_cast<unsigned>(n), 2);
    copy_blocks_kernel<U><<<grid, threads_for(units), 0, st>>>(p, idx1(src), idx1(dst), m, nb, units);
    check_launch("copy_blocks kernel launch");
  }
}

template <int UNIT>
void launch_gather(const TensorView& kc, const TensorView& vc, const TensorView& bt, const TensorView& lens,
                   const TensorView& ok, const TensorView& ov, int64_t row_bytes, cudaStream_t st) {
  using U = typename UnitOf<UNIT>::type;
  const int64_t B = ok.shape[0], L = ok.shape[1];
  const int64_t bs = kc.shape[1];
  const int row = static_cast<int>(row_bytes / UNIT);
  const int64_t limit = std::min(L, bt.shape[1] * bs);
  gather_kv_kernel<U><<<grid_for(B * L, 1 << 20), threads_for(row), 0, st>>>(
      static_cast<const U*>(kc.data), static_cast<const U*>(vc.data), static_cast<U*>(ok.data),
      static_cast<U*>(ov.data), idx2(bt), idx1(lens), B, L, kc.shape[0], bs, limit, row);
}

template <typename T, int VEC, int NV>
void launch_decode_nv(const DecodeArgs& a, int64_t pairs, cudaStream_t st) {
  const int ngroups = kDecodeThreads / a.lpt;
  const size_t smem = sizeof(float) * (static_cast<size_t>(ngroups) * (a.D + 3) + 1);
  decode_kernel<T, VEC, NV><<<grid_for(pairs), kDecodeThreads, smem, st>>>(a);
}

// Elements per lane VEC * NV must cover head_dim with lanes-per-token lpt <= 32.
template <typename T, int VEC>
void launch_decode_vec(DecodeArgs a, int64_t pairs, cudaStream_t st) {
  const int chunks = a.D / VEC;  // D % VEC == 0 here
  int nv = 1;
  if (chunks <= 32) {
    int lpt = 1;
    while (lpt < chunks) lpt <<= 1;
    a.lpt = lpt;
  } else {
    a.lpt = 32;
    while (nv * 32 < chunks) nv <<= 1;
  }
  if (nv == 1) return launch_decode_nv<T, VEC, 1>(a, pairs, st);
  if constexpr (VEC * 2 <= kMaxPerLane) if (nv == 2) return launch_decode_nv<T, VEC, 2>(a, pairs, st);
  if constexpr (VEC * 4 <= kMaxPerLane) if (nv == 4) return launch_decode_nv<T, VEC, 4>(a, pairs, st);
  if constexpr (VEC * 8 <= kMaxPerLane) if (nv == 8) return launch_decode_nv<T, VEC, 8>(a, pairs, st);
  if constexpr (VEC * 16 <= kMaxPerLane) if (nv == 16) return launch_decode_nv<T, VEC, 16>(a, pairs, st);
  throw std::invalid_argument("paged_decode_attention (CUDA): head_dim " + std::to_string(a.D) +
                              " is not supported (at most " + std::to_string(kDecodeMaxHeadDim) + ")");
}

template <typename T>
void launch_decode(const DecodeArgs& a, int64_t pairs, bool aligned16, cudaStream_t st) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  if (aligned16 && a.D % kVec == 0)
    launch_decode_vec<T, kVec>(a, pairs, st);
  else
    launch_decode_vec<T, 1>(a, pairs, st);
}

}  // namespace

// ============================================================================ entry points
void write_kv_cuda(const TensorView& k_cache, const TensorView& v_cache, const TensorView& k_new,
                   const TensorView& v_new, const TensorView& slot_mapping, intptr_t stream) {
  validate_write_kv(k_cache, v_cache, k_new, v_new, slot_mapping);
  require_cuda(k_cache, "k_cache");
  require_aligned({{&k_cache, "k_cache"}, {&v_cache, "v_cache"}, {&k_new, "k_new"}, {&v_new, "v_new"},
                   {&slot_mapping, "slot_mapping"}});
  const int64_t T = k_new.shape[0], H = k_new.shape[1], D = k_new.shape[2];
  if (T == 0 || H * D == 0) return;
  require_int(H * D, "num_kv_heads * head_dim");
  const size_t es = element_size(k_cache.dtype);
  const int64_t e = static_cast<int64_t>(es);
  // Rows of head_dim contiguous in k_new and v_new: copy them in the widest unit that every
  // pointer and stride allows. Otherwise element by element with the given strides.
  const bool rows = D == 1 || (eff_stride(k_new, 2) == 1 && eff_stride(v_new, 2) == 1);
  int unit = static_cast<int>(es);
  if (rows)
    unit = pick_unit(es, {D * e, eff_stride(k_new, 0) * e, eff_stride(k_new, 1) * e, eff_stride(v_new, 0) * e,
                          eff_stride(v_new, 1) * e, addr(k_cache.data), addr(v_cache.data), addr(k_new.data),
                          addr(v_new.data)});
  DeviceGuard guard(k_cache.device_id);
  const cudaStream_t st = as_stream(stream);
  const int64_t nslots = k_cache.shape[0] * k_cache.shape[1];
  switch (unit) {
    case 16: launch_write<16>(k_cache, v_cache, k_new, v_new, slot_mapping, nslots, es, rows, st); break;
    case 8: launch_write<8>(k_cache, v_cache, k_new, v_new, slot_mapping, nslots, es, rows, st); break;
    case 4: launch_write<4>(k_cache, v_cache, k_new, v_new, slot_mapping, nslots, es, rows, st); break;
    default: launch_write<2>(k_cache, v_cache, k_new, v_new, slot_mapping, nslots, es, rows, st); break;
  }
  check_launch("write_kv kernel launch");
}

void copy_blocks_cuda(const std::vector<TensorView>& k_caches, const std::vector<TensorView>& v_caches,
                      const TensorView& src, const TensorView& dst, intptr_t stream) {
  validate_copy_blocks(k_caches, v_caches, src, dst);
  require_cuda(src, "src");
  require_aligned(src, "src");
  require_aligned(dst, "dst");
  if (k_caches.empty() || src.shape[0] == 0) return;
  const TensorView& c0 = k_caches[0];
  const size_t es = element_size(c0.dtype);
  const int64_t block_bytes = c0.shape[1] * c0.shape[2] * c0.shape[3] * static_cast<int64_t>(es);
  if (block_bytes == 0) return;
  int unit = 16;
  for (size_t l = 0; l < k_caches.size(); ++l) {
    require_aligned(k_caches[l], "k_caches[l]");
    require_aligned(v_caches[l], "v_caches[l]");
    unit = std::min(unit, pick_unit(es, {block_bytes, addr(k_caches[l].data), addr(v_caches[l].data)}));
  }
  DeviceGuard guard(c0.device_id);
  const cudaStream_t st = as_stream(stream);
  switch (unit) {
    case 16: launch_copy<16>(k_caches, v_caches, src, dst, block_bytes, st); break;
    case 8: launch_copy<8>(k_caches, v_caches, src, dst, block_bytes, st); break;
    case 4: launch_copy<4>(k_caches, v_caches, src, dst, block_bytes, st); break;
    default: launch_copy<2>(k_caches, v_caches, src, dst, block_bytes, st); break;
  }
}

void gather_kv_cuda(const TensorView& k_cache, const TensorView& v_cache, const TensorView& block_tables,
                    const TensorView& lengths, const TensorView& out_k, const TensorView& out_v,
                    intptr_t stream) {
  validate_gather_kv(k_cache, v_cache, block_tables, lengths, out_k, out_v);
  require_cuda(k_cache, "k_cache");
  require_aligned({{&k_cache, "k_cache"}, {&v_cache, "v_cache"}, {&block_tables, "block_tables"},
                   {&lengths, "lengths"}, {&out_k, "out_k"}, {&out_v, "out_v"}});
  const int64_t B = out_k.shape[0], L = out_k.shape[1];
  const size_t es = element_size(k_cache.dtype);
  const int64_t row_bytes = k_cache.shape[2] * k_cache.shape[3] * static_cast<int64_t>(es);
  if (B * L == 0 || row_bytes == 0) return;
  require_int(row_bytes / static_cast<int64_t>(es), "num_kv_heads * head_dim");
  const int unit = pick_unit(es, {row_bytes, addr(k_cache.data), addr(v_cache.data), addr(out_k.data),
                                  addr(out_v.data)});
  DeviceGuard guard(k_cache.device_id);
  const cudaStream_t st = as_stream(stream);
  switch (unit) {
    case 16: launch_gather<16>(k_cache, v_cache, block_tables, lengths, out_k, out_v, row_bytes, st); break;
    case 8: launch_gather<8>(k_cache, v_cache, block_tables, lengths, out_k, out_v, row_bytes, st); break;
    case 4: launch_gather<4>(k_cache, v_cache, block_tables, lengths, out_k, out_v, row_bytes, st); break;
    default: launch_gather<2>(k_cache, v_cache, block_tables, lengths, out_k, out_v, row_bytes, st); break;
  }
  check_launch("gather_kv kernel launch");
}

void paged_decode_attention_cuda(const TensorView& out, const TensorView& q, const TensorView& k_cache,
                                 const TensorView& v_cache, const TensorView& block_tables,
                                 const TensorView& lengths, float scale, intptr_t stream) {
  validate_paged_decode_attention(out, q, k_cache, v_cache, block_tables, lengths, scale);
  require_cuda(q, "q");
  require_aligned({{&out, "out"}, {&q, "q"}, {&k_cache, "k_cache"}, {&v_cache, "v_cache"},
                   {&block_tables, "block_tables"}, {&lengths, "lengths"}});
  const int64_t B = q.shape[0], Hq = q.shape[1], D = q.shape[2];
  if (B * Hq == 0 || D == 0) return;
  if (D > kDecodeMaxHeadDim)
    throw std::invalid_argument("paged_decode_attention (CUDA): head_dim " + std::to_string(D) +
                                " is not supported (at most " + std::to_string(kDecodeMaxHeadDim) + ")");
  require_int(B, "batch");
  require_int(Hq, "num_q_heads");
  require_int(k_cache.shape[1], "block_size");
  require_int(block_tables.shape[1], "max_blocks");
  // + headroom: token indices run up to one tile (< 1024) past a sequence's length.
  require_int(block_tables.shape[1] * k_cache.shape[1] + 1024, "max_blocks * block_size");
  DecodeArgs a{};
  a.q = q.data;
  a.qs0 = eff_stride(q, 0);
  a.qs1 = eff_stride(q, 1);
  a.qs2 = eff_stride(q, 2);
  a.kc = k_cache.data;
  a.vc = v_cache.data;
  a.out = out.data;
  a.bt = idx2(block_tables);
  a.lens = idx1(lengths);
  a.B = static_cast<int>(B);
  a.Hq = static_cast<int>(Hq);
  a.Hkv = static_cast<int>(k_cache.shape[2]);
  a.D = static_cast<int>(D);
  a.bs = static_cast<int>(k_cache.shape[1]);
  a.max_blocks = static_cast<int>(block_tables.shape[1]);
  a.nb = k_cache.shape[0];
  a.scale = scale;
  a.lpt = 32;
  const bool aligned16 = addr(k_cache.data) % 16 == 0 && addr(v_cache.data) % 16 == 0;
  DeviceGuard guard(q.device_id);
  const cudaStream_t st = as_stream(stream);
  switch (q.dtype) {
    case ScalarType::Float32: launch_decode<float>(a, B * Hq, aligned16, st); break;
    case ScalarType::Float16: launch_decode<__half>(a, B * Hq, aligned16, st); break;
    case ScalarType::BFloat16: launch_decode<__nv_bfloat16>(a, B * Hq, aligned16, st); break;
    default: throw std::invalid_argument("q must be float32, float16 or bfloat16");
  }
  check_launch("paged_decode_attention kernel launch");
}

void copy_device_to_host(void* dst, const void* src, size_t bytes, int device_id, intptr_t stream) {
  if (bytes == 0) return;
  DeviceGuard guard(device_id);
  const cudaStream_t st = as_stream(stream);
  check_cuda(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, st), "cudaMemcpyAsync (index check)");
  check_cuda(cudaStreamSynchronize(st), "cudaStreamSynchronize (index check)");
}

}  // namespace ponder::kernels
