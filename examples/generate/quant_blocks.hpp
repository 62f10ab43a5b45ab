// Scalar decoding of one 32-weight block, shared by the scalar kernels and the SIMD tails.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "instinfer/core/dtype.hpp"
#include "quant.hpp"

namespace instinfer::model::detail {

inline float load_f16(const std::byte* p) noexcept {
  f16_t h;
  std::memcpy(&h.bits, p, 2);  // blocks are 2-byte aligned at best: never dereference directly
  return f16_to_float(h);
}
inline float load_bf16(const std::byte* p) noexcept {
  bf16_t h;
  std::memcpy(&h.bits, p, 2);
  return bf16_to_float(h);
}

// Decode the 32 weights of one block of a quantized type into out[32].
inline void decode_block(ggml_type t, const std::byte* b, float* out) noexcept {
  const auto* u = reinterpret_cast<const uint8_t*>(b);
  switch (t) {
    case ggml_type::kQ4_0: {
      const float d = load_f16(b);
      for (int j = 0; j < 16; ++j) {
        out[j] = d * static_cast<float>(static_cast<int>(u[2 + j] & 0x0f) - 8);
        out[j + 16] = d * static_cast<float>(static_cast<int>(u[2 + j] >> 4) - 8);
      }
      break;
    }
    case ggml_type::kQ4_1: {
      const float d = load_f16(b), m = load_f16(b + 2);
      for (int j = 0; j < 16; ++j) {
        out[j] = d * static_cast<float>(u[4 + j] & 0x0f) + m;
        out[j + 16] = d * static_cast<float>(u[4 + j] >> 4) + m;
      }
      break;
    }
    case ggml_type::kQ8_0: {
      const float d = load_f16(b);
      for (int j = 0; j < 32; ++j) out[j] = d * static_cast<float>(static_cast<int8_t>(u[2 + j]));
      break;
    }
    default: break;
  }
}

inline float load_weight(ggml_type t, const std::byte* row, uint64_t i) noexcept {
  switch (t) {
    case ggml_type::kF32: {
      float f;
      std::memcpy(&f, row + 4 * i, 4);
      return f;
    }
    case ggml_type::kF16: return load_f16(row + 2 * i);
    case ggml_type::kBF16: return load_bf16(row + 2 * i);
    default: return 0.0f;
  }
}

}  // namespace instinfer::model::detail
