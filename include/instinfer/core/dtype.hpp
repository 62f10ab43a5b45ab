// Element types of the KV cache and their scalar conversions.
//
// xsimd 8.1 has no half-precision types, so the bit-exact conversions live here once and are
// shared by host, CSD and CUDA code (round-to-nearest-even, NaN and infinity preserved).
//
// Two block-quantized types follow ggml's block formats byte for byte (32 values per block):
//   q8_0: f16 d = amax / 127, then 32 int8 q = roundf(x / d) (half away from zero); x = q * d.
//         34 bytes.
//   q4_0: f16 d = m / -8 (m: the first value of largest magnitude, with its sign), then 16 bytes
//         of nibbles q = min(15, trunc(x / d + 8.5)), elements 0..15 in the low nibbles of bytes
//         0..15 and elements 16..31 in the high nibbles; x = (q - 8) * d. 18 bytes.
// A quantized type has no per-element size: a row of n elements (n a multiple of 32) takes
// dtype_row_bytes(t, n) bytes. dtype_size() is the element size of the dense types only.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string_view>

#include "instinfer/core/config.hpp"

namespace instinfer {

// The values are the C API's instinfer_dtype (new types are appended).
enum class dtype : uint8_t { kF32 = 0, kF16 = 1, kBF16 = 2, kQ8_0 = 3, kQ4_0 = 4 };

constexpr bool is_valid_dtype(dtype t) noexcept {
  return t == dtype::kF32 || t == dtype::kF16 || t == dtype::kBF16 || t == dtype::kQ8_0 || t == dtype::kQ4_0;
}

constexpr bool is_quantized(dtype t) noexcept {
  return t == dtype::kQ8_0 || t == dtype::kQ4_0;
}

// Values per block (1 for the dense types) and bytes per block.
inline constexpr uint32_t kQuantBlock = 32;
constexpr uint32_t dtype_block_elems(dtype t) noexcept {
  return is_quantized(t) ? kQuantBlock : 1u;
}
constexpr uint32_t dtype_block_bytes(dtype t) noexcept {
  switch (t) {
    case dtype::kF32: return 4;
    case dtype::kF16:
    case dtype::kBF16: return 2;
    case dtype::kQ8_0: return 34;
    case dtype::kQ4_0: return 18;
  }
  return 0;
}

// Bytes of one element of a dense type; 0 for the quantized types (use dtype_row_bytes).
constexpr uint32_t dtype_size(dtype t) noexcept {
  return is_quantized(t) ? 0u : dtype_block_bytes(t);
}

// n elements can be stored as t (whole blocks).
constexpr bool dtype_holds(dtype t, uint64_t n) noexcept {
  return n % dtype_block_elems(t) == 0;
}

// Bytes of n elements stored as t; precondition: dtype_holds(t, n).
constexpr uint64_t dtype_row_bytes(dtype t, uint64_t n) noexcept {
  return n / dtype_block_elems(t) * dtype_block_bytes(t);
}

constexpr std::string_view dtype_name(dtype t) noexcept {
  switch (t) {
    case dtype::kF32: return "f32";
    case dtype::kF16: return "f16";
    case dtype::kBF16: return "bf16";
    case dtype::kQ8_0: return "q8_0";
    case dtype::kQ4_0: return "q4_0";
  }
  return "?";
}

constexpr std::optional<dtype> parse_dtype(std::string_view s) noexcept {
  if (s == "f32" || s == "float32") return dtype::kF32;
  if (s == "f16" || s == "float16" || s == "fp16") return dtype::kF16;
  if (s == "bf16" || s == "bfloat16") return dtype::kBF16;
  if (s == "q8_0") return dtype::kQ8_0;
  if (s == "q4_0") return dtype::kQ4_0;
  return std::nullopt;
}

// Rows of `from` can be stored in a cache of `to`: the same type (copied), f32 into any type,
// and f16 / bf16 into a quantized type (quantized from their float values).
constexpr bool is_convertible(dtype from, dtype to) noexcept {
  return is_valid_dtype(from) && is_valid_dtype(to) &&
         (from == to || from == dtype::kF32 || (is_quantized(to) && !is_quantized(from)));
}

static_assert(dtype_row_bytes(dtype::kQ8_0, 128) == 4 * 34 && dtype_row_bytes(dtype::kQ4_0, 128) == 4 * 18);
static_assert(dtype_row_bytes(dtype::kF16, 128) == 256 && !dtype_holds(dtype::kQ4_0, 48));

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

// ---- ggml's block formats ------------------------------------------------------------------

struct block_q8_0 {
  f16_t d;
  int8_t qs[kQuantBlock];
};
struct block_q4_0 {
  f16_t d;
  uint8_t qs[kQuantBlock / 2];
};
static_assert(sizeof(block_q8_0) == 34 && sizeof(block_q4_0) == 18);

// Element i (< 32) of a block, dequantized. Exact in float: an f16 scale times a small integer
// needs at most 11 + 5 significant bits.
INSTINFER_HOST_DEVICE INSTINFER_INLINE float dequantize_q8_0(const std::byte* block, uint32_t i) noexcept {
  f16_t d;
  std::memcpy(&d, block, sizeof d);
  return static_cast<float>(static_cast<int8_t>(block[2 + i])) * f16_to_float(d);
}
INSTINFER_HOST_DEVICE INSTINFER_INLINE float dequantize_q4_0(const std::byte* block, uint32_t i) noexcept {
  f16_t d;
  std::memcpy(&d, block, sizeof d);
  const uint32_t byte = static_cast<uint32_t>(block[2 + (i & 15u)]);
  const int nibble = static_cast<int>(i < 16 ? byte & 0xfu : byte >> 4);
  return static_cast<float>(nibble - 8) * f16_to_float(d);
}

namespace detail {
// x * y rounded to float on its own: a following add must not fuse with it into one fma (GCC
// contracts across statements unless -ffp-contract=off, and aarch64 or -mfma builds have fma),
// since ggml's reference rounds the product first.
inline float product_rounded(float x, float y) noexcept {
  volatile float p = x * y;
  return p;
}
inline bool finite(float x) noexcept {
  return (float_bits(x) & 0x7f800000u) != 0x7f800000u;
}
}  // namespace detail

// Quantize 32 floats into one block exactly as ggml's quantize_row_q8_0_ref / _q4_0_ref do.
// Where ggml's C is undefined (1/d overflows when every |x| < ~3.7e-37: x * id is +-inf or NaN),
// the integer saturates (q8_0 to +-127, q4_0 to 0 or 15) and NaN counts as the value 0.
// Returns false, after writing the block, when an input is not finite or the f16 scale overflows
// (|x| too large for the format): such a block does not dequantize to anything useful.
inline bool quantize_q8_0(const float* x, std::byte* block) noexcept {
  bool ok = true;
  float amax = 0.0f;
  for (uint32_t j = 0; j < kQuantBlock; ++j) {
    ok = ok && detail::finite(x[j]);
    const float a = std::fabs(x[j]);
    amax = amax > a ? amax : a;  // ggml's MAX(amax, fabsf(v))
  }
  const float d = amax / 127.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  block_q8_0 b;
  b.d = float_to_f16(d);
  for (uint32_t j = 0; j < kQuantBlock; ++j) {
    float r = std::round(x[j] * id);  // roundf: half away from zero
    if (!(r == r)) r = 0.0f;
    r = r > 127.0f ? 127.0f : (r < -127.0f ? -127.0f : r);
    b.qs[j] = static_cast<int8_t>(r);
  }
  std::memcpy(block, &b, sizeof b);
  return ok && (b.d.bits & 0x7c00u) != 0x7c00u;
}

inline bool quantize_q4_0(const float* x, std::byte* block) noexcept {
  bool ok = true;
  float amax = 0.0f, max = 0.0f;
  for (uint32_t j = 0; j < kQuantBlock; ++j) {
    ok = ok && detail::finite(x[j]);
    if (amax < std::fabs(x[j])) {  // the first value of largest magnitude wins a tie
      amax = std::fabs(x[j]);
      max = x[j];
    }
  }
  const float d = max / -8.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  block_q4_0 b;
  b.d = float_to_f16(d);
  const auto nibble = [id](float v) -> uint32_t {
    const float t = detail::product_rounded(v, id) + 8.5f;
    if (!(t == t)) return 8;  // 0 * inf: the value 0
    if (t < 0.0f) return 0;
    return t >= 15.0f ? 15u : static_cast<uint32_t>(t);  // (int8_t) truncation, then MIN(15, .)
  };
  for (uint32_t j = 0; j < kQuantBlock / 2; ++j)
    b.qs[j] = static_cast<uint8_t>(nibble(x[j]) | (nibble(x[j + kQuantBlock / 2]) << 4));
  std::memcpy(block, &b, sizeof b);
  return ok && (b.d.bits & 0x7c00u) != 0x7c00u;
}

// Load element i of a row stored as `t` (a quantized row starts at a block).
INSTINFER_HOST_DEVICE INSTINFER_INLINE float load_as_float(const void* row, dtype t, uint32_t i) noexcept {
  switch (t) {
    case dtype::kF32: return static_cast<const float*>(row)[i];
    case dtype::kF16: return f16_to_float(static_cast<const f16_t*>(row)[i]);
    case dtype::kBF16: return bf16_to_float(static_cast<const bf16_t*>(row)[i]);
    case dtype::kQ8_0: return dequantize_q8_0(static_cast<const std::byte*>(row) + (i / kQuantBlock) * 34, i % 32);
    case dtype::kQ4_0: return dequantize_q4_0(static_cast<const std::byte*>(row) + (i / kQuantBlock) * 18, i % 32);
  }
  return 0.0f;
}

// Store element i of a row of a dense type. A quantized value depends on its whole block: use
// convert_elements for those (this stores nothing for them).
INSTINFER_HOST_DEVICE INSTINFER_INLINE void store_from_float(void* row, dtype t, uint32_t i, float v) noexcept {
  switch (t) {
    case dtype::kF32: static_cast<float*>(row)[i] = v; break;
    case dtype::kF16: static_cast<f16_t*>(row)[i] = float_to_f16(v); break;
    case dtype::kBF16: static_cast<bf16_t*>(row)[i] = float_to_bf16(v); break;
    case dtype::kQ8_0:
    case dtype::kQ4_0: break;
  }
}

// Convert n elements between storage types (same type: a plain copy). With a quantized type on
// either side n is a multiple of 32 (dtype_holds). Returns false when a block quantized on the
// way had a non-finite input or a scale beyond f16 (see quantize_q8_0); the bytes are written
// anyway.
inline bool convert_elements(const void* src, dtype src_t, void* dst, dtype dst_t, size_t n) noexcept {
  if (src_t == dst_t) {
    std::memcpy(dst, src, dtype_row_bytes(src_t, n));
    return true;
  }
  if (!is_quantized(src_t) && !is_quantized(dst_t)) {
    for (size_t i = 0; i < n; ++i)
      store_from_float(dst, dst_t, static_cast<uint32_t>(i), load_as_float(src, src_t, static_cast<uint32_t>(i)));
    return true;
  }
  // Block by block through 32 floats.
  const auto* s = static_cast<const std::byte*>(src);
  auto* d = static_cast<std::byte*>(dst);
  const uint32_t sb = dtype_block_bytes(src_t) * (is_quantized(src_t) ? 1u : kQuantBlock);
  const uint32_t db = dtype_block_bytes(dst_t) * (is_quantized(dst_t) ? 1u : kQuantBlock);
  bool ok = true;
  float x[kQuantBlock];
  for (size_t b = 0; b < n / kQuantBlock; ++b, s += sb, d += db) {
    for (uint32_t j = 0; j < kQuantBlock; ++j) x[j] = load_as_float(s, src_t, j);
    switch (dst_t) {
      case dtype::kQ8_0: ok = quantize_q8_0(x, d) && ok; break;
      case dtype::kQ4_0: ok = quantize_q4_0(x, d) && ok; break;
      default:
        for (uint32_t j = 0; j < kQuantBlock; ++j) store_from_float(d, dst_t, j, x[j]);
    }
  }
  return ok;
}

}  // namespace instinfer
