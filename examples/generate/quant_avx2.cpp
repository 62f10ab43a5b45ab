// AVX2 + FMA + F16C mat-mul kernels on ggml blocks; this file alone is built with those flags and
// is only called after a runtime CPU check (quant.cpp).
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "quant.hpp"
#include "quant_blocks.hpp"

namespace instinfer::model {

namespace {

inline float hsum(__m256 v) noexcept {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline __m256 u8x8_to_ps(__m128i v) noexcept {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
}

// Expand one 32-weight block into w[4] (weights 0-7, 8-15, 16-23, 24-31).
template <ggml_type T>
inline void decode(const std::byte* b, __m256* w) noexcept {
  if constexpr (T == ggml_type::kQ8_0) {
    const __m256 d = _mm256_set1_ps(detail::load_f16(b));
    for (int i = 0; i < 4; ++i) {
      const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 2 + 8 * i));
      w[i] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)));
    }
  } else {
    constexpr int kOff = T == ggml_type::kQ4_1 ? 4 : 2;
    const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + kOff));
    const __m128i mask = _mm_set1_epi8(0x0f);
    const __m128i lo = _mm_and_si128(q, mask);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
    const float df = detail::load_f16(b);
    const __m256 d = _mm256_set1_ps(df);
    const __m256 m = _mm256_set1_ps(T == ggml_type::kQ4_1 ? detail::load_f16(b + 2) : -8.0f * df);
    w[0] = _mm256_fmadd_ps(u8x8_to_ps(lo), d, m);
    w[1] = _mm256_fmadd_ps(u8x8_to_ps(_mm_srli_si128(lo, 8)), d, m);
    w[2] = _mm256_fmadd_ps(u8x8_to_ps(hi), d, m);
    w[3] = _mm256_fmadd_ps(u8x8_to_ps(_mm_srli_si128(hi, 8)), d, m);
  }
}

template <ggml_type T>
inline __m256 load8(const std::byte* row, uint32_t c) noexcept {
  if constexpr (T == ggml_type::kF32) {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(row) + c);
  } else if constexpr (T == ggml_type::kF16) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * c)));
  } else {  // bf16: the upper half of an f32
    const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * c)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
  }
}

// Up to kTile vectors share each decoded block.
constexpr uint32_t kTile = 4;

template <ggml_type T>
void matmul_avx2(const std::byte* w, uint64_t row_bytes, uint32_t n_cols, uint64_t r0, uint64_t r1, const float* x,
                 uint64_t x_stride, uint32_t n_vec, float* y, uint64_t y_stride) noexcept {
  for (uint32_t v0 = 0; v0 < n_vec; v0 += kTile) {
    const uint32_t nv = std::min(kTile, n_vec - v0);
    const float* xs[kTile];
    for (uint32_t v = 0; v < kTile; ++v) xs[v] = x + (v0 + std::min(v, nv - 1)) * x_stride;
    for (uint64_t r = r0; r < r1; ++r) {
      const std::byte* row = w + r * row_bytes;
      __m256 acc[kTile][2];
      for (auto& a : acc) a[0] = a[1] = _mm256_setzero_ps();
      float tail[kTile] = {};
      if constexpr (ggml_block_size(T) == 32) {
        __m256 wb[4];
        for (uint32_t b = 0; b < n_cols / 32; ++b) {
          decode<T>(row + b * ggml_block_bytes(T), wb);
          for (uint32_t v = 0; v < nv; ++v) {
            const float* xv = xs[v] + b * 32;
            acc[v][0] = _mm256_fmadd_ps(wb[0], _mm256_loadu_ps(xv), acc[v][0]);
            acc[v][1] = _mm256_fmadd_ps(wb[1], _mm256_loadu_ps(xv + 8), acc[v][1]);
            acc[v][0] = _mm256_fmadd_ps(wb[2], _mm256_loadu_ps(xv + 16), acc[v][0]);
            acc[v][1] = _mm256_fmadd_ps(wb[3], _mm256_loadu_ps(xv + 24), acc[v][1]);
          }
        }
      } else {
        uint32_t c = 0;
        for (; c + 8 <= n_cols; c += 8) {
          const __m256 wv = load8<T>(row, c);
          for (uint32_t v = 0; v < nv; ++v)
            acc[v][c & 8 ? 1 : 0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xs[v] + c), acc[v][c & 8 ? 1 : 0]);
        }
        for (; c < n_cols; ++c) {
          const float wc = detail::load_weight(T, row, c);
          for (uint32_t v = 0; v < nv; ++v) tail[v] += wc * xs[v][c];
        }
      }
      for (uint32_t v = 0; v < nv; ++v)
        y[(v0 + v) * y_stride + r] = hsum(_mm256_add_ps(acc[v][0], acc[v][1])) + tail[v];
    }
  }
}

// ---- Integer-dot kernels on quantized activations -------------------------------------------

inline float f16_at(const std::byte* p) noexcept {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);  // F16C: the software conversion costs more than the rest of a block
}

// The 32 4-bit quanta of a Q4 block as bytes in weight order (low nibbles are weights 0-15).
inline __m256i q4_bytes(const std::byte* qs) noexcept {
  const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), _mm256_set1_epi8(0x0f));
}

// Σ u[j]·s[j] of unsigned and signed bytes as 8 f32 partial sums. maddubs cannot saturate here:
// |u·s| ≤ 128·127, two per 16-bit lane.
inline __m256 dot_u8_i8(__m256i u, __m256i s) noexcept {
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}

// Rows [r0, r1) against NV vectors: each weight block is loaded and unpacked once for all NV.
template <ggml_type T, int NV>
void rows_q8(const std::byte* w, uint64_t row_bytes, uint32_t nb, uint64_t r0, uint64_t r1, const act_block* const* xs,
             float* y, uint64_t y_stride) noexcept {
  constexpr uint32_t kBB = ggml_block_bytes(T);
  for (uint64_t r = r0; r < r1; ++r) {
    const std::byte* row = w + r * row_bytes;
    // Two accumulator sets on alternate blocks, so one FMA latency chain does not bound a GEMV.
    __m256 acc0[NV], acc1[NV];
    float off[NV];
    for (int v = 0; v < NV; ++v) {
      acc0[v] = acc1[v] = _mm256_setzero_ps();
      off[v] = 0.0f;
    }
    const auto step = [&](uint32_t b, __m256(&acc)[NV]) {
      const std::byte* blk = row + b * kBB;
      const float dw = f16_at(blk);
      if constexpr (T == ggml_type::kQ8_0) {
        const __m256i wq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
        const __m256i wa = _mm256_sign_epi8(wq, wq);  // |w|, with the sign moved onto x
        for (int v = 0; v < NV; ++v) {
          const act_block& xb = xs[v][b];
          const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb.qs));
          acc[v] = _mm256_fmadd_ps(_mm256_set1_ps(dw * xb.d), dot_u8_i8(wa, _mm256_sign_epi8(xq, wq)), acc[v]);
        }
      } else {
        constexpr int kOff = T == ggml_type::kQ4_1 ? 4 : 2;
        const __m256i wq = q4_bytes(blk + kOff);
        const float m = T == ggml_type::kQ4_1 ? f16_at(blk + 2) : -8.0f * dw;
        for (int v = 0; v < NV; ++v) {
          const act_block& xb = xs[v][b];
          const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb.qs));
          acc[v] = _mm256_fmadd_ps(_mm256_set1_ps(dw * xb.d), dot_u8_i8(wq, xq), acc[v]);
          off[v] += m * xb.s;
        }
      }
    };
    uint32_t b = 0;
    for (; b + 1 < nb; b += 2) {
      step(b, acc0);
      step(b + 1, acc1);
    }
    if (b < nb) step(b, acc0);
    for (int v = 0; v < NV; ++v) y[v * y_stride + r] = hsum(_mm256_add_ps(acc0[v], acc1[v])) + off[v];
  }
}

template <ggml_type T>
void matmul_q8_avx2(const std::byte* w, uint64_t row_bytes, uint32_t n_cols, uint64_t r0, uint64_t r1,
                    const act_block* x, uint64_t x_stride, uint32_t n_vec, float* y, uint64_t y_stride) noexcept {
  const uint32_t nb = n_cols / 32;
  for (uint32_t v0 = 0; v0 < n_vec; v0 += kTile) {
    const uint32_t nv = std::min(kTile, n_vec - v0);
    const act_block* xs[kTile];
    for (uint32_t v = 0; v < nv; ++v) xs[v] = x + (v0 + v) * x_stride;
    float* yv = y + v0 * y_stride;
    switch (nv) {
      case 1: rows_q8<T, 1>(w, row_bytes, nb, r0, r1, xs, yv, y_stride); break;
      case 2: rows_q8<T, 2>(w, row_bytes, nb, r0, r1, xs, yv, y_stride); break;
      case 3: rows_q8<T, 3>(w, row_bytes, nb, r0, r1, xs, yv, y_stride); break;
      default: rows_q8<T, 4>(w, row_bytes, nb, r0, r1, xs, yv, y_stride); break;
    }
  }
}

}  // namespace

void quantize_act_avx2(const float* x, uint32_t n, act_block* out) noexcept {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (uint32_t b = 0; b < n / 32; ++b, x += 32) {
    __m256 v[4];
    for (int i = 0; i < 4; ++i) v[i] = _mm256_loadu_ps(x + 8 * i);
    const __m256 a = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                                   _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    // The same scalar steps as quantize_act_scalar, so both give identical blocks.
    const float d = _mm_cvtss_f32(m) / 127.0f;
    const __m256 id = _mm256_set1_ps(d != 0.0f ? 1.0f / d : 0.0f);
    __m256i q[4];
    for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], id));  // nearest even
    const __m256i s8 = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s8), _mm256_extracti128_si256(s8, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
    // packs interleave the two 128-bit lanes; the permute puts the 32 bytes back in order.
    const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[b].qs),
                        _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    out[b].d = d;
    out[b].s = d * static_cast<float>(_mm_cvtsi128_si32(s4));
  }
}

matmul_q8_fn matmul_q8_kernel_avx2(ggml_type t) noexcept {
  switch (t) {
    case ggml_type::kQ4_0: return &matmul_q8_avx2<ggml_type::kQ4_0>;
    case ggml_type::kQ4_1: return &matmul_q8_avx2<ggml_type::kQ4_1>;
    case ggml_type::kQ8_0: return &matmul_q8_avx2<ggml_type::kQ8_0>;
    default: return nullptr;
  }
}

matmul_fn matmul_kernel_avx2(ggml_type t) noexcept {
  switch (t) {
    case ggml_type::kF32: return &matmul_avx2<ggml_type::kF32>;
    case ggml_type::kF16: return &matmul_avx2<ggml_type::kF16>;
    case ggml_type::kBF16: return &matmul_avx2<ggml_type::kBF16>;
    case ggml_type::kQ4_0: return &matmul_avx2<ggml_type::kQ4_0>;
    case ggml_type::kQ4_1: return &matmul_avx2<ggml_type::kQ4_1>;
    case ggml_type::kQ8_0: return &matmul_avx2<ggml_type::kQ8_0>;
  }
  return nullptr;
}

}  // namespace instinfer::model
