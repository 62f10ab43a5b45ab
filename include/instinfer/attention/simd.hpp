// The small SIMD vocabulary the decode kernel is written against.
//
// `simd_ops<Arch>` gives one float vector type and the handful of operations the kernel needs
// (fma, max, exp, tanh, a transposing horizontal add, and loads of KV rows stored as f32 / f16 /
// bf16, widened to f32). For the quantized types (q8_0, q4_0: core/dtype.hpp) three primitives
// widen kLanes (<= 16) values of one block to f32 in registers: `load_q8` (int8), `load_q4`
// (nibbles at bit `shift` of kLanes bytes, minus 8) and `load_scale` (the block's f16 scale,
// broadcast); decode_kernel.hpp's load_row_vec multiplies them. None reads past the kLanes bytes
// it converts (a row's last block may end its page). Arch is an xsimd arch tag (avx512bw, fma3<avx2>, neon64) or
// `scalar_arch`, the portable fallback with one lane.
//
// xsimd 8.1 has no half-precision types, so the f16 widening uses F16C (x86) or vcvt (NEON)
// directly; each specialisation exists only when its translation unit is compiled with the
// matching flags (src/kernels/decode_<isa>.cpp), so this header is safe to include anywhere.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include <xsimd/xsimd.hpp>

#include "instinfer/core/config.hpp"
#include "instinfer/core/dtype.hpp"

#if defined(__AVX2__) || defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif
#if defined(__aarch64__)
#include <arm_neon.h>
#endif

namespace instinfer::simd {

// The portable fallback: one float per "vector", scalar conversions from core/dtype.hpp.
struct scalar_arch {
  static constexpr const char* name() noexcept { return "scalar"; }
};

template <class Arch>
struct simd_ops;

// Operations shared by every xsimd arch; the KV-row loads are per arch below.
template <class Arch>
struct xsimd_ops_base {
  using vec = xsimd::batch<float, Arch>;
  static constexpr uint32_t kLanes = static_cast<uint32_t>(vec::size);

  static INSTINFER_INLINE vec zero() noexcept { return vec(0.0f); }
  static INSTINFER_INLINE vec broadcast(float x) noexcept { return vec(x); }
  static INSTINFER_INLINE vec load(const float* p) noexcept { return vec::load_unaligned(p); }
  static INSTINFER_INLINE void store(float* p, vec v) noexcept { v.store_unaligned(p); }
  static INSTINFER_INLINE vec fma(vec a, vec b, vec c) noexcept { return xsimd::fma(a, b, c); }
  static INSTINFER_INLINE vec max(vec a, vec b) noexcept { return xsimd::max(a, b); }
  static INSTINFER_INLINE vec exp(vec x) noexcept { return xsimd::exp(x); }
  static INSTINFER_INLINE vec tanh(vec x) noexcept { return xsimd::tanh(x); }
  // Lane i of the result is the sum of the lanes of rows[i] (kLanes rows).
  static INSTINFER_INLINE vec haddp(const vec* rows) noexcept { return xsimd::haddp(rows); }
  static INSTINFER_INLINE void prefetch(const void* p) noexcept { __builtin_prefetch(p, 0, 3); }
};

template <>
struct simd_ops<scalar_arch> {
  using vec = float;
  static constexpr uint32_t kLanes = 1;

  static INSTINFER_INLINE vec zero() noexcept { return 0.0f; }
  static INSTINFER_INLINE vec broadcast(float x) noexcept { return x; }
  static INSTINFER_INLINE vec load(const float* p) noexcept { return *p; }
  static INSTINFER_INLINE void store(float* p, vec v) noexcept { *p = v; }
  static INSTINFER_INLINE vec fma(vec a, vec b, vec c) noexcept { return std::fma(a, b, c); }
  static INSTINFER_INLINE vec max(vec a, vec b) noexcept { return a > b ? a : b; }
  static INSTINFER_INLINE vec exp(vec x) noexcept { return std::exp(x); }
  static INSTINFER_INLINE vec tanh(vec x) noexcept { return std::tanh(x); }
  static INSTINFER_INLINE vec haddp(const vec* rows) noexcept { return rows[0]; }
  static INSTINFER_INLINE void prefetch(const void* p) noexcept { __builtin_prefetch(p, 0, 3); }

  template <dtype T>
  static INSTINFER_INLINE vec load_kv(const std::byte* p) noexcept {
    if constexpr (T == dtype::kF32) {
      float f;
      std::memcpy(&f, p, sizeof f);
      return f;
    } else if constexpr (T == dtype::kF16) {
      f16_t h;
      std::memcpy(&h, p, sizeof h);
      return f16_to_float(h);
    } else {
      bf16_t h;
      std::memcpy(&h, p, sizeof h);
      return bf16_to_float(h);
    }
  }
  static INSTINFER_INLINE vec load_scale(const std::byte* p) noexcept {
    f16_t h;
    std::memcpy(&h, p, sizeof h);
    return f16_to_float(h);
  }
  static INSTINFER_INLINE vec load_q8(const std::byte* p) noexcept {
    return static_cast<float>(static_cast<int8_t>(*p));
  }
  static INSTINFER_INLINE vec load_q4(const std::byte* p, uint32_t shift) noexcept {
    return static_cast<float>(static_cast<int>((static_cast<uint32_t>(*p) >> shift) & 0xfu) - 8);
  }
};

#if defined(__AVX512F__) && defined(__AVX512BW__)
template <>
struct simd_ops<xsimd::avx512bw> : xsimd_ops_base<xsimd::avx512bw> {
  // xsimd 8.1's avx512 haddp returns its sums in a permuted lane order; this one keeps lane i =
  // sum(rows[i]) in 45 shuffles and adds: pairs within 128-bit lanes, then across them.
  static INSTINFER_INLINE vec haddp(const vec* rows) noexcept {
    __m512 t[4];
    for (int g = 0; g < 4; ++g) {
      const __m512 r0 = rows[4 * g], r1 = rows[4 * g + 1], r2 = rows[4 * g + 2], r3 = rows[4 * g + 3];
      const __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(r0, r1), _mm512_unpackhi_ps(r0, r1));
      const __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(r2, r3), _mm512_unpackhi_ps(r2, r3));
      // per 128-bit lane: [r0, r1, r2, r3] partial sums
      t[g] = _mm512_add_ps(_mm512_shuffle_ps(s01, s23, _MM_SHUFFLE(1, 0, 1, 0)),
                           _mm512_shuffle_ps(s01, s23, _MM_SHUFFLE(3, 2, 3, 2)));
    }
    const __m512 v01 = _mm512_add_ps(_mm512_shuffle_f32x4(t[0], t[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                     _mm512_shuffle_f32x4(t[0], t[1], _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512 v23 = _mm512_add_ps(_mm512_shuffle_f32x4(t[2], t[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                     _mm512_shuffle_f32x4(t[2], t[3], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(v01, v23, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(v01, v23, _MM_SHUFFLE(3, 1, 3, 1)));
  }

  template <dtype T>
  static INSTINFER_INLINE vec load_kv(const std::byte* p) noexcept {
    if constexpr (T == dtype::kF32) {
      return _mm512_loadu_ps(p);
    } else if constexpr (T == dtype::kF16) {
      return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    } else {
      const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
      return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
    }
  }
  static INSTINFER_INLINE vec load_scale(const std::byte* p) noexcept {
    uint16_t h;
    std::memcpy(&h, p, sizeof h);
    return _mm512_set1_ps(_cvtsh_ss(h));
  }
  static INSTINFER_INLINE vec load_q8(const std::byte* p) noexcept {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static INSTINFER_INLINE vec load_q4(const std::byte* p, uint32_t shift) noexcept {
    const __m512i w = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m512i n =
        _mm512_and_si512(_mm512_srl_epi32(w, _mm_cvtsi32_si128(static_cast<int>(shift))), _mm512_set1_epi32(0xf));
    return _mm512_cvtepi32_ps(_mm512_sub_epi32(n, _mm512_set1_epi32(8)));
  }
};
#endif

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
template <>
struct simd_ops<xsimd::fma3<xsimd::avx2>> : xsimd_ops_base<xsimd::fma3<xsimd::avx2>> {
  template <dtype T>
  static INSTINFER_INLINE vec load_kv(const std::byte* p) noexcept {
    if constexpr (T == dtype::kF32) {
      return _mm256_loadu_ps(reinterpret_cast<const float*>(p));
    } else if constexpr (T == dtype::kF16) {
      return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    } else {
      const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
    }
  }
  static INSTINFER_INLINE vec load_scale(const std::byte* p) noexcept {
    uint16_t h;
    std::memcpy(&h, p, sizeof h);
    return _mm256_set1_ps(_cvtsh_ss(h));
  }
  static INSTINFER_INLINE vec load_q8(const std::byte* p) noexcept {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static INSTINFER_INLINE vec load_q4(const std::byte* p, uint32_t shift) noexcept {
    const __m256i w = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    const __m256i n =
        _mm256_and_si256(_mm256_srl_epi32(w, _mm_cvtsi32_si128(static_cast<int>(shift))), _mm256_set1_epi32(0xf));
    return _mm256_cvtepi32_ps(_mm256_sub_epi32(n, _mm256_set1_epi32(8)));
  }
};
#endif

#if defined(__aarch64__)
template <>
struct simd_ops<xsimd::neon64> : xsimd_ops_base<xsimd::neon64> {
  template <dtype T>
  static INSTINFER_INLINE vec load_kv(const std::byte* p) noexcept {
    if constexpr (T == dtype::kF32) {
      return vld1q_f32(reinterpret_cast<const float*>(p));
    } else if constexpr (T == dtype::kF16) {
      return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(reinterpret_cast<const uint16_t*>(p))));
    } else {
      return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(reinterpret_cast<const uint16_t*>(p)), 16));
    }
  }
  static INSTINFER_INLINE vec load_scale(const std::byte* p) noexcept {
    uint16_t h;
    std::memcpy(&h, p, sizeof h);
    return vdupq_n_f32(vgetq_lane_f32(vcvt_f32_f16(vreinterpret_f16_u16(vdup_n_u16(h))), 0));
  }
  // Four bytes, read as one 32-bit word (a 64-bit vld1 would read past them).
  static INSTINFER_INLINE uint8x8_t load4(const std::byte* p) noexcept {
    uint32_t w;
    std::memcpy(&w, p, sizeof w);
    return vreinterpret_u8_u32(vdup_n_u32(w));
  }
  static INSTINFER_INLINE vec load_q8(const std::byte* p) noexcept {
    const int16x8_t w = vmovl_s8(vreinterpret_s8_u8(load4(p)));
    return vcvtq_f32_s32(vmovl_s16(vget_low_s16(w)));
  }
  static INSTINFER_INLINE vec load_q4(const std::byte* p, uint32_t shift) noexcept {
    const uint32x4_t w = vmovl_u16(vget_low_u16(vmovl_u8(load4(p))));
    const uint32x4_t n = vandq_u32(vshlq_u32(w, vdupq_n_s32(-static_cast<int32_t>(shift))), vdupq_n_u32(0xf));
    return vcvtq_f32_s32(vsubq_s32(vreinterpretq_s32_u32(n), vdupq_n_s32(8)));
  }
};
#endif

// ---- integer Q.K for q8_0 K (decode_params::int8_query_dot) ---------------------------------
//
// `q8dot_ops<Arch>` scores a query quantized to q8_0 (int8, one f32 scale per 32-value block)
// against q8_0 K rows with integer dot products: kBlocks blocks per step, whose int32 partial sums
// fill the kLanes lanes of one ireg (kLanes / kBlocks consecutive lanes per block), so that one
// int -> f32 conversion and one multiply-add by the product of the blocks' scales (load_scales
// for K's f16 scales, load_qscales for the query's f32 ones, each broadcast over its block's
// lanes) fold a step into the kernel's f32 score accumulators.
//   load_q: kBlocks * 32 query int8; load_k: kBlocks K blocks (34 bytes apart), prepared once per
//   token and reused by every head of the tile; dot: exact int32 partial sums.
// x86 uses the sign trick: maddubs multiplies unsigned by signed bytes, so one side goes unsigned
// (|x|) and its sign moves onto the other. With |q| <= 127 and |k| <= 128 a pair sums to at most
// 2 * 128 * 127 = 32512, below maddubs's int16 saturation.
template <class Arch>
struct q8dot_ops;

template <>
struct q8dot_ops<scalar_arch> {
  using vec = float;
  static constexpr uint32_t kBlocks = 1;
  using qreg = const int8_t*;
  using kreg = const int8_t*;
  using ireg = int32_t;
  static INSTINFER_INLINE qreg load_q(const int8_t* q) noexcept { return q; }
  static INSTINFER_INLINE kreg load_k(const std::byte* block) noexcept {
    return reinterpret_cast<const int8_t*>(block + 2);
  }
  static INSTINFER_INLINE ireg dot(qreg q, kreg k) noexcept {
    int32_t s = 0;
    for (uint32_t i = 0; i < kQuantBlock; ++i) s += int32_t{q[i]} * int32_t{k[i]};
    return s;
  }
  static INSTINFER_INLINE vec to_float(ireg x) noexcept { return static_cast<float>(x); }
  static INSTINFER_INLINE vec load_scales(const std::byte* block) noexcept {
    return simd_ops<scalar_arch>::load_scale(block);
  }
  static INSTINFER_INLINE vec load_qscales(const float* d) noexcept { return *d; }
};

#if defined(__AVX512F__) && defined(__AVX512BW__)
template <>
struct q8dot_ops<xsimd::avx512bw> {
  using vec = simd_ops<xsimd::avx512bw>::vec;
  static constexpr uint32_t kBlocks = 2;  // two 32-byte blocks per zmm: lanes 0-7 and 8-15
  using qreg = __m512i;
  struct kreg {
    __m512i abs;    // |k| as unsigned bytes
    __mmask64 neg;  // k < 0
  };
  using ireg = __m512i;
  static INSTINFER_INLINE qreg load_q(const int8_t* q) noexcept { return _mm512_loadu_si512(q); }
  static INSTINFER_INLINE kreg load_k(const std::byte* block) noexcept {
    const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 2));
    const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 2 + 34));
    const __m512i k = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
    return {_mm512_abs_epi8(k), _mm512_movepi8_mask(k)};
  }
  static INSTINFER_INLINE ireg dot(qreg q, kreg k) noexcept {
    // AVX-512 has no vpsignb: negate q where k < 0 (k == 0 contributes |k| = 0 anyway).
    const __m512i qs = _mm512_mask_sub_epi8(q, k.neg, _mm512_setzero_si512(), q);
#if defined(__AVX512VNNI__)
    return _mm512_dpbusd_epi32(_mm512_setzero_si512(), k.abs, qs);
#else
    return _mm512_madd_epi16(_mm512_maddubs_epi16(k.abs, qs), _mm512_set1_epi16(1));
#endif
  }
  static INSTINFER_INLINE vec to_float(ireg x) noexcept {
    return _mm512_cvtepi32_ps(x);
  }
  static INSTINFER_INLINE vec pair(float a, float b) noexcept {
    return _mm512_castpd_ps(
        _mm512_insertf64x4(_mm512_castps_pd(_mm512_set1_ps(a)), _mm256_castps_pd(_mm256_set1_ps(b)), 1));
  }
  static INSTINFER_INLINE vec load_scales(const std::byte* block) noexcept {
    uint16_t a, b;
    std::memcpy(&a, block, sizeof a);
    std::memcpy(&b, block + 34, sizeof b);
    return pair(_cvtsh_ss(a), _cvtsh_ss(b));
  }
  static INSTINFER_INLINE vec load_qscales(const float* d) noexcept {
    return pair(d[0], d[1]);
  }
};
#endif

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
template <>
struct q8dot_ops<xsimd::fma3<xsimd::avx2>> {
  using vec = simd_ops<xsimd::fma3<xsimd::avx2>>::vec;
  static constexpr uint32_t kBlocks = 1;
  // |q| is the unsigned side (q's sign moves onto k): one register per token instead of two
  // (the AVX2 tile keeps 8 accumulators live; k and |k| per token made it spill).
  struct qreg {
    __m256i q;
    __m256i abs;
  };
  using kreg = __m256i;
  using ireg = __m256i;
  static INSTINFER_INLINE qreg load_q(const int8_t* q) noexcept {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
    return {x, _mm256_abs_epi8(x)};
  }
  static INSTINFER_INLINE kreg load_k(const std::byte* block) noexcept {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 2));
  }
  static INSTINFER_INLINE ireg dot(qreg q, kreg k) noexcept {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(q.abs, _mm256_sign_epi8(k, q.q)), _mm256_set1_epi16(1));
  }
  static INSTINFER_INLINE vec to_float(ireg x) noexcept { return _mm256_cvtepi32_ps(x); }
  static INSTINFER_INLINE vec load_scales(const std::byte* block) noexcept {
    return simd_ops<xsimd::fma3<xsimd::avx2>>::load_scale(block);
  }
  static INSTINFER_INLINE vec load_qscales(const float* d) noexcept { return _mm256_broadcast_ss(d); }
};
#endif

#if defined(__aarch64__)
template <>
struct q8dot_ops<xsimd::neon64> {
  using vec = simd_ops<xsimd::neon64>::vec;
  static constexpr uint32_t kBlocks = 1;
  using qreg = int8x16x2_t;
  using kreg = int8x16x2_t;
  using ireg = int32x4_t;
  static INSTINFER_INLINE qreg load_q(const int8_t* q) noexcept { return {{vld1q_s8(q), vld1q_s8(q + 16)}}; }
  static INSTINFER_INLINE kreg load_k(const std::byte* block) noexcept {
    const int8_t* p = reinterpret_cast<const int8_t*>(block + 2);
    return {{vld1q_s8(p), vld1q_s8(p + 16)}};
  }
  static INSTINFER_INLINE ireg dot(qreg q, kreg k) noexcept {
#if defined(__ARM_FEATURE_DOTPROD)
    return vdotq_s32(vdotq_s32(vdupq_n_s32(0), q.val[0], k.val[0]), q.val[1], k.val[1]);
#else
    // int8 x int8 products fit int16 (|q| <= 127); pairwise-accumulated into int32.
    int32x4_t s = vpaddlq_s16(vmull_s8(vget_low_s8(q.val[0]), vget_low_s8(k.val[0])));
    s = vpadalq_s16(s, vmull_high_s8(q.val[0], k.val[0]));
    s = vpadalq_s16(s, vmull_s8(vget_low_s8(q.val[1]), vget_low_s8(k.val[1])));
    return vpadalq_s16(s, vmull_high_s8(q.val[1], k.val[1]));
#endif
  }
  static INSTINFER_INLINE vec to_float(ireg x) noexcept {
    return vcvtq_f32_s32(x);
  }
  static INSTINFER_INLINE vec load_scales(const std::byte* block) noexcept {
    return simd_ops<xsimd::neon64>::load_scale(block);
  }
  static INSTINFER_INLINE vec load_qscales(const float* d) noexcept {
    return vld1q_dup_f32(d);
  }
};
#endif

}  // namespace instinfer::simd
