// Decode attention over paged KV, written once over a SIMD arch (attention/simd.hpp).
//
// One call computes the partial attention of the `group_size` query heads that share a kv head
// (GQA head-group fusion), for one kv head (decode_chunks_fn in attention/decode.hpp) or a range
// of them (decode_chunks_heads), over a range of chunks. Tokens are walked in blocks of up to
// kBlockTokens consecutive tokens of one page; each block's K and V rows come from memory once and
// are reused from L1 by every head tile of the group. Per block and head tile:
//   1. scores: tiles of TT tokens x HT heads (TT * HT = kLanes) fill kLanes vectors of partial dot
//      products; a transposing horizontal add (haddp) turns kLanes of them into kLanes scores.
//   2. online softmax (state.hpp's softmax_stats): block max, rescale factor, exp, block sum.
//   3. values: an HT x DB register tile of output accumulators over the block's tokens, folded
//      into the running output once per block (o = o * alpha + acc: two-level sums keep f32
//      accumulation accurate over 100k-token contexts).
// Memory order: within a block, the K pages of every kv head of the call are scored before their
// V pages are accumulated, so with small pages a call sweeps each chunk sequentially; a software
// prefetch runs kPrefetchAhead bytes ahead of the sweep.
// Quantized KV (q8_0, q4_0) is dequantized in registers where a row vector is loaded
// (load_row_vec: the block's integers widened to f32 times its f16 scale); everything after the
// load, GQA fusion and f32 accumulation included, is the same code as for f16.
// Head dim, KV dtype and the logits variant are compile-time; `lookup_decode_kernel` is the one
// place where their runtime values become template arguments.
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
    // Rows past the block's end repeat its last row; their scores are masked below.
    const std::byte* r[TT];
#pragma GCC unroll 16
    for (uint32_t t = 0; t < TT; ++t) r[t] = k + (i * TT + t < n ? i * TT + t : n - 1) * Shape::kRowBytes;
    if constexpr (kPrefetchAhead > 0) {
      for (uint32_t l = 0; l < TT * Shape::kRowBytes; l += 64)
        Shape::ops::prefetch(k + i * TT * Shape::kRowBytes + kPrefetchAhead + l);
    }
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
#pragma GCC unroll 16
    for (uint32_t t = 0; t < TT; ++t) r[t] = k + (i * TT + t < n ? i * TT + t : n - 1) * Shape::kRowBytes;
    if constexpr (kPrefetchAhead > 0) {
      for (uint32_t l = 0; l < TT * Shape::kRowBytes; l += 64)
        Shape::ops::prefetch(k + i * TT * Shape::kRowBytes + kPrefetchAhead + l);
    }
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

// Largest head tile (8, 4, 2, 1, within kMaxHeadTile) that fits `rem` heads.
template <class Shape>
INSTINFER_INLINE uint32_t head_tile_for(uint32_t rem) noexcept {
  if (Shape::kMaxHeadTile >= 8 && rem >= 8) return 8;
  if (Shape::kMaxHeadTile >= 4 && rem >= 4) return 4;
  if (Shape::kMaxHeadTile >= 2 && rem >= 2) return 2;
  return 1;
}

// Floats of score buffer that one head tile of `ht` heads needs for a block of n tokens.
template <class Shape>
INSTINFER_INLINE uint32_t tile_floats(uint32_t ht, uint32_t n) noexcept {
  const uint32_t tt = Shape::kLanes / ht;
  return (n + tt - 1) / tt * Shape::kLanes;
}

template <class Shape, logits_variant Variant, dtype KvType>
INSTINFER_INLINE void score_tile(uint32_t ht, const std::byte* k, uint32_t n, const float* q, softmax_stats* st,
                                 const logit_constants& lc, float* sbuf, float* alpha) noexcept {
  if constexpr (Shape::kMaxHeadTile >= 8)
    if (ht == 8) return score_block<Shape, 8, Variant, KvType>(k, n, q, st, lc, sbuf, alpha);
  if constexpr (Shape::kMaxHeadTile >= 4)
    if (ht == 4) return score_block<Shape, 4, Variant, KvType>(k, n, q, st, lc, sbuf, alpha);
  if constexpr (Shape::kMaxHeadTile >= 2)
    if (ht == 2) return score_block<Shape, 2, Variant, KvType>(k, n, q, st, lc, sbuf, alpha);
  score_block<Shape, 1, Variant, KvType>(k, n, q, st, lc, sbuf, alpha);
}

template <class Shape, logits_variant Variant>
INSTINFER_INLINE void score_tile_q8dot(uint32_t ht, const std::byte* k, uint32_t n, const int8_t* qi, const float* qd,
                                       softmax_stats* st, const logit_constants& lc, float* sbuf,
                                       float* alpha) noexcept {
  if constexpr (Shape::kMaxHeadTile >= 8)
    if (ht == 8) return score_block_q8dot<Shape, 8, Variant>(k, n, qi, qd, st, lc, sbuf, alpha);
  if constexpr (Shape::kMaxHeadTile >= 4)
    if (ht == 4) return score_block_q8dot<Shape, 4, Variant>(k, n, qi, qd, st, lc, sbuf, alpha);
  if constexpr (Shape::kMaxHeadTile >= 2)
    if (ht == 2) return score_block_q8dot<Shape, 2, Variant>(k, n, qi, qd, st, lc, sbuf, alpha);
  score_block_q8dot<Shape, 1, Variant>(k, n, qi, qd, st, lc, sbuf, alpha);
}

// The query side of one kernel call: the f32 rows, and for int8_query_dot their q8_0 (quantized
// once per call, not per block: per block it would cost about as much as the block's dots).
template <class Shape, bool Int8Dot>
struct query_rows {
  const float* q = nullptr;
  const int8_t* qi = nullptr;  // Int8Dot: [heads][HeadDim]
  const float* qd = nullptr;   // Int8Dot: [heads][HeadDim / 32]

  // Head tile `ht` at query head `qh` (of the call), scored against K rows k.
  template <logits_variant Variant, dtype KvType>
  INSTINFER_INLINE void score(uint32_t ht, uint64_t qh, const std::byte* k, uint32_t n, softmax_stats* st,
                              const logit_constants& lc, float* sbuf, float* alpha) const noexcept {
    if constexpr (Int8Dot) {
      static_assert(KvType == dtype::kQ8_0, "int8_query_dot is for q8_0 K only");
      score_tile_q8dot<Shape, Variant>(ht, k, n, qi + qh * Shape::kHeadDim, qd + qh * (Shape::kHeadDim / kQuantBlock),
                                       st, lc, sbuf, alpha);
    } else {
      score_tile<Shape, Variant, KvType>(ht, k, n, q + qh * Shape::kHeadDim, st, lc, sbuf, alpha);
    }
  }
};

template <class Shape, dtype KvType>
INSTINFER_INLINE void value_tile(uint32_t ht, const std::byte* v, uint32_t n, const float* sbuf, const float* alpha,
                                 float* o) noexcept {
  if constexpr (Shape::kMaxHeadTile >= 8)
    if (ht == 8) return value_block<Shape, 8, KvType>(v, n, sbuf, alpha, o);
  if constexpr (Shape::kMaxHeadTile >= 4)
    if (ht == 4) return value_block<Shape, 4, KvType>(v, n, sbuf, alpha, o);
  if constexpr (Shape::kMaxHeadTile >= 2)
    if (ht == 2) return value_block<Shape, 2, KvType>(v, n, sbuf, alpha, o);
  value_block<Shape, 1, KvType>(v, n, sbuf, alpha, o);
}

// Partial attention of the query heads of kv heads [kv_begin, kv_begin + n_kv) over a chunk range:
// the contract of decode_chunks_fn, widened to a range of kv heads.
//   q, o: [n_kv][group_size][HeadDim] (the heads of kv_begin first); stats: [n_kv][group_size]
// (decode_heads_fn in attention/decode.hpp, the kernel decode_driver runs)
// Blocks never cross a page, and within a block the K pages of every head in the range are read
// before their V pages: with the chunk layout [K|V][kv_head][token][dim] and small pages that is
// one sequential sweep over each chunk, which the hardware prefetchers follow at full speed
// (a per-head walk touches 4 KiB pieces 64 KiB apart, and they restart at every piece).
template <class Arch, uint32_t HeadDim, dtype KvType, logits_variant Variant, bool Int8Dot>
void decode_chunks_heads_impl(const decode_params& params, const std::byte* const* chunks, uint32_t n_chunks,
                              uint32_t last_chunk_tokens, uint32_t kv_begin, uint32_t n_kv,
                              const query_rows<kernel_shape<Arch, HeadDim, KvType>, Int8Dot>& qr, float* o,
                              softmax_stats* stats) noexcept {
  using shape = kernel_shape<Arch, HeadDim, KvType>;
  constexpr uint32_t kScoreFloats = 8192;  // 32 KiB of probabilities per block and head range
  constexpr uint32_t kMaxRangeHeads = 256;

  const uint32_t G = params.group_size;
  const uint64_t nq = uint64_t{n_kv} * G;
  for (uint64_t h = 0; h < nq; ++h) stats[h] = softmax_stats{};
  for (uint64_t i = 0; i < nq * HeadDim; ++i) o[i] = 0.0f;
  if (n_chunks == 0 || n_kv == 0) return;

  const uint32_t tpp = params.layout.tokens();
  const uint32_t block = tpp < shape::kBlockTokens ? tpp : shape::kBlockTokens;
  const uint64_t page_bytes = params.layout.page.page_bytes;
  const uint64_t v_offset = uint64_t{params.layout.n_kv_heads} * page_bytes;

  logit_constants lc{};
  lc.scale = params.effective_scale();
  if constexpr (Variant::kSoftcap) {
    lc.cap = params.softcap;
    lc.scale_over_cap = lc.scale / params.softcap;
  }

  // Score-buffer floats one kv head needs per block (its head tiles, padded to whole vectors).
  uint32_t per_head = 0;
  for (uint32_t h = 0; h < G; h += head_tile_for<shape>(G - h))
    per_head += tile_floats<shape>(head_tile_for<shape>(G - h), block);
  // kv heads per sweep: as many as the buffers hold (at least one; a single head whose group does
  // not fit is handled tile by tile below).
  uint32_t range = per_head <= kScoreFloats && G <= kMaxRangeHeads ? kScoreFloats / per_head : 1;
  if (range > kMaxRangeHeads / G) range = kMaxRangeHeads / G > 0 ? kMaxRangeHeads / G : 1;
  const bool fits = per_head <= kScoreFloats && G <= kMaxRangeHeads;

  alignas(64) float sbuf[kScoreFloats];
  float alpha[kMaxRangeHeads];

  for (uint32_t c = 0; c < n_chunks; ++c) {
    const uint32_t chunk_tokens = c + 1 == n_chunks ? last_chunk_tokens : tpp;
    for (uint32_t t0 = 0; t0 < chunk_tokens; t0 += block) {
      const uint32_t n = chunk_tokens - t0 < block ? chunk_tokens - t0 : block;
      const std::byte* kbase = chunks[c] + uint64_t{t0} * shape::kRowBytes;
      for (uint32_t r0 = 0; r0 < n_kv; r0 += range) {
        const uint32_t r1 = r0 + range < n_kv ? r0 + range : n_kv;
        if (fits) {
          // K of every head in the range, then V of every head: a sequential sweep.
          float* sb = sbuf;
          for (uint32_t kh = r0; kh < r1; ++kh) {
            const std::byte* k = kbase + uint64_t{kv_begin + kh} * page_bytes;
            for (uint32_t h = 0; h < G;) {
              const uint32_t ht = head_tile_for<shape>(G - h);
              const uint64_t qh = uint64_t{kh} * G + h;
              qr.template score<Variant, KvType>(ht, qh, k, n, stats + qh, lc, sb, alpha + (kh - r0) * G + h);
              sb += tile_floats<shape>(ht, n);
              h += ht;
            }
          }
          sb = sbuf;
          for (uint32_t kh = r0; kh < r1; ++kh) {
            const std::byte* v = kbase + v_offset + uint64_t{kv_begin + kh} * page_bytes;
            for (uint32_t h = 0; h < G;) {
              const uint32_t ht = head_tile_for<shape>(G - h);
              const uint64_t qh = uint64_t{kh} * G + h;
              value_tile<shape, KvType>(ht, v, n, sb, alpha + (kh - r0) * G + h, o + qh * HeadDim);
              sb += tile_floats<shape>(ht, n);
              h += ht;
            }
          }
        } else {
          // A very large group: one head tile at a time, K then V.
          for (uint32_t kh = r0; kh < r1; ++kh) {
            const std::byte* k = kbase + uint64_t{kv_begin + kh} * page_bytes;
            for (uint32_t h = 0; h < G;) {
              const uint32_t ht = head_tile_for<shape>(G - h);
              const uint64_t qh = uint64_t{kh} * G + h;
              qr.template score<Variant, KvType>(ht, qh, k, n, stats + qh, lc, sbuf, alpha);
              value_tile<shape, KvType>(ht, k + v_offset, n, sbuf, alpha, o + qh * HeadDim);
              h += ht;
            }
          }
        }
      }
    }
  }
}

// decode_heads_fn. Int8Dot: the queries are quantized once per call, as many kv heads' groups at a
// time as kQ8QueryCap values hold (validate() makes one group fit).
template <class Arch, uint32_t HeadDim, dtype KvType, logits_variant Variant, bool Int8Dot = false>
void decode_chunks_heads(const decode_params& params, const std::byte* const* chunks, uint32_t n_chunks,
                         uint32_t last_chunk_tokens, uint32_t kv_begin, uint32_t n_kv, const float* q, float* o,
                         softmax_stats* stats) noexcept {
  using shape = kernel_shape<Arch, HeadDim, KvType>;
  if constexpr (!Int8Dot) {
    decode_chunks_heads_impl<Arch, HeadDim, KvType, Variant, false>(params, chunks, n_chunks, last_chunk_tokens,
                                                                    kv_begin, n_kv, {q}, o, stats);
  } else {
    constexpr uint32_t kCap = decode_params::kQ8QueryCap;
    constexpr uint32_t kBlocksPerRow = HeadDim / kQuantBlock;
    alignas(64) int8_t qi[kCap];
    float qd[kCap / kQuantBlock];
    const uint32_t G = params.group_size;
    const uint32_t per = kCap / (G * HeadDim);  // kv heads per pass
    if (per == 0) {                             // rejected by validate(); an unvalidated call gets NaN, not an overflow
      for (uint64_t i = 0; i < uint64_t{n_kv} * G * HeadDim; ++i) o[i] = std::numeric_limits<float>::quiet_NaN();
      for (uint64_t h = 0; h < uint64_t{n_kv} * G; ++h) stats[h] = softmax_stats{};
      return;
    }
    for (uint32_t h0 = 0; h0 < n_kv || h0 == 0; h0 += per) {
      const uint32_t m = n_kv - h0 < per ? n_kv - h0 : per;
      const uint64_t first = uint64_t{h0} * G;  // first query head of the pass
      for (uint64_t h = 0; h < uint64_t{m} * G; ++h)
        quantize_query_q8(q + (first + h) * HeadDim, HeadDim, qi + h * HeadDim, qd + h * kBlocksPerRow);
      const query_rows<shape, true> qr{q + first * HeadDim, qi, qd};
      decode_chunks_heads_impl<Arch, HeadDim, KvType, Variant, true>(
          params, chunks, n_chunks, last_chunk_tokens, kv_begin + h0, m, qr, o + first * HeadDim, stats + first);
      if (n_kv == 0) break;
    }
  }
}

// The kernel of the public contract (decode_chunks_fn): one kv head.
template <class Arch, uint32_t HeadDim, dtype KvType, logits_variant Variant, bool Int8Dot = false>
void decode_chunks(const decode_params& params, const std::byte* const* chunks, uint32_t n_chunks,
                   uint32_t last_chunk_tokens, uint32_t kv_head, const float* q, float* o,
                   softmax_stats* stats) noexcept {
  decode_chunks_heads<Arch, HeadDim, KvType, Variant, Int8Dot>(params, chunks, n_chunks, last_chunk_tokens, kv_head, 1,
                                                               q, o, stats);
}

// Causal rows (decode_rows_fn, attention/decode.hpp): the rows of a prefill chunk share each K/V
// block. Per block, kv head and row, the block is clipped to the row's visible prefix and run
// through the same score / value tiles as decode (tiles never span rows, so one clip serves a
// tile); K and V blocks (<= 16 KiB each) stay in L1/L2 across the rows, so each page is read
// from memory once per call and kv head. Blocks past every row's limit end the walk.
template <class Arch, uint32_t HeadDim, dtype KvType, logits_variant Variant, bool Int8Dot = false>
void decode_chunks_rows(const decode_params& params, const std::byte* const* chunks, uint32_t n_chunks,
                        uint32_t last_chunk_tokens, uint32_t kv_begin, uint32_t n_kv, const decode_rows& rows,
                        const float* q, float* o, softmax_stats* stats) noexcept {
  using shape = kernel_shape<Arch, HeadDim, KvType>;
  constexpr uint32_t kScoreFloats = 1024;  // one head tile of one block: <= 64 tokens x 16 lanes
  static_assert(kScoreFloats >= shape::kBlockTokens * shape::kLanes);

  const uint32_t G = params.group_size;
  const uint64_t per_row = uint64_t{n_kv} * G;
  uint32_t max_visible = 0;
  for (uint32_t r = 0; r < rows.n_rows; ++r) {
    for (uint64_t h = 0; h < per_row; ++h) stats[r * rows.stats_stride + h] = softmax_stats{};
    float* orow = o + r * rows.o_stride;
    for (uint64_t i = 0; i < per_row * HeadDim; ++i) orow[i] = 0.0f;
    max_visible = rows.visible[r] > max_visible ? rows.visible[r] : max_visible;
  }
  if (n_chunks == 0 || n_kv == 0) return;

  const uint32_t tpp = params.layout.tokens();
  const uint32_t block = tpp < shape::kBlockTokens ? tpp : shape::kBlockTokens;
  const uint64_t page_bytes = params.layout.page.page_bytes;
  const uint64_t v_offset = uint64_t{params.layout.n_kv_heads} * page_bytes;

  logit_constants lc{};
  lc.scale = params.effective_scale();
  if constexpr (Variant::kSoftcap) {
    lc.cap = params.softcap;
    lc.scale_over_cap = lc.scale / params.softcap;
  }
  alignas(64) float sbuf[kScoreFloats];
  float alpha[8];
  // Int8Dot: one row's group, quantized per block (prefill rows are many; a per-call copy of all
  // of them would not fit the stack).
  alignas(64) int8_t qi[Int8Dot ? decode_params::kQ8QueryCap : 1];
  float qd[Int8Dot ? decode_params::kQ8QueryCap / kQuantBlock : 1];

  for (uint32_t c = 0; c < n_chunks; ++c) {
    const uint32_t chunk_tokens = c + 1 == n_chunks ? last_chunk_tokens : tpp;
    for (uint32_t t0 = 0; t0 < chunk_tokens; t0 += block) {
      const uint64_t tok0 = uint64_t{rows.first_token} + uint64_t{c} * tpp + t0;
      if (tok0 >= max_visible) return;  // no row sees this block or any later one
      const uint32_t n = chunk_tokens - t0 < block ? chunk_tokens - t0 : block;
      const std::byte* kbase = chunks[c] + uint64_t{t0} * shape::kRowBytes;
      for (uint32_t kh = 0; kh < n_kv; ++kh) {
        const std::byte* k = kbase + uint64_t{kv_begin + kh} * page_bytes;
        const std::byte* v = k + v_offset;
        for (uint32_t r = 0; r < rows.n_rows; ++r) {
          if (rows.visible[r] <= tok0) continue;
          const uint64_t left = rows.visible[r] - tok0;
          const uint32_t m = left < n ? static_cast<uint32_t>(left) : n;
          const float* qg = q + r * rows.q_stride + uint64_t{kh} * G * HeadDim;  // the row's group of kh
          query_rows<shape, Int8Dot> qr{qg};
          if constexpr (Int8Dot) {
            if (uint64_t{G} * HeadDim > decode_params::kQ8QueryCap) return;  // rejected by validate()
            for (uint32_t h = 0; h < G; ++h)
              quantize_query_q8(qg + h * HeadDim, HeadDim, qi + h * HeadDim, qd + h * (HeadDim / kQuantBlock));
            qr.qi = qi;
            qr.qd = qd;
          }
          for (uint32_t h = 0; h < G;) {
            const uint32_t ht = head_tile_for<shape>(G - h);
            const uint64_t qh = uint64_t{kh} * G + h;
            qr.template score<Variant, KvType>(ht, h, k, m, stats + r * rows.stats_stride + qh, lc, sbuf, alpha);
            value_tile<shape, KvType>(ht, v, m, sbuf, alpha, o + r * rows.o_stride + qh * HeadDim);
            h += ht;
          }
        }
      }
    }
  }
}

struct decode_kernel_pair {
  decode_chunks_fn one_head = nullptr;
  decode_heads_fn head_range = nullptr;
  decode_rows_fn rows = nullptr;
};

// Which dtypes one translation unit instantiates: the dense and the quantized kernels of an ISA
// are compiled in separate units (src/kernels/decode_<isa>[_quant].cpp), so neither grows.
enum class dtype_family : uint8_t { kDense, kQuantized };

// The one place where runtime (head_dim, dtype, soft-cap) become compile-time constants.
// Returns null kernels for a head_dim or dtype that is not instantiated (or not of `Family`).
// int8_dot (decode_params::int8_query_dot): the integer Q.K kernels, q8_0 only (null otherwise).
template <class Arch, dtype_family Family>
decode_kernel_pair lookup_decode_kernel(uint32_t head_dim, dtype kv_type, bool softcap, bool int8_dot) noexcept {
  const auto by_variant = [softcap, int8_dot]<uint32_t D, dtype T>() -> decode_kernel_pair {
    if constexpr (is_quantized(T) != (Family == dtype_family::kQuantized)) {
      return {};
    } else if constexpr (T == dtype::kQ8_0) {
      if (int8_dot) {
        if (softcap)
          return {&decode_chunks<Arch, D, T, softcapped_logits, true>,
                  &decode_chunks_heads<Arch, D, T, softcapped_logits, true>,
                  &decode_chunks_rows<Arch, D, T, softcapped_logits, true>};
        return {&decode_chunks<Arch, D, T, plain_logits, true>, &decode_chunks_heads<Arch, D, T, plain_logits, true>,
                &decode_chunks_rows<Arch, D, T, plain_logits, true>};
      }
      if (softcap)
        return {&decode_chunks<Arch, D, T, softcapped_logits>, &decode_chunks_heads<Arch, D, T, softcapped_logits>,
                &decode_chunks_rows<Arch, D, T, softcapped_logits>};
      return {&decode_chunks<Arch, D, T, plain_logits>, &decode_chunks_heads<Arch, D, T, plain_logits>,
              &decode_chunks_rows<Arch, D, T, plain_logits>};
    } else {
      if (int8_dot) return {};
      if (softcap)
        return {&decode_chunks<Arch, D, T, softcapped_logits>, &decode_chunks_heads<Arch, D, T, softcapped_logits>,
                &decode_chunks_rows<Arch, D, T, softcapped_logits>};
      return {&decode_chunks<Arch, D, T, plain_logits>, &decode_chunks_heads<Arch, D, T, plain_logits>,
              &decode_chunks_rows<Arch, D, T, plain_logits>};
    }
  };
  const auto by_dtype = [&]<uint32_t D>() -> decode_kernel_pair {
    switch (kv_type) {
      case dtype::kF32: return by_variant.template operator()<D, dtype::kF32>();
      case dtype::kF16: return by_variant.template operator()<D, dtype::kF16>();
      case dtype::kBF16: return by_variant.template operator()<D, dtype::kBF16>();
      case dtype::kQ8_0: return by_variant.template operator()<D, dtype::kQ8_0>();
      case dtype::kQ4_0: return by_variant.template operator()<D, dtype::kQ4_0>();
    }
    return {};
  };
  switch (head_dim) {
    case 64: return by_dtype.template operator()<64>();
    case 128: return by_dtype.template operator()<128>();
    case 256: return by_dtype.template operator()<256>();
    default: return {};
  }
}

}  // namespace instinfer::kernels
