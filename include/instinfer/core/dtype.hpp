// Element types of the KV cache and their scalar conversions.
//
// xsimd 8.1 has no half-precision types, so the bit-exact conversions live here once and are
// shared by host, CSD and CUDA code (round-to-nearest-even, NaN and infinity preserved).
#pragma once

#include <cstdint>
#include <cstring>
#include <optional>
#include <string_view>

#include "instinfer/core/config.hpp"

namespace instinfer {

enum class dtype : uint8_t { kF32 = 0, kF16 = 1, kBF16 = 2 };

constexpr uint32_t dtype_size(dtype t) noexcept {
  return t == dtype::kF32 ? 4u : 2u;
}

constexpr std::string_view dtype_name(dtype t) noexcept {
  switch (t) {
    case dtype::kF32: return "f32";
    case dtype::kF16: return "f16";
    case dtype::kBF16: return "bf16";
  }
  return "?";
}

constexpr std::optional<dtype> parse_dtype(std::string_view s) noexcept {
  if (s == "f32" || s == "float32") return dtype::kF32;
  if (s == "f16" || s == "float16" || s == "fp16") return dtype::kF16;
  if (s == "bf16" || s == "bfloat16") return dtype::kBF16;
  return std::nullopt;
}

constexpr bool is_valid_dtype(dtype t) noexcept {
  return t == dtype::kF32 || t == dtype::kF16 || t == dtype::kBF16;
}

// Storage types: a 16-bit pattern, so that no arithmetic happens on them by accident.
struct f16_t {
  uint16_t bits;
};
struct bf16_t {
  uint16_t bits;
};
static_assert(sizeof(f16_t) == 2 && sizeof(bf16_t) == 2);

INSTINFER_HOST_DEVICE INSTINFER_INLINE uint32_t float_bits(float f) noexcept {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
INSTINFER_HOST_DEVICE INSTINFER_INLINE float bits_float(uint32_t u) noexcept {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

INSTINFER_HOST_DEVICE INSTINFER_INLINE float bf16_to_float(bf16_t h) noexcept {
  return bits_float(static_cast<uint32_t>(h.bits) << 16);
}

INSTINFER_HOST_DEVICE INSTINFER_INLINE bf16_t float_to_bf16(float f) noexcept {
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{static_cast<uint16_t>((u >> 16) | 0x40u)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return bf16_t{static_cast<uint16_t>(u >> 16)};
}

INSTINFER_HOST_DEVICE INSTINFER_INLINE float f16_to_float(f16_t h) noexcept {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  uint32_t exp = (h.bits >> 10) & 0x1fu;
  uint32_t mant = h.bits & 0x3ffu;
  if (exp == 0x1fu) return bits_float(sign | 0x7f800000u | (mant << 13));  // inf / NaN
  if (exp == 0) {
    if (mant == 0) return bits_float(sign);
    // Subnormal: normalise the mantissa.
    int shift = 0;
    while ((mant & 0x400u) == 0) {
      mant <<= 1;
      ++shift;
    }
    mant &= 0x3ffu;
    return bits_float(sign | ((113u - static_cast<uint32_t>(shift)) << 23) | (mant << 13));
  }
  return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

INSTINFER_HOST_DEVICE INSTINFER_INLINE f16_t float_to_f16(float f) noexcept {
  const uint32_t u = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return f16_t{static_cast<uint16_t>(sign | 0x7e00u)};   // NaN
  if (abs >= 0x477ff000u) return f16_t{static_cast<uint16_t>(sign | 0x7c00u)};  // overflow -> inf
  if (abs < 0x38800000u) {
    // Result is subnormal or zero: shift the implicit-one mantissa into place with RNE.
    if (abs < 0x33000000u) return f16_t{sign};  // below half the smallest subnormal
    const uint32_t e = abs >> 23;
    const uint32_t m = (abs & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - e;  // 14..24 for this range
    uint32_t half = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u);
    const uint32_t mid = 1u << (shift - 1u);
    if (rem > mid || (rem == mid && (half & 1u))) ++half;
    return f16_t{static_cast<uint16_t>(sign | half)};
  }
  uint32_t r = abs - 0x38000000u;  // rebias exponent 127 -> 15
  r += 0xfffu + ((r >> 13) & 1u);  // round to nearest even
  return f16_t{static_cast<uint16_t>(sign | (r >> 13))};
}

// Load element i of a row stored as `t`.
INSTINFER_HOST_DEVICE INSTINFER_INLINE float load_as_float(const void* row, dtype t, uint32_t i) noexcept {
  switch (t) {
    case dtype::kF32: return static_cast<const float*>(row)[i];
    case dtype::kF16: return f16_to_float(static_cast<const f16_t*>(row)[i]);
    case dtype::kBF16: return bf16_to_float(static_cast<const bf16_t*>(row)[i]);
  }
  return 0.0f;
}

INSTINFER_HOST_DEVICE INSTINFER_INLINE void store_from_float(void* row, dtype t, uint32_t i, float v) noexcept {
  switch (t) {
    case dtype::kF32: static_cast<float*>(row)[i] = v; break;
    case dtype::kF16: static_cast<f16_t*>(row)[i] = float_to_f16(v); break;
    case dtype::kBF16: static_cast<bf16_t*>(row)[i] = float_to_bf16(v); break;
  }
}

// Convert n elements between storage types (same type: a plain copy).
inline void convert_elements(const void* src, dtype src_t, void* dst, dtype dst_t, size_t n) noexcept {
  if (src_t == dst_t) {
    std::memcpy(dst, src, n * dtype_size(src_t));
    return;
  }
  for (size_t i = 0; i < n; ++i)
    store_from_float(dst, dst_t, static_cast<uint32_t>(i), load_as_float(src, src_t, static_cast<uint32_t>(i)));
}

}  // namespace instinfer
