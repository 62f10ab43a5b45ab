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
// place where their runtime values become template arguments. The per-block steps (1-3) are in
// decode_kernel_blocks.hpp; this file sweeps chunks and head tiles with them.
#pragma once

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <limits>

#include "instinfer/attention/decode.hpp"
#include "instinfer/attention/decode_kernel_blocks.hpp"
#include "instinfer/attention/simd.hpp"
#include "instinfer/attention/state.hpp"

namespace instinfer::kernels {

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
