// ggml tensor element types: block formats, dequantisation and mat-mul kernels on the blocks.
//
// Block formats (little endian, 32 weights per block, f16 = IEEE half):
//   Q4_0 (18 B): f16 d;         u8 qs[16]  w[j] = d·(lo(qs[j]) − 8), w[j+16] = d·(hi(qs[j]) − 8)
//   Q4_1 (20 B): f16 d, f16 m;  u8 qs[16]  w[j] = d·lo(qs[j]) + m,   w[j+16] = d·hi(qs[j]) + m
//   Q8_0 (34 B): f16 d;         i8 qs[32]  w[j] = d·qs[j]
// F32, F16 and BF16 rows are plain arrays. A row of ne0 weights is ne0/32 consecutive blocks.
//
// Two kernel families. matmul_fn keeps activations in f32 and expands each weight block to f32
// in registers (exact up to f32 rounding; every type). matmul_q8_fn (Q4_0, Q4_1, Q8_0 weights)
// takes activations quantized once per matmul to 8-bit blocks (act_block, ggml's q8_1 layout in
// spirit) and uses integer dot products per block: the activation rounding (at most d/2 per
// element, d = block max|x| / 127) is the only extra error, and it is what makes the integer
// kernels about twice as fast as unpacking to floats. Both expand or load each weight block once
// for all the vectors of a batch, so prefill chunks read every weight byte once per call.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

namespace instinfer::model {

enum class ggml_type : uint32_t {
  kF32 = 0,
  kF16 = 1,
  kQ4_0 = 2,
  kQ4_1 = 3,
  kQ8_0 = 8,
  kBF16 = 30,
};

// Name of any ggml type id, including the ones we do not support ("q6_K"), for messages.
std::string_view ggml_type_name(uint32_t id) noexcept;
// The supported types; nullopt for any other id.
std::optional<ggml_type> to_ggml_type(uint32_t id) noexcept;

constexpr uint32_t ggml_block_size(ggml_type t) noexcept {
  switch (t) {
    case ggml_type::kF32:
    case ggml_type::kF16:
    case ggml_type::kBF16: return 1;
    case ggml_type::kQ4_0:
    case ggml_type::kQ4_1:
    case ggml_type::kQ8_0: return 32;
  }
  return 1;
}
constexpr uint32_t ggml_block_bytes(ggml_type t) noexcept {
  switch (t) {
    case ggml_type::kF32: return 4;
    case ggml_type::kF16:
    case ggml_type::kBF16: return 2;
    case ggml_type::kQ4_0: return 18;
    case ggml_type::kQ4_1: return 20;
    case ggml_type::kQ8_0: return 34;
  }
  return 0;
}
// Bytes of a row of n weights (n must be a multiple of the block size).
constexpr uint64_t ggml_row_bytes(ggml_type t, uint64_t n) noexcept {
  return n / ggml_block_size(t) * ggml_block_bytes(t);
}

// Expand one row of n weights to f32.
void dequantize_row(ggml_type t, const std::byte* src, float* dst, uint64_t n) noexcept;

// y[v * y_stride + r] = Σ_c W[r][c] · x[v * x_stride + c] for rows r in [r0, r1) and vectors
// v in [0, n_vec). W: rows of `row_bytes` bytes of type t, n_cols weights each.
using matmul_fn = void (*)(const std::byte* w, uint64_t row_bytes, uint32_t n_cols, uint64_t r0, uint64_t r1,
                           const float* x, uint64_t x_stride, uint32_t n_vec, float* y, uint64_t y_stride) noexcept;

enum class kernel_isa { kScalar, kAvx2 };
// The kernel for t on the given ISA; nullptr when that ISA is not compiled in or not present.
matmul_fn matmul_kernel(ggml_type t, kernel_isa isa) noexcept;

// 32 activations as x[j] ≈ d·qs[j]: d = max|x| / 127, qs[j] = round-to-nearest-even(x[j] / d),
// s = d·Σ qs[j] (the term a block's offset multiplies: Q4_1's m, Q4_0's −8·d_w).
struct act_block {
  float d;
  float s;
  int8_t qs[32];
};
// Quantize n activations (n a multiple of 32) into n / 32 blocks. Every ISA gives the same blocks.
using quantize_act_fn = void (*)(const float* x, uint32_t n, act_block* out) noexcept;
quantize_act_fn quantize_act_kernel(kernel_isa isa) noexcept;
// As matmul_fn on quantized activations: vector v is the n_cols / 32 blocks at x + v * x_stride.
using matmul_q8_fn = void (*)(const std::byte* w, uint64_t row_bytes, uint32_t n_cols, uint64_t r0, uint64_t r1,
                              const act_block* x, uint64_t x_stride, uint32_t n_vec, float* y,
                              uint64_t y_stride) noexcept;
// Q4_0, Q4_1 and Q8_0 have one; nullptr for the other types or an ISA that is not here.
matmul_q8_fn matmul_q8_kernel(ggml_type t, kernel_isa isa) noexcept;
// The best kernel this machine runs.
kernel_isa best_kernel_isa() noexcept;
std::string_view kernel_isa_name(kernel_isa isa) noexcept;

}  // namespace instinfer::model
