// The per-block math of the decode kernel (decode_kernel.hpp), over a SIMD arch: the kernel's
// compile-time shape, row loads (dequantizing q8_0 / q4_0 in registers), and for one block of
// consecutive rows and a head tile the scores, the online-softmax update and the value
// accumulation. decode_kernel.hpp sweeps chunks with these and is the one entry point.
#pragma once

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <limits>

#include "instinfer/attention/decode.hpp"
#include "instinfer/attention/simd.hpp"
#include "instinfer/attention/state.hpp"

namespace instinfer::kernels {

// ---- logits variants: optional features are compile-time policies, not kernel arguments -------

struct plain_logits {
  static constexpr bool kSoftcap = false;
};
struct softcapped_logits {
  static constexpr bool kSoftcap = true;
};

template <class V>
concept logits_variant = requires {
  { V::kSoftcap } -> std::convertible_to<bool>;
};

struct logit_constants {
  float scale;  // logit = scale * q.k
  float cap;    // soft-cap (softcapped_logits only)
  float scale_over_cap;
};

template <logits_variant Variant, class Ops>
requires(!Variant::kSoftcap) INSTINFER_INLINE typename Ops::vec
    finish_logits(typename Ops::vec dot, const logit_constants& c) noexcept {
  return dot * Ops::broadcast(c.scale);
}

template <logits_variant Variant, class Ops>
requires(Variant::kSoftcap) INSTINFER_INLINE typename Ops::vec
    finish_logits(typename Ops::vec dot, const logit_constants& c) noexcept {
  return Ops::broadcast(c.cap) * Ops::tanh(dot * Ops::broadcast(c.scale_over_cap));
}

// ---- compile-time shape of one instantiation -----------------------------------------------

template <class Arch, uint32_t HeadDim, dtype KvType>
struct kernel_shape {
  using arch = Arch;
  using ops = simd::simd_ops<Arch>;
  using vec = typename ops::vec;
  static constexpr uint32_t kLanes = ops::kLanes;
  static constexpr uint32_t kHeadDim = HeadDim;
  static constexpr uint32_t kVecsPerRow = HeadDim / kLanes;
  static constexpr uint32_t kVecBytes = kLanes * dtype_size(KvType);  // dense types only
  static constexpr uint32_t kRowBytes = static_cast<uint32_t>(dtype_row_bytes(KvType, HeadDim));
  // Largest head tile: a score tile holds HT heads x (kLanes / HT) tokens.
  static constexpr uint32_t kMaxHeadTile = kLanes < 8 ? kLanes : 8;
  // Accumulator registers for the value tile (AVX2 has 16 vector registers, the others 32).
  static constexpr uint32_t kValueAccumulators = kLanes == 8 ? 8 : 16;
  // Tokens per block: about 16 KiB of K (and of V) so that a block stays in L1/L2 for all head
  // tiles, in whole score tiles (a quantized row is no power of two).
  static constexpr uint32_t kRawBlockTokens =
      16384 / kRowBytes < 16 ? 16 : (16384 / kRowBytes > 64 ? 64 : 16384 / kRowBytes);
  static constexpr uint32_t kBlockTokens = kRawBlockTokens / kLanes * kLanes;

  static_assert(HeadDim % kLanes == 0, "head_dim must be a multiple of the vector width");
  static_assert(dtype_holds(KvType, HeadDim), "head_dim must be whole blocks of a quantized dtype");
  static_assert(!is_quantized(KvType) || kLanes <= kQuantBlock / 2, "a vector must lie in one half-block");
  static_assert(kBlockTokens % kLanes == 0 && kBlockTokens > 0, "a block must hold whole score tiles");
};

// Vector j (kLanes elements from j * kLanes) of a row, widened to f32. A quantized vector lies in
// one block (and, for q4_0, in one half of it: the low or the high nibbles of its bytes).
template <class Shape, dtype KvType>
INSTINFER_INLINE typename Shape::vec load_row_vec(const std::byte* row, uint32_t j) noexcept {
  using ops = typename Shape::ops;
  if constexpr (!is_quantized(KvType)) {
    return ops::template load_kv<KvType>(row + j * Shape::kVecBytes);
  } else {
    const uint32_t e = j * Shape::kLanes;
    const std::byte* block = row + (e / kQuantBlock) * dtype_block_bytes(KvType);
    const uint32_t in_block = e % kQuantBlock;
    if constexpr (KvType == dtype::kQ8_0) {
      return ops::load_q8(block + 2 + in_block) * ops::load_scale(block);
    } else {
      static_assert(KvType == dtype::kQ4_0);
      return ops::load_q4(block + 2 + in_block % 16, in_block < 16 ? 0u : 4u) * ops::load_scale(block);
    }
  }
}

// Where the DB vectors from vector g of a quantized row lie, the same for every row: value_block
// computes it once per pass, so that its token loop does loads and arithmetic only. A pass is
// either within one block (DB * kLanes <= 32: one scale for all its vectors) or whole blocks.
template <uint32_t DB>
struct quant_pass {
  uint32_t first_block = 0;  // byte offset of the block of vector g
  uint32_t data[DB] = {};    // byte offset of vector g + b's integers from first_block
  uint32_t shift[DB] = {};   // q4_0: 0 (low nibbles) or 4 (high nibbles)
};

template <class Shape, dtype KvType, uint32_t DB>
INSTINFER_INLINE quant_pass<DB> quant_pass_at(uint32_t g) noexcept {
  quant_pass<DB> p;
  if constexpr (is_quantized(KvType)) {
    constexpr uint32_t bb = dtype_block_bytes(KvType);
    const uint32_t e0 = g * Shape::kLanes;
    p.first_block = e0 / kQuantBlock * bb;
    for (uint32_t b = 0; b < DB; ++b) {
      const uint32_t e = e0 % kQuantBlock + b * Shape::kLanes;  // from the first block's start
      const uint32_t in_block = e % kQuantBlock;
      p.data[b] = e / kQuantBlock * bb + 2 + (KvType == dtype::kQ8_0 ? in_block : in_block % 16);
      p.shift[b] = KvType == dtype::kQ4_0 && in_block >= 16 ? 4u : 0u;
    }
  }
  return p;
}

// The pass's DB vectors of one quantized row (`blocks`: the row's block of the pass's first
// vector), each block's scale loaded once.
template <class Shape, dtype KvType, uint32_t DB>
INSTINFER_INLINE void load_pass_quantized(const std::byte* blocks, const quant_pass<DB>& p,
                                          typename Shape::vec* out) noexcept {
  using ops = typename Shape::ops;
  constexpr uint32_t bb = dtype_block_bytes(KvType);
  constexpr uint32_t kPerBlock = kQuantBlock / Shape::kLanes;  // vectors per block
  constexpr uint32_t kBlocks = DB <= kPerBlock ? 1 : DB / kPerBlock;
  typename Shape::vec scale[kBlocks];
#pragma GCC unroll 16
  for (uint32_t i = 0; i < kBlocks; ++i) scale[i] = ops::load_scale(blocks + i * bb);
#pragma GCC unroll 16
  for (uint32_t b = 0; b < DB; ++b) {
    const typename Shape::vec x =
        KvType == dtype::kQ8_0 ? ops::load_q8(blocks + p.data[b]) : ops::load_q4(blocks + p.data[b], p.shift[b]);
    out[b] = x * scale[DB <= kPerBlock ? 0 : b / kPerBlock];
  }
}

// Software prefetch distance along the sweep, in bytes ahead of the rows being read. The sweep is
// sequential within a chunk (K pages of all heads, then V pages), so a constant distance keeps an
// ascending prefetch stream that also trains the L2 streamer; measured on Zen 5 (f16, 4 KiB
// pages, DRAM-resident KV): 0 -> 12 GB/s, 4 KiB -> 26, 8-16 KiB -> 30 (compute-bound), 32 KiB -> 28.
// Prefetches past the sweep's end touch neighbouring memory only (they never fault).
#ifndef INSTINFER_PREFETCH_AHEAD
#define INSTINFER_PREFETCH_AHEAD 16384
#endif
inline constexpr uint32_t kPrefetchAhead = INSTINFER_PREFETCH_AHEAD;

template <class Shape, uint32_t HT>
INSTINFER_INLINE void block_softmax(uint32_t n, softmax_stats* st, float* sbuf, float* alpha) noexcept;

// The TT rows of score tile i of a block of n rows from k, and the prefetch ahead of them. Rows
// past the block's end repeat its last row; block_softmax masks their scores.
template <class Shape, uint32_t TT>
INSTINFER_INLINE void score_tile_rows(const std::byte* k, uint32_t n, uint32_t i, const std::byte** r) noexcept {
#pragma GCC unroll 16
  for (uint32_t t = 0; t < TT; ++t) r[t] = k + (i * TT + t < n ? i * TT + t : n - 1) * Shape::kRowBytes;
  if constexpr (kPrefetchAhead > 0) {
    for (uint32_t l = 0; l < TT * Shape::kRowBytes; l += 64)
      Shape::ops::prefetch(k + i * TT * Shape::kRowBytes + kPrefetchAhead + l);
  }
}

// Scores and online-softmax update of one block of n (1..kBlockTokens) consecutive rows for a
// head tile of HT query heads. Not inlined (nor value_block): a call per block of up to 64 tokens
// costs nothing beside the block's work, while inlining copied both into every kernel entry and
// call site (3 kernels x 2 paths x 4 head tiles), which took 7.6x the compile time of a unit.
//   k: the block's first K row (rows are kRowBytes apart); q: [HT][HeadDim]; st: [HT] states
//   sbuf: out, the block's probabilities, tile i lane h * TT + t = token i * TT + t of head h
//   alpha: out, [HT] factors that rescale the previous output
template <class Shape, uint32_t HT, logits_variant Variant, dtype KvType>
[[gnu::noinline]] void score_block(const std::byte* k, uint32_t n, const float* q, softmax_stats* st,
                                   const logit_constants& lc, float* sbuf, float* alpha) noexcept {
  using ops = typename Shape::ops;
  using vec = typename Shape::vec;
  constexpr uint32_t L = Shape::kLanes;
  constexpr uint32_t D = Shape::kHeadDim;
  constexpr uint32_t TT = L / HT;  // tokens per score tile
  static_assert(TT * HT == L);

  const uint32_t n_tiles = (n + TT - 1) / TT;
  for (uint32_t i = 0; i < n_tiles; ++i) {
    vec acc[L];
#pragma GCC unroll 16
    for (uint32_t a = 0; a < L; ++a) acc[a] = ops::zero();
    const std::byte* r[TT];
    score_tile_rows<Shape, TT>(k, n, i, r);
#pragma GCC unroll 16
    for (uint32_t j = 0; j < Shape::kVecsPerRow; ++j) {
      vec kv[TT];
#pragma GCC unroll 16
      for (uint32_t t = 0; t < TT; ++t) kv[t] = load_row_vec<Shape, KvType>(r[t], j);
#pragma GCC unroll 16
      for (uint32_t h = 0; h < HT; ++h) {
        const vec qv = ops::load(q + h * D + j * L);
#pragma GCC unroll 16
        for (uint32_t t = 0; t < TT; ++t) acc[h * TT + t] = ops::fma(qv, kv[t], acc[h * TT + t]);
      }
    }
    ops::store(sbuf + i * L, finish_logits<Variant, ops>(ops::haddp(acc), lc));
  }
  block_softmax<Shape, HT>(n, st, sbuf, alpha);
}

// The online-softmax update of a block whose logits score_block / score_block_q8dot wrote to
// sbuf (tile layout as there): masks the last tile's padding, updates st, turns sbuf into
// probabilities and writes alpha.
template <class Shape, uint32_t HT>
INSTINFER_INLINE void block_softmax(uint32_t n, softmax_stats* st, float* sbuf, float* alpha) noexcept {
  using ops = typename Shape::ops;
  using vec = typename Shape::vec;
  constexpr uint32_t L = Shape::kLanes;
  constexpr uint32_t TT = L / HT;
  alignas(64) float lanes[L];
  const uint32_t n_tiles = (n + TT - 1) / TT;
  if (const uint32_t valid = n - (n_tiles - 1) * TT; valid != TT) {
    float* last = sbuf + (n_tiles - 1) * L;
#pragma GCC unroll 16
    for (uint32_t h = 0; h < HT; ++h)
      for (uint32_t t = valid; t < TT; ++t) last[h * TT + t] = -std::numeric_limits<float>::infinity();
  }

  vec mx = ops::broadcast(-std::numeric_limits<float>::infinity());
  for (uint32_t i = 0; i < n_tiles; ++i) mx = ops::max(mx, ops::load(sbuf + i * L));
  ops::store(lanes, mx);
  // The HT rescale factors exp(m_old - m_new) as one vector exp (lane h * TT), not HT libm calls.
  alignas(64) float shift[L];
  bool was_empty[HT];
#pragma GCC unroll 16
  for (uint32_t h = 0; h < HT; ++h) {
    float bm = lanes[h * TT];
    for (uint32_t t = 1; t < TT; ++t) bm = lanes[h * TT + t] > bm ? lanes[h * TT + t] : bm;
    const float m_new = st[h].m > bm ? st[h].m : bm;
    was_empty[h] = st[h].empty();
    const float diff = was_empty[h] ? 0.0f : st[h].m - m_new;  // no -inf into the exp
    st[h].m = m_new;
#pragma GCC unroll 16
    for (uint32_t t = 0; t < TT; ++t) lanes[h * TT + t] = m_new, shift[h * TT + t] = diff;
  }
  ops::store(shift, ops::exp(ops::load(shift)));
#pragma GCC unroll 16
  for (uint32_t h = 0; h < HT; ++h) alpha[h] = was_empty[h] ? 0.0f : shift[h * TT];
  const vec mv = ops::load(lanes);
  vec sum = ops::zero();
  for (uint32_t i = 0; i < n_tiles; ++i) {
    const vec p = ops::exp(ops::load(sbuf + i * L) - mv);
    ops::store(sbuf + i * L, p);
    sum = sum + p;
  }
  ops::store(lanes, sum);
#pragma GCC unroll 16
  for (uint32_t h = 0; h < HT; ++h) {
    float s = 0.0f;
#pragma GCC unroll 16
    for (uint32_t t = 0; t < TT; ++t) s += lanes[h * TT + t];
    st[h].d = st[h].d * alpha[h] + s;
  }
}

// score_block for decode_params::int8_query_dot over q8_0 K: the same tiles, with each step of
// kBlocks blocks of a (head, token) pair an integer dot (simd.hpp's q8dot_ops), converted to f32
// once and multiply-added with the product of the query's and the K row's block scales.
//   qi: [HT][HeadDim] the heads' quantized queries; qd: [HT][HeadDim / 32] their block scales
template <class Shape, uint32_t HT, logits_variant Variant>
[[gnu::noinline]] void score_block_q8dot(const std::byte* k, uint32_t n, const int8_t* qi, const float* qd,
                                         softmax_stats* st, const logit_constants& lc, float* sbuf,
                                         float* alpha) noexcept {
  using ops = typename Shape::ops;
  using q8 = simd::q8dot_ops<typename Shape::arch>;
  using vec = typename Shape::vec;
  constexpr uint32_t L = Shape::kLanes;
  constexpr uint32_t D = Shape::kHeadDim;
  constexpr uint32_t TT = L / HT;
  constexpr uint32_t kStep = q8::kBlocks * kQuantBlock;  // values per step
  constexpr uint32_t kStepBytes = q8::kBlocks * dtype_block_bytes(dtype::kQ8_0);
  static_assert(TT * HT == L && D % kStep == 0);

  const uint32_t n_tiles = (n + TT - 1) / TT;
  for (uint32_t i = 0; i < n_tiles; ++i) {
    vec acc[L];
#pragma GCC unroll 16
    for (uint32_t a = 0; a < L; ++a) acc[a] = ops::zero();
    const std::byte* r[TT];
    score_tile_rows<Shape, TT>(k, n, i, r);
#pragma GCC unroll 16
    for (uint32_t j = 0; j < D / kStep; ++j) {
      typename q8::kreg kv[TT];
      vec ks[TT];
#pragma GCC unroll 16
      for (uint32_t t = 0; t < TT; ++t) {
        kv[t] = q8::load_k(r[t] + j * kStepBytes);
        ks[t] = q8::load_scales(r[t] + j * kStepBytes);
      }
#pragma GCC unroll 16
      for (uint32_t h = 0; h < HT; ++h) {
        const typename q8::qreg qv = q8::load_q(qi + h * D + j * kStep);
        const vec qs = q8::load_qscales(qd + h * (D / kQuantBlock) + j * q8::kBlocks);
#pragma GCC unroll 16
        for (uint32_t t = 0; t < TT; ++t)
          acc[h * TT + t] = ops::fma(q8::to_float(q8::dot(qv, kv[t])), qs * ks[t], acc[h * TT + t]);
      }
    }
    ops::store(sbuf + i * L, finish_logits<Variant, ops>(ops::haddp(acc), lc));
  }
  block_softmax<Shape, HT>(n, st, sbuf, alpha);
}

// Values of one block for a head tile: o = o * alpha + sum_t p_t v_t, with an HT x DB register
// tile of accumulators per pass (two-level sums keep f32 accurate over long contexts).
//   v: the block's first V row; sbuf/alpha: from score_block; o: [HT][HeadDim]
template <class Shape, uint32_t HT, dtype KvType>
[[gnu::noinline]] void value_block(const std::byte* v, uint32_t n, const float* sbuf, const float* alpha,
                                   float* o) noexcept {
  using ops = typename Shape::ops;
  using vec = typename Shape::vec;
  constexpr uint32_t L = Shape::kLanes;
  constexpr uint32_t D = Shape::kHeadDim;
  constexpr uint32_t TT = L / HT;
  constexpr uint32_t DB =
      Shape::kValueAccumulators / HT < Shape::kVecsPerRow ? Shape::kValueAccumulators / HT : Shape::kVecsPerRow;
  static_assert(DB >= 1 && Shape::kVecsPerRow % DB == 0);
  if constexpr (kPrefetchAhead > 0) {
    // Hoisted out of the passes: in the token loop it cost a branch and address work per row.
    for (uint32_t l = 0; l < n * Shape::kRowBytes; l += 64) Shape::ops::prefetch(v + kPrefetchAhead + l);
  }
  for (uint32_t g = 0; g < Shape::kVecsPerRow; g += DB) {
    vec acc[HT][DB];
#pragma GCC unroll 16
    for (uint32_t h = 0; h < HT; ++h)
      for (uint32_t b = 0; b < DB; ++b) acc[h][b] = ops::zero();
    const quant_pass<DB> pass = quant_pass_at<Shape, KvType, DB>(g);
    // One token's row: DB vectors, each used for HT multiply-adds (p of token t, head h at pp[h * TT]).
    const auto token = [&](const std::byte* r, const float* pp) __attribute__((always_inline)) {
      vec vv[DB];
      if constexpr (is_quantized(KvType)) {
        load_pass_quantized<Shape, KvType, DB>(r + pass.first_block, pass, vv);
      } else {
#pragma GCC unroll 16
        for (uint32_t b = 0; b < DB; ++b) vv[b] = load_row_vec<Shape, KvType>(r, g + b);
      }
#pragma GCC unroll 16
      for (uint32_t h = 0; h < HT; ++h) {
        const vec pb = ops::broadcast(pp[h * TT]);
#pragma GCC unroll 16
        for (uint32_t b = 0; b < DB; ++b) acc[h][b] = ops::fma(pb, vv[b], acc[h][b]);
      }
    };
    // Whole score tiles (TT tokens) per iteration: no per-token index arithmetic.
    uint32_t tok = 0;
    const float* tile = sbuf;
    for (; tok + TT <= n; tok += TT, tile += L) {
      const std::byte* r = v + tok * Shape::kRowBytes;
#pragma GCC unroll 16
      for (uint32_t t = 0; t < TT; ++t) token(r + t * Shape::kRowBytes, tile + t);
    }
    for (uint32_t t = 0; tok < n; ++tok, ++t) token(v + tok * Shape::kRowBytes, tile + t);
#pragma GCC unroll 16
    for (uint32_t h = 0; h < HT; ++h) {
      const vec a = ops::broadcast(alpha[h]);
#pragma GCC unroll 16
      for (uint32_t b = 0; b < DB; ++b) {
        float* op = o + h * D + (g + b) * L;
        ops::store(op, ops::fma(ops::load(op), a, acc[h][b]));
      }
    }
  }
}

}  // namespace instinfer::kernels
