// Tests of csrc/kernels/kv_kernels.h on the CPU: fp16/bf16 conversions, the checks, and the
// kernels on std::vector buffers against naive references written here (runs under ASan+UBSan,
// so the "unchecked bad index" cases also prove that nothing is read or written out of bounds).
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/kv_kernels.h"

namespace kk = ponder::kernels;
using kk::DeviceType;
using kk::ScalarType;
using kk::TensorView;

namespace {

template <typename F>
std::string invalid_argument_of(F&& f) {
  try {
    f();
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "";
}

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

float bits_f32(uint32_t x) {
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

template <typename T>
TensorView view(std::vector<T>& v, ScalarType t, std::initializer_list<int64_t> shape) {
  return TensorView::contiguous(v.data(), t, shape);
}

std::vector<float> randn(size_t n, uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist;
  std::vector<float> v(n);
  for (auto& x : v) x = dist(gen);
  return v;
}

bool is_half_nan(uint16_t h) { return (h & 0x7c00u) == 0x7c00u && (h & 0x3ffu) != 0; }
bool is_bf16_nan(uint16_t b) { return (b & 0x7f80u) == 0x7f80u && (b & 0x7fu) != 0; }

// Checks that `h` is the nearest half to `f` (ties to even), by comparing with its neighbours.
template <typename ToF>
void check_nearest(float f, uint16_t h, ToF to_f, uint16_t mant_mask) {
  const double x = f;
  const double got = to_f(h);
  const double err = std::fabs(got - x);
  for (int step : {-1, 1}) {
    const uint16_t mag = h & 0x7fffu;
    if ((step < 0 && mag == 0) || (step > 0 && (mag & ~mant_mask) == (0x7fffu & ~mant_mask))) continue;
    const uint16_t n = static_cast<uint16_t>((h & 0x8000u) | (mag + step));
    const double other = to_f(n);
    if (std::isinf(other)) continue;
    const double oerr = std::fabs(other - x);
    CHECK_MESSAGE(err <= oerr, "f=" << f << " h=" << h << " neighbour " << n);
    if (err == oerr) CHECK_MESSAGE((h & 1u) == 0, "tie must round to even: f=" << f << " h=" << h);
  }
}

}  // namespace

// ============================================================================ conversions

TEST_CASE("kv conversions: every half bit pattern round-trips") {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = kk::half_bits_to_float(static_cast<uint16_t>(h));
    const uint16_t back = kk::float_to_half_bits(f);
    if (is_half_nan(static_cast<uint16_t>(h))) {
      REQUIRE(std::isnan(f));
      REQUIRE(is_half_nan(back));
    } else {
      REQUIRE_MESSAGE(back == h, "half " << h << " -> " << f << " -> " << back);
    }
  }
}

TEST_CASE("kv conversions: half known values") {
  CHECK(kk::float_to_half_bits(1.0f) == 0x3c00);
  CHECK(kk::float_to_half_bits(-2.0f) == 0xc000);
  CHECK(kk::float_to_half_bits(65504.0f) == 0x7bff);
  CHECK(kk::float_to_half_bits(65519.99f) == 0x7bff);
  CHECK(kk::float_to_half_bits(65520.0f) == 0x7c00);  // halfway to 2^16: ties to even = inf
  CHECK(kk::float_to_half_bits(1e10f) == 0x7c00);
  CHECK(kk::float_to_half_bits(-1e10f) == 0xfc00);
  CHECK(kk::float_to_half_bits(std::numeric_limits<float>::infinity()) == 0x7c00);
  CHECK(kk::float_to_half_bits(std::ldexp(1.0f, -24)) == 0x0001);  // smallest subnormal
  CHECK(kk::float_to_half_bits(std::ldexp(1.0f, -25)) == 0x0000);  // tie to even: 0
  CHECK(kk::float_to_half_bits(std::ldexp(1.5f, -25)) == 0x0001);
  CHECK(kk::float_to_half_bits(std::ldexp(3.0f, -25)) == 0x0002);  // 1.5 ulp: tie to even (2)
  CHECK(kk::float_to_half_bits(std::ldexp(1.0f, -14)) == 0x0400);  // smallest normal
  CHECK(kk::float_to_half_bits(std::ldexp(1023.5f, -24)) == 0x0400);  // subnormal rounding carries
  CHECK(kk::float_to_half_bits(-0.0f) == 0x8000);
  CHECK(kk::float_to_half_bits(1.0f + std::ldexp(1.0f, -11)) == 0x3c00);  // tie: even
  CHECK(kk::float_to_half_bits(1.0f + 3 * std::ldexp(1.0f, -11)) == 0x3c02);  // tie: even
  CHECK(is_half_nan(kk::float_to_half_bits(std::nanf(""))));
  CHECK(kk::half_bits_to_float(0x0001) == std::ldexp(1.0f, -24));
  CHECK(kk::half_bits_to_float(0x3555) == 0.333251953125f);
  CHECK(std::isinf(kk::half_bits_to_float(0xfc00)));
}

TEST_CASE("kv conversions: float -> half rounds to nearest even over a float sweep") {
  for (uint64_t x = 0; x < 0x47800000u; x += 4099) {  // all magnitudes below 2^16
    for (uint32_t sign : {0u, 0x80000000u}) {
      const float f = bits_f32(static_cast<uint32_t>(x) | sign);
      const uint16_t h = kk::float_to_half_bits(f);
      if (std::fabs(f) >= 65520.0f) {
        CHECK((h & 0x7fffu) == 0x7c00u);
        continue;
      }
      check_nearest(f, h, kk::half_bits_to_float, 0x3ffu);
#if defined(__FLT16_MAX__)
      const _Float16 c = static_cast<_Float16>(f);  // the compiler's conversion, as a cross-check
      uint16_t cb;
      std::memcpy(&cb, &c, 2);
      REQUIRE_MESSAGE(cb == h, "f=" << f);
#endif
    }
  }
}

TEST_CASE("kv conversions: every bfloat16 bit pattern round-trips; rounding is to nearest even") {
  for (uint32_t b = 0; b < 65536; ++b) {
    const float f = kk::bf16_bits_to_float(static_cast<uint16_t>(b));
    const uint16_t back = kk::float_to_bf16_bits(f);
    if (is_bf16_nan(static_cast<uint16_t>(b))) {
      REQUIRE(std::isnan(f));
      REQUIRE(is_bf16_nan(back));
    } else {
      REQUIRE(back == b);
    }
  }
  CHECK(kk::float_to_bf16_bits(1.0f) == 0x3f80);
  CHECK(kk::float_to_bf16_bits(1.0f + std::ldexp(1.0f, -8)) == 0x3f80);      // tie: even
  CHECK(kk::float_to_bf16_bits(1.0f + 3 * std::ldexp(1.0f, -8)) == 0x3f82);  // tie: even
  CHECK(kk::float_to_bf16_bits(1.0f + std::ldexp(1.0f, -8) + std::ldexp(1.0f, -20)) == 0x3f81);
  CHECK(kk::float_to_bf16_bits(std::numeric_limits<float>::max()) == 0x7f80);  // overflow -> inf
  CHECK(is_bf16_nan(kk::float_to_bf16_bits(std::nanf(""))));
  CHECK(is_bf16_nan(kk::float_to_bf16_bits(bits_f32(0x7f800001u))));  // a NaN whose top bits are 0
  for (uint64_t x = 0; x < 0x7f7f0000u; x += 104729) {
    const float f = bits_f32(static_cast<uint32_t>(x));
    check_nearest(f, kk::float_to_bf16_bits(f), kk::bf16_bits_to_float, 0x7fu);
  }
}

// ============================================================================ write_kv

TEST_CASE("kv write_kv: strided input, padding, int32 slots; unchecked bad slots skipped") {
  const int64_t nb = 3, bs = 2, H = 2, D = 3, T = 4;
  std::vector<float> kc(nb * bs * H * D, -1.f), vc(nb * bs * H * D, -2.f);
  // k_new stored as [T, D, H] and viewed as [T, H, D] (strides T: H*D, H: 1, D: H).
  std::vector<float> kbuf(T * D * H), vbuf(T * H * D);
  for (size_t i = 0; i < kbuf.size(); ++i) kbuf[i] = static_cast<float>(i);
  for (size_t i = 0; i < vbuf.size(); ++i) vbuf[i] = 100.f + static_cast<float>(i);
  TensorView kn = TensorView::contiguous(kbuf.data(), ScalarType::Float32, {T, H, D});
  kn.strides[0] = H * D;
  kn.strides[1] = 1;
  kn.strides[2] = H;
  const TensorView vn = view(vbuf, ScalarType::Float32, {T, H, D});
  std::vector<int32_t> slots = {5, -1, 0, 6};  // 6 is out of range (nb * bs = 6): skipped
  const TensorView kcv = view(kc, ScalarType::Float32, {nb, bs, H, D});
  const TensorView vcv = view(vc, ScalarType::Float32, {nb, bs, H, D});
  const TensorView sv = view(slots, ScalarType::Int32, {T});
  CHECK(contains(invalid_argument_of([&] { kk::check_slot_indices(kcv, sv); }), "slot_mapping[3] = 6 is out of range"));
  kk::write_kv(kcv, vcv, kn, vn, sv);
  for (int64_t t : {0, 2}) {
    const int64_t s = slots[t];
    for (int64_t h = 0; h < H; ++h)
      for (int64_t d = 0; d < D; ++d) {
        CHECK(kc[(s * H + h) * D + d] == kbuf[t * D * H + d * H + h]);
        CHECK(vc[(s * H + h) * D + d] == vbuf[(t * H + h) * D + d]);
      }
  }
  int untouched = 0;
  for (float x : kc) untouched += x == -1.f;
  CHECK(untouched == (nb * bs - 2) * H * D);

  std::vector<int64_t> dup = {1, 1, -1, -1};
  CHECK(contains(invalid_argument_of([&] { kk::check_slot_indices(kcv, view(dup, ScalarType::Int64, {T})); }),
                 "slot_mapping[1] = 1 repeats slot_mapping[0]"));
}

TEST_CASE("kv write_kv: metadata checks") {
  std::vector<float> kc(2 * 2 * 1 * 4), vc(2 * 2 * 1 * 4), kn(3 * 4);
  std::vector<int64_t> slots(3);
  std::vector<uint16_t> half(3 * 4);
  const TensorView kcv = view(kc, ScalarType::Float32, {2, 2, 1, 4});
  const TensorView vcv = view(vc, ScalarType::Float32, {2, 2, 1, 4});
  const TensorView knv = view(kn, ScalarType::Float32, {3, 1, 4});
  const TensorView sv = view(slots, ScalarType::Int64, {3});
  CHECK(contains(invalid_argument_of([&] { kk::write_kv(kcv, kcv, knv, knv, sv); }), "same memory"));
  CHECK(contains(invalid_argument_of([&] { kk::write_kv(kcv, vcv, view(half, ScalarType::Float16, {3, 1, 4}), knv, sv); }),
                 "k_new has dtype float16 but k_cache has float32"));
  CHECK(contains(invalid_argument_of([&] { kk::write_kv(kcv, vcv, knv, knv, view(slots, ScalarType::Int64, {2})); }),
                 "slot_mapping has shape [2]"));
  CHECK(contains(invalid_argument_of([&] { kk::write_kv(kcv, vcv, view(kn, ScalarType::Float32, {3, 4}), knv, sv); }),
                 "k_new must be a 3-D tensor"));
  TensorView strided = kcv;
  strided.strides[3] = 2;
  CHECK(contains(invalid_argument_of([&] { kk::write_kv(strided, vcv, knv, knv, sv); }), "k_cache must be contiguous"));
  TensorView on_gpu = sv;
  on_gpu.device = DeviceType::CUDA;
  CHECK(contains(invalid_argument_of([&] { kk::write_kv(kcv, vcv, knv, knv, on_gpu); }),
                 "slot_mapping is on cuda:0 but k_cache is on cpu"));
  // All on "CUDA": the CPU kernel refuses before touching memory.
  TensorView g[5] = {kcv, vcv, knv, knv, sv};
  for (auto& v : g) v.device = DeviceType::CUDA;
  CHECK(contains(invalid_argument_of([&] { kk::write_kv(g[0], g[1], g[2], g[3], g[4]); }), "need CPU tensors"));
#if !PONDER_WITH_CUDA
  CHECK_THROWS_AS(kk::write_kv_cuda(g[0], g[1], g[2], g[3], g[4], 0), std::runtime_error);
  CHECK_THROWS_AS(kk::paged_decode_attention_cuda(g[2], g[2], g[0], g[1], g[4], g[4], 1.f, 0), std::runtime_error);
#endif
}

// ============================================================================ copy_blocks

TEST_CASE("kv copy_blocks: every layer, K and V; index checks") {
  const int64_t nb = 5, bs = 2, H = 1, D = 3, per = bs * H * D;
  std::vector<std::vector<uint16_t>> pools(4);  // K0, V0, K1, V1 (bf16 bits)
  for (size_t p = 0; p < pools.size(); ++p) {
    pools[p].resize(nb * per);
    for (size_t i = 0; i < pools[p].size(); ++i) pools[p][i] = static_cast<uint16_t>(p * 1000 + i);
  }
  const auto orig = pools;
  std::vector<TensorView> ks = {view(pools[0], ScalarType::BFloat16, {nb, bs, H, D}),
                                view(pools[2], ScalarType::BFloat16, {nb, bs, H, D})};
  std::vector<TensorView> vs = {view(pools[1], ScalarType::BFloat16, {nb, bs, H, D}),
                                view(pools[3], ScalarType::BFloat16, {nb, bs, H, D})};
  std::vector<int64_t> src = {0, 0, 4}, dst = {1, 2, 3};
  const TensorView sv = view(src, ScalarType::Int64, {3}), dv = view(dst, ScalarType::Int64, {3});
  kk::check_copy_indices(nb, sv, dv);
  kk::copy_blocks(ks, vs, sv, dv);
  for (size_t p = 0; p < pools.size(); ++p)
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t from = b == 1 || b == 2 ? 0 : b == 3 ? 4 : b;
      for (int64_t i = 0; i < per; ++i) CHECK(pools[p][b * per + i] == orig[p][from * per + i]);
    }
  std::vector<int32_t> s2 = {0, 1}, d2 = {1, 2};
  CHECK(contains(invalid_argument_of([&] {
                   kk::check_copy_indices(nb, view(s2, ScalarType::Int32, {2}), view(d2, ScalarType::Int32, {2}));
                 }),
                 "block 1 is both a source"));
  std::vector<int32_t> d3 = {3, 3};
  CHECK(contains(invalid_argument_of([&] {
                   kk::check_copy_indices(nb, view(s2, ScalarType::Int32, {2}), view(d3, ScalarType::Int32, {2}));
                 }),
                 "dst[1] = 3 repeats dst[0]"));
  std::vector<int32_t> s4 = {0, 5};
  CHECK(contains(invalid_argument_of([&] {
                   kk::check_copy_indices(nb, view(s4, ScalarType::Int32, {2}), view(d2, ScalarType::Int32, {2}));
                 }),
                 "src[1] = 5 is out of range [0, 5)"));
  // Unchecked bad pairs are skipped.
  std::vector<int32_t> bad_s = {-3, 100, 2}, bad_d = {0, 1, 2};
  const auto before = pools;
  kk::copy_blocks(ks, vs, view(bad_s, ScalarType::Int32, {3}), view(bad_d, ScalarType::Int32, {3}));
  CHECK(pools == before);
  std::vector<TensorView> one = {ks[0]};
  CHECK(contains(invalid_argument_of([&] { kk::copy_blocks(one, vs, sv, dv); }), "same length"));
}

// ============================================================================ gather_kv

TEST_CASE("kv gather_kv: pages to dense, zero fill, unchecked bad values") {
  const int64_t nb = 6, bs = 4, H = 2, D = 3, B = 3, L = 7, row = H * D;
  std::vector<uint16_t> kc(nb * bs * row), vc(nb * bs * row);
  for (size_t i = 0; i < kc.size(); ++i) {
    kc[i] = static_cast<uint16_t>(i + 1);
    vc[i] = static_cast<uint16_t>(30000 + i);
  }
  std::vector<int32_t> bt = {5, 1, 0, /**/ 2, -1, -1, /**/ 3, 4, -1};
  std::vector<int64_t> lens = {6, 0, 7};
  std::vector<uint16_t> ok(B * L * row, 0xffff), ov(B * L * row, 0xffff);
  const TensorView kcv = view(kc, ScalarType::Float16, {nb, bs, H, D});
  const TensorView vcv = view(vc, ScalarType::Float16, {nb, bs, H, D});
  const TensorView btv = view(bt, ScalarType::Int32, {B, 3});
  const TensorView lv = view(lens, ScalarType::Int64, {B});
  kk::check_block_table_indices(kcv, btv, lv, L);
  kk::gather_kv(kcv, vcv, btv, lv, view(ok, ScalarType::Float16, {B, L, H, D}), view(ov, ScalarType::Float16, {B, L, H, D}));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < L; ++t)
      for (int64_t i = 0; i < row; ++i) {
        const size_t o = static_cast<size_t>((b * L + t) * row + i);
        if (t < lens[b]) {
          const int64_t src = (bt[b * 3 + t / bs] * bs + t % bs) * row + i;
          CHECK(ok[o] == kc[src]);
          CHECK(ov[o] == vc[src]);
        } else {
          CHECK(ok[o] == 0);
          CHECK(ov[o] == 0);
        }
      }
  CHECK(contains(invalid_argument_of([&] { kk::check_block_table_indices(kcv, btv, lv, 6); }),
                 "lengths[2] = 7 exceeds the output's max_len"));
  std::vector<int64_t> long_lens = {13, 0, 0};
  CHECK(contains(invalid_argument_of([&] { kk::check_block_table_indices(kcv, btv, view(long_lens, ScalarType::Int64, {B}), -1); }),
                 "max_blocks 3 x block_size 4 = 12 tokens"));
  std::vector<int64_t> uses_bad = {0, 5, 0};
  CHECK(contains(invalid_argument_of([&] { kk::check_block_table_indices(kcv, btv, view(uses_bad, ScalarType::Int64, {B}), -1); }),
                 "block_tables[1, 1] = -1 is out of range [0, 6)"));
  // Unchecked: lengths beyond everything, and bad ids, are clamped / read as absent.
  std::vector<int64_t> wild = {1000, 8, -4};
  kk::gather_kv(kcv, vcv, btv, view(wild, ScalarType::Int64, {B}), view(ok, ScalarType::Float16, {B, L, H, D}),
                view(ov, ScalarType::Float16, {B, L, H, D}));
  CHECK(ok[(0 * L + 6) * row] == kc[(1 * bs + 2) * row]);  // clamped to L: t = 6 is block bt[0, 1] = 1, offset 2
  for (int64_t t = 4; t < L; ++t) CHECK(ok[(1 * L + t) * row] == 0);  // block -1: absent
  for (int64_t t = 0; t < L; ++t) CHECK(ok[(2 * L + t) * row] == 0);  // negative length
}

// ============================================================================ decode attention

namespace {

// Naive double-precision reference on float inputs.
std::vector<double> naive_decode(const std::vector<float>& q, const std::vector<float>& kc, const std::vector<float>& vc,
                                 const std::vector<int32_t>& bt, const std::vector<int64_t>& lens, int64_t B,
                                 int64_t Hq, int64_t Hkv, int64_t D, int64_t bs, int64_t max_blocks, double scale) {
  std::vector<double> out(B * Hq * D, 0.0);
  const int64_t G = Hq / Hkv;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hq; ++h) {
      const int64_t kvh = h / G, n = lens[b];
      if (n == 0) continue;
      std::vector<double> s(n);
      double mx = -1e300;
      for (int64_t t = 0; t < n; ++t) {
        const int64_t off = ((bt[b * max_blocks + t / bs] * bs + t % bs) * Hkv + kvh) * D;
        double dot = 0;
        for (int64_t d = 0; d < D; ++d) dot += static_cast<double>(q[(b * Hq + h) * D + d]) * kc[off + d];
        s[t] = dot * scale;
        mx = std::max(mx, s[t]);
      }
      double sum = 0;
      for (auto& x : s) sum += (x = std::exp(x - mx));
      for (int64_t t = 0; t < n; ++t) {
        const int64_t off = ((bt[b * max_blocks + t / bs] * bs + t % bs) * Hkv + kvh) * D;
        for (int64_t d = 0; d < D; ++d) out[(b * Hq + h) * D + d] += s[t] / sum * vc[off + d];
      }
    }
  return out;
}

}  // namespace

TEST_CASE("kv paged_decode_attention: float32 and float16 vs a naive reference (GQA, empty sequences)") {
  const int64_t nb = 10, bs = 3, Hkv = 2, Hq = 6, D = 5, B = 4, max_blocks = 4;
  std::vector<float> kc = randn(nb * bs * Hkv * D, 1), vc = randn(nb * bs * Hkv * D, 2), q = randn(B * Hq * D, 3);
  std::vector<int32_t> bt = {9, 2, 4, -1, /**/ 0, -1, -1, -1, /**/ 1, 3, 5, 6, /**/ 7, 8, -1, -1};
  std::vector<int64_t> lens = {7, 0, 12, 4};
  const double scale = 0.45;
  const auto ref = naive_decode(q, kc, vc, bt, lens, B, Hq, Hkv, D, bs, max_blocks, scale);
  const TensorView btv = view(bt, ScalarType::Int32, {B, max_blocks});
  const TensorView lv = view(lens, ScalarType::Int64, {B});

  std::vector<float> out(B * Hq * D, 123.f);
  kk::paged_decode_attention(view(out, ScalarType::Float32, {B, Hq, D}), view(q, ScalarType::Float32, {B, Hq, D}),
                             view(kc, ScalarType::Float32, {nb, bs, Hkv, D}), view(vc, ScalarType::Float32, {nb, bs, Hkv, D}),
                             btv, lv, static_cast<float>(scale));
  for (size_t i = 0; i < out.size(); ++i) CHECK(out[i] == doctest::Approx(ref[i]).epsilon(1e-5).scale(1.0));
  for (int64_t i = Hq * D; i < 2 * Hq * D; ++i) CHECK(out[i] == 0.f);  // lengths[1] == 0

  // float16: the same data rounded to half; the result within half-precision output rounding.
  auto to_half = [](const std::vector<float>& v) {
    std::vector<uint16_t> h(v.size());
    for (size_t i = 0; i < v.size(); ++i) h[i] = kk::float_to_half_bits(v[i]);
    return h;
  };
  auto back = [](const std::vector<uint16_t>& h) {
    std::vector<float> f(h.size());
    for (size_t i = 0; i < h.size(); ++i) f[i] = kk::half_bits_to_float(h[i]);
    return f;
  };
  auto kh = to_half(kc), vh = to_half(vc), qh = to_half(q);
  const auto ref16 = naive_decode(back(qh), back(kh), back(vh), bt, lens, B, Hq, Hkv, D, bs, max_blocks, scale);
  std::vector<uint16_t> oh(B * Hq * D);
  kk::paged_decode_attention(view(oh, ScalarType::Float16, {B, Hq, D}), view(qh, ScalarType::Float16, {B, Hq, D}),
                             view(kh, ScalarType::Float16, {nb, bs, Hkv, D}), view(vh, ScalarType::Float16, {nb, bs, Hkv, D}),
                             btv, lv, static_cast<float>(scale));
  for (size_t i = 0; i < oh.size(); ++i) {
    const double got = kk::half_bits_to_float(oh[i]);
    CHECK(std::fabs(got - ref16[i]) <= std::fabs(ref16[i]) * std::ldexp(1.0, -11) + 1e-6);
  }

  // Checks.
  std::vector<float> q5(B * 5 * D);
  CHECK(contains(invalid_argument_of([&] {
                   kk::paged_decode_attention(view(q5, ScalarType::Float32, {B, 5, D}), view(q5, ScalarType::Float32, {B, 5, D}),
                                              view(kc, ScalarType::Float32, {nb, bs, Hkv, D}),
                                              view(vc, ScalarType::Float32, {nb, bs, Hkv, D}), btv, lv, 1.f);
                 }),
                 "not a multiple of the 2 kv heads"));
  CHECK(contains(invalid_argument_of([&] {
                   kk::paged_decode_attention(view(out, ScalarType::Float32, {B, Hq, D}), view(q, ScalarType::Float32, {B, Hq, D}),
                                              view(kc, ScalarType::Float32, {nb, bs, Hkv, D}),
                                              view(vc, ScalarType::Float32, {nb, bs, Hkv, D}), btv, lv,
                                              std::numeric_limits<float>::quiet_NaN());
                 }),
                 "scale must be a finite number"));
  // Unchecked bad ids and lengths: no out-of-bounds access (ASan), finite output.
  std::vector<int32_t> wild_bt = {100000, -7, 2, 3, /**/ 0, 0, 0, 0, /**/ 1, 1, 1, 1, /**/ 9, 9, 9, 9};
  std::vector<int64_t> wild_len = {1 << 30, -5, 12, 3};
  kk::paged_decode_attention(view(out, ScalarType::Float32, {B, Hq, D}), view(q, ScalarType::Float32, {B, Hq, D}),
                             view(kc, ScalarType::Float32, {nb, bs, Hkv, D}), view(vc, ScalarType::Float32, {nb, bs, Hkv, D}),
                             view(wild_bt, ScalarType::Int32, {B, max_blocks}), view(wild_len, ScalarType::Int64, {B}), 1.f);
  for (float x : out) CHECK(std::isfinite(x));
}
