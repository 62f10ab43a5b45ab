#include "quant.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "quant_blocks.hpp"

namespace instinfer::model {

#if defined(__x86_64__) || defined(__i386__)
#define INSTINFER_GEN_HAVE_AVX2 1
matmul_fn matmul_kernel_avx2(ggml_type t) noexcept;  // quant_avx2.cpp, built with -mavx2 -mfma -mf16c
matmul_q8_fn matmul_q8_kernel_avx2(ggml_type t) noexcept;
void quantize_act_avx2(const float* x, uint32_t n, act_block* out) noexcept;
#endif

std::string_view ggml_type_name(uint32_t id) noexcept {
  static constexpr std::string_view names[] = {
      "f32",     "f16",   "q4_0",   "q4_1",  "q4_2 (removed)", "q4_3 (removed)", "q5_0", "q5_1",    "q8_0",
      "q8_1",    "q2_K",  "q3_K",   "q4_K",  "q5_K",           "q6_K",           "q8_K", "iq2_xxs", "iq2_xs",
      "iq3_xxs", "iq1_s", "iq4_nl", "iq3_s", "iq2_s",          "iq4_xs",         "i8",   "i16",     "i32",
      "i64",     "f64",   "iq1_m",  "bf16"};
  if (id < std::size(names)) return names[id];
  return "unknown";
}

std::optional<ggml_type> to_ggml_type(uint32_t id) noexcept {
  switch (id) {
    case 0: return ggml_type::kF32;
    case 1: return ggml_type::kF16;
    case 2: return ggml_type::kQ4_0;
    case 3: return ggml_type::kQ4_1;
    case 8: return ggml_type::kQ8_0;
    case 30: return ggml_type::kBF16;
    default: return std::nullopt;
  }
}

void dequantize_row(ggml_type t, const std::byte* src, float* dst, uint64_t n) noexcept {
  if (ggml_block_size(t) == 1) {
    for (uint64_t i = 0; i < n; ++i) dst[i] = detail::load_weight(t, src, i);
    return;
  }
  const uint32_t bb = ggml_block_bytes(t);
  for (uint64_t b = 0; b < n / 32; ++b) detail::decode_block(t, src + b * bb, dst + b * 32);
}

namespace {

// Scalar reference kernels: decode a block once, use it for every vector.
template <ggml_type T>
void matmul_scalar(const std::byte* w, uint64_t row_bytes, uint32_t n_cols, uint64_t r0, uint64_t r1, const float* x,
                   uint64_t x_stride, uint32_t n_vec, float* y, uint64_t y_stride) noexcept {
  constexpr uint32_t kMaxVec = 64;
  float acc[kMaxVec];
  float blk[32];
  for (uint32_t v0 = 0; v0 < n_vec; v0 += kMaxVec) {
    const uint32_t nv = std::min(kMaxVec, n_vec - v0);
    for (uint64_t r = r0; r < r1; ++r) {
      const std::byte* row = w + r * row_bytes;
      std::fill(acc, acc + nv, 0.0f);
      if constexpr (ggml_block_size(T) == 1) {
        for (uint32_t c = 0; c < n_cols; ++c) {
          const float wc = detail::load_weight(T, row, c);
          for (uint32_t v = 0; v < nv; ++v) acc[v] += wc * x[(v0 + v) * x_stride + c];
        }
      } else {
        for (uint32_t b = 0; b < n_cols / 32; ++b) {
          detail::decode_block(T, row + b * ggml_block_bytes(T), blk);
          for (uint32_t v = 0; v < nv; ++v) {
            const float* xv = x + (v0 + v) * x_stride + b * 32;
            float s = 0.0f;
            for (int j = 0; j < 32; ++j) s += blk[j] * xv[j];
            acc[v] += s;
          }
        }
      }
      for (uint32_t v = 0; v < nv; ++v) y[(v0 + v) * y_stride + r] = acc[v];
    }
  }
}

void quantize_act_scalar(const float* x, uint32_t n, act_block* out) noexcept {
  for (uint32_t b = 0; b < n / 32; ++b, x += 32) {
    float amax = 0.0f;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[j]));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    int sum = 0;
    for (int j = 0; j < 32; ++j) {
      // nearbyint rounds to nearest even, as the SIMD conversion does: both give the same blocks.
      const int q = static_cast<int>(std::nearbyint(x[j] * id));
      out[b].qs[j] = static_cast<int8_t>(q);
      sum += q;
    }
    out[b].d = d;
    out[b].s = d * static_cast<float>(sum);
  }
}

// Scalar integer-dot kernels: per block an exact integer dot, scaled by d_w·d_x in f32; the
// Q4 types add their offset times the activation block sum (m·s).
template <ggml_type T>
void matmul_q8_scalar(const std::byte* w, uint64_t row_bytes, uint32_t n_cols, uint64_t r0, uint64_t r1,
                      const act_block* x, uint64_t x_stride, uint32_t n_vec, float* y, uint64_t y_stride) noexcept {
  const uint32_t nb = n_cols / 32;
  int8_t wq[32];
  for (uint64_t r = r0; r < r1; ++r) {
    const std::byte* row = w + r * row_bytes;
    for (uint32_t v = 0; v < n_vec; ++v) {
      const act_block* xv = x + v * x_stride;
      float acc = 0.0f;
      for (uint32_t b = 0; b < nb; ++b) {
        const std::byte* blk = row + b * ggml_block_bytes(T);
        const auto* u = reinterpret_cast<const uint8_t*>(blk);
        const float dw = detail::load_f16(blk);
        float offset = 0.0f;  // the weight every quantum is shifted by: m (Q4_1) or −8·d (Q4_0)
        if constexpr (T == ggml_type::kQ8_0) {
          std::memcpy(wq, u + 2, 32);
        } else {
          constexpr int kOff = T == ggml_type::kQ4_1 ? 4 : 2;
          for (int j = 0; j < 16; ++j) {
            wq[j] = static_cast<int8_t>(u[kOff + j] & 0x0f);
            wq[j + 16] = static_cast<int8_t>(u[kOff + j] >> 4);
          }
          offset = T == ggml_type::kQ4_1 ? detail::load_f16(blk + 2) : -8.0f * dw;
        }
        int dot = 0;
        for (int j = 0; j < 32; ++j) dot += wq[j] * xv[b].qs[j];
        acc += dw * xv[b].d * static_cast<float>(dot) + offset * xv[b].s;
      }
      y[v * y_stride + r] = acc;
    }
  }
}

}  // namespace

quantize_act_fn quantize_act_kernel(kernel_isa isa) noexcept {
  if (isa == kernel_isa::kAvx2) {
#ifdef INSTINFER_GEN_HAVE_AVX2
    return best_kernel_isa() == kernel_isa::kAvx2 ? &quantize_act_avx2 : nullptr;
#else
    return nullptr;
#endif
  }
  return &quantize_act_scalar;
}

matmul_q8_fn matmul_q8_kernel(ggml_type t, kernel_isa isa) noexcept {
  if (isa == kernel_isa::kAvx2) {
#ifdef INSTINFER_GEN_HAVE_AVX2
    return best_kernel_isa() == kernel_isa::kAvx2 ? matmul_q8_kernel_avx2(t) : nullptr;
#else
    return nullptr;
#endif
  }
  switch (t) {
    case ggml_type::kQ4_0: return &matmul_q8_scalar<ggml_type::kQ4_0>;
    case ggml_type::kQ4_1: return &matmul_q8_scalar<ggml_type::kQ4_1>;
    case ggml_type::kQ8_0: return &matmul_q8_scalar<ggml_type::kQ8_0>;
    default: return nullptr;
  }
}

matmul_fn matmul_kernel(ggml_type t, kernel_isa isa) noexcept {
  if (isa == kernel_isa::kAvx2) {
#ifdef INSTINFER_GEN_HAVE_AVX2
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma") || !__builtin_cpu_supports("f16c"))
      return nullptr;
    return matmul_kernel_avx2(t);
#else
    return nullptr;
#endif
  }
  switch (t) {
    case ggml_type::kF32: return &matmul_scalar<ggml_type::kF32>;
    case ggml_type::kF16: return &matmul_scalar<ggml_type::kF16>;
    case ggml_type::kBF16: return &matmul_scalar<ggml_type::kBF16>;
    case ggml_type::kQ4_0: return &matmul_scalar<ggml_type::kQ4_0>;
    case ggml_type::kQ4_1: return &matmul_scalar<ggml_type::kQ4_1>;
    case ggml_type::kQ8_0: return &matmul_scalar<ggml_type::kQ8_0>;
  }
  return nullptr;
}

kernel_isa best_kernel_isa() noexcept {
  return matmul_kernel(ggml_type::kQ4_1, kernel_isa::kAvx2) ? kernel_isa::kAvx2 : kernel_isa::kScalar;
}

std::string_view kernel_isa_name(kernel_isa isa) noexcept {
  return isa == kernel_isa::kAvx2 ? "avx2+fma" : "scalar";
}

}  // namespace instinfer::model
