// IEEE binary16 (half) and bfloat16 bit patterns <-> float on the host, header-only so the CPU
// kernels' inner loops inline them. float -> half/bf16 rounds to nearest, ties to even;
// overflow gives infinity; NaN stays NaN (quiet).
#pragma once

#include <cstdint>
#include <cstring>

namespace ponder {
namespace half_detail {

inline uint32_t f32_bits(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  return x;
}
inline float bits_f32(uint32_t x) {
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

inline uint16_t to_half(float f) {
  const uint32_t x = f32_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) {  // inf / nan (keep the top payload bits, force quiet)
    return static_cast<uint16_t>(sign | 0x7c00u | (ax > 0x7f800000u ? (0x200u | ((ax >> 13) & 0x3ffu)) : 0u));
  }
  if (ax >= 0x47800000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 2^16: overflow
  const uint32_t e = ax >> 23;                                          // biased float exponent
  if (e < 113) {  // |f| < 2^-14: a half subnormal (or zero)
    if (e < 102) return static_cast<uint16_t>(sign);  // < 2^-25: rounds to zero
    const uint32_t m = (ax & 0x7fffffu) | 0x800000u;  // 24-bit significand
    const uint32_t shift = 126 - e;                   // 14..24
    uint32_t h = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (h & 1u))) ++h;  // may carry into the smallest normal: correct
    return static_cast<uint16_t>(sign | h);
  }
  uint32_t h = ((e - 112) << 10) | ((ax >> 13) & 0x3ffu);
  const uint32_t rem = ax & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // a carry may give infinity: correct
  return static_cast<uint16_t>(sign | h);
}

inline float from_half(uint16_t h) {
  // Exponent re-bias with the renormalisation of subnormals done by a float subtraction.
  const uint32_t shifted_exp = 0x7c00u << 13;
  uint32_t o = (static_cast<uint32_t>(h) & 0x7fffu) << 13;
  const uint32_t exp = shifted_exp & o;
  o += (127u - 15u) << 23;
  if (exp == shifted_exp) {
    o += (128u - 16u) << 23;  // inf / nan
  } else if (exp == 0) {
    o += 1u << 23;  // subnormal or zero: value = (o as float) - 2^-14
    o = f32_bits(bits_f32(o) - bits_f32(113u << 23));
  }
  o |= (static_cast<uint32_t>(h) & 0x8000u) << 16;
  return bits_f32(o);
}

inline uint16_t to_bf16(float f) {
  uint32_t x = f32_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // quiet nan
  x += 0x7fffu + ((x >> 16) & 1u);
  return static_cast<uint16_t>(x >> 16);
}

inline float from_bf16(uint16_t b) { return bits_f32(static_cast<uint32_t>(b) << 16); }

}  // namespace half_detail

inline uint16_t float_to_half_bits(float f) { return half_detail::to_half(f); }
inline float half_bits_to_float(uint16_t h) { return half_detail::from_half(h); }
inline uint16_t float_to_bf16_bits(float f) { return half_detail::to_bf16(f); }
inline float bf16_bits_to_float(uint16_t b) { return half_detail::from_bf16(b); }

}  // namespace ponder
