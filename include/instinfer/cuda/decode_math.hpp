// The CUDA decode kernel's shape and per-tile math, as plain host-and-device C++ (no CUDA types).
//
// Everything here is compiled twice: into the kernel (device/cuda/decode.cu) and into the host
// tests (tests/cuda), which replay the kernel's exact partition of work (row groups, tiles,
// splits) and merge order on the CPU against a float64 reference. The softmax math itself is
// state.hpp's, shared with the host and CSD kernels.
//
// Kernel shape. One thread block (kThreads threads) works on one (sequence, kv head, query-head
// tile, split): the split's token range is walked in tiles of kTileTokens tokens; each tile's K
// and V rows are staged in shared memory with 16-byte asynchronous copies. `kLanesPerRow` lanes
// share one row (each owns kElemsPerLane elements of head_dim, as kVecsPerLane 16-byte vectors);
// the block's kRowGroups row groups take tile rows ty, ty + kRowGroups, ... and keep their own
// online-softmax states, merged at the end with merge_state.
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#endif

#include "instinfer/attention/state.hpp"
#include "instinfer/core/config.hpp"
#include "instinfer/core/dtype.hpp"

// Loop unrolling hint for the device pass only (the host compiler warns about an unknown pragma).
#if defined(__CUDA_ARCH__)
#define INSTINFER_UNROLL _Pragma("unroll")
#else
#define INSTINFER_UNROLL
#endif

namespace instinfer::cuda {

inline constexpr uint32_t kDecodeThreads = 128;
inline constexpr uint32_t kDecodeStages = 4;            // cp.async pipeline depth
inline constexpr uint32_t kSmemOptInBytes = 48 * 1024;  // above this, the launch opts in to more shared memory
inline constexpr uint32_t kMinSplitTokens = 256;        // never split a sequence finer than this

// ElemBytes sets the lanes' share of a row (16 / ElemBytes values per lane vector); RowBytes is
// the stored row. Quantized rows (q8_0, q4_0: traits_for below) keep f16's lane mapping (8 values
// of one block per lane vector) over their own row bytes, staged with 4-byte copies when a row is
// no multiple of 16 bytes.
template <uint32_t HeadDim, uint32_t ElemBytes, uint32_t GroupTile, uint32_t RowBytes = HeadDim* ElemBytes>
struct decode_traits {
  static_assert(HeadDim == 64 || HeadDim == 128 || HeadDim == 256, "head_dim must be 64, 128 or 256");
  static_assert(ElemBytes == 2 || ElemBytes == 4, "KV elements are f16/bf16 (2 bytes) or f32 (4 bytes)");
  static_assert(GroupTile == 1 || GroupTile == 2 || GroupTile == 4 || GroupTile == 8);
  static_assert(RowBytes % 4 == 0, "rows are staged in 4- or 16-byte copies");

  static constexpr uint32_t kHeadDim = HeadDim;
  static constexpr uint32_t kGroup = GroupTile;
  static constexpr uint32_t kThreads = kDecodeThreads;
  static constexpr uint32_t kVecElems = 16 / ElemBytes;  // elements per lane vector (a 16-byte load when dense)
  static constexpr uint32_t kRowBytes = RowBytes;
  static constexpr uint32_t kVecsPerRow = HeadDim / kVecElems;
  static constexpr uint32_t kLanesPerRow = kVecsPerRow < 32 ? kVecsPerRow : 32;
  static constexpr uint32_t kVecsPerLane = kVecsPerRow / kLanesPerRow;
  static constexpr uint32_t kElemsPerLane = kVecsPerLane * kVecElems;
  static constexpr uint32_t kRowGroups = kThreads / kLanesPerRow;
  // Bytes of K (and of V) per stage: larger tiles amortise the per-tile state merge over more
  // tokens; 8 query heads keep 4 KiB tiles so the registers (q, o per head) do not spill. Counted
  // in rows of the lane mapping (HeadDim * ElemBytes): quantized tiles hold as many tokens as
  // f16's (the same registers and unrolled code per thread), in fewer bytes.
  static constexpr uint32_t kTileBytes = GroupTile >= 8 ? 4096 : 8192;
  static constexpr uint32_t kLaneRowBytes = HeadDim * ElemBytes;
  static constexpr uint32_t kTileTokens =
      kTileBytes / kLaneRowBytes > kRowGroups ? kTileBytes / kLaneRowBytes : kRowGroups;
  static constexpr uint32_t kTokensPerGroup = kTileTokens / kRowGroups;
  static constexpr uint32_t kStages = kDecodeStages;
  static constexpr uint32_t kStageBytes = 2 * kTileTokens * kRowBytes;  // K tile, then V tile
  static constexpr uint32_t kCopyBytes = kRowBytes % 16 == 0 ? 16 : 4;  // one cp.async
  static constexpr uint32_t kCopiesPerRow = kRowBytes / kCopyBytes;
  static constexpr uint32_t kCopiesPerStage = kStageBytes / kCopyBytes;
  static constexpr uint32_t kCopyRounds = (kCopiesPerStage + kThreads - 1) / kThreads;
  static constexpr uint32_t kMergeBytes = kRowGroups * GroupTile * HeadDim * 4;
  static constexpr uint32_t kSmemBytes = kStages * kStageBytes > kMergeBytes ? kStages* kStageBytes : kMergeBytes;

  static_assert(kLanesPerRow * kRowGroups == kThreads);
  static_assert(32 % kLanesPerRow == 0, "a row's lanes must sit in one warp (shuffle reduction)");
  static_assert(kVecsPerLane * kLanesPerRow == kVecsPerRow);
  static_assert(kTileTokens % kRowGroups == 0);
  static_assert(RowBytes != HeadDim * ElemBytes || kCopiesPerStage % kThreads == 0,
                "dense rows: every thread issues the same number of copies");
  static_assert((kTileTokens * kRowBytes) % kCopyBytes == 0, "the V tile starts on a copy boundary");
  static_assert(kSmemBytes <= 96 * 1024, "fits sm_80 and sm_90 with two resident blocks per SM");

  // First element of head_dim owned by vector `vec` (< kVecsPerLane) of lane `lane`. Vectors are
  // interleaved across lanes so a row group's lanes read one contiguous span of shared memory.
  INSTINFER_HOST_DEVICE static constexpr uint32_t lane_elem(uint32_t lane, uint32_t vec) noexcept {
    return (vec * kLanesPerRow + lane) * kVecElems;
  }
};

// The kernel's traits for a KV dtype (the one mapping from dtype to traits).
template <uint32_t HeadDim, dtype DT, uint32_t GroupTile>
using traits_for = decode_traits<HeadDim, is_quantized(DT) ? 2u : dtype_size(DT), GroupTile,
                                 static_cast<uint32_t>(dtype_row_bytes(DT, HeadDim))>;

// Values e0 .. e0 + 7 (e0 a multiple of 8) of a quantized row, dequantized: they lie in one block
// (and, for q4_0, in one half of its nibbles). row: the row's first byte (2-byte aligned).
template <dtype DT>
INSTINFER_HOST_DEVICE INSTINFER_INLINE void dequantize8(const unsigned char* row, uint32_t e0, float* f) noexcept {
  static_assert(is_quantized(DT));
  const unsigned char* block = row + (e0 / kQuantBlock) * dtype_block_bytes(DT);
  const uint32_t o = e0 % kQuantBlock;
  const uint16_t bits = static_cast<uint16_t>(block[0] | (block[1] << 8));
#if defined(__CUDA_ARCH__)
  const float d = __half2float(__ushort_as_half(bits));  // the hardware conversion (exact)
#else
  const float d = f16_to_float(f16_t{bits});
#endif
  if constexpr (DT == dtype::kQ8_0) {
    INSTINFER_UNROLL
    for (uint32_t i = 0; i < 8; ++i) f[i] = static_cast<float>(static_cast<int8_t>(block[2 + o + i])) * d;
  } else {
    const uint32_t shift = o < 16 ? 0u : 4u;
    INSTINFER_UNROLL
    for (uint32_t i = 0; i < 8; ++i)
      f[i] = static_cast<float>(static_cast<int>((block[2 + o % 16 + i] >> shift) & 0xfu) - 8) * d;
  }
}

// The logit of one (query head, token): scale, then the optional soft-cap (same order as the host).
INSTINFER_HOST_DEVICE INSTINFER_INLINE float decode_logit(float dot, float scale, float softcap) noexcept {
  return apply_softcap(dot * scale, softcap);
}

// Fold one tile's tokens of one row group into its running states.
//   s: [Tokens][Group] logits (-inf for tokens outside the range), v: [Tokens][Elems] V elements
//   (zeros for tokens outside the range), st: [Group] running stats, o: [Group][Elems] running
//   unnormalised outputs. The tile becomes a local state (max first, one exp per token) that is
//   merged with state.hpp's merge_state, so the kernel's math is the host's math.
template <uint32_t Tokens, uint32_t Group, uint32_t Elems>
INSTINFER_HOST_DEVICE INSTINFER_INLINE void fold_tile(const float (&s)[Tokens][Group], const float (&v)[Tokens][Elems],
                                                      softmax_stats (&st)[Group], float (&o)[Group][Elems]) noexcept {
  INSTINFER_UNROLL
  for (uint32_t g = 0; g < Group; ++g) {
    softmax_stats local{};
    INSTINFER_UNROLL
    for (uint32_t j = 0; j < Tokens; ++j) local.m = s[j][g] > local.m ? s[j][g] : local.m;
    float p[Tokens];
    const bool any = local.m > -INFINITY;
    INSTINFER_UNROLL
    for (uint32_t j = 0; j < Tokens; ++j) {
      p[j] = any ? expf(s[j][g] - local.m) : 0.0f;  // an out-of-range token (-inf) gives exactly 0
      local.d += p[j];
    }
    if (!any) continue;  // nothing to merge: the running state stays as it was
    float lo[Elems];
    INSTINFER_UNROLL
    for (uint32_t e = 0; e < Elems; ++e) {
      float acc = 0.0f;
      INSTINFER_UNROLL
      for (uint32_t j = 0; j < Tokens; ++j) acc += p[j] * v[j][e];
      lo[e] = acc;
    }
    merge_state(st[g], o[g], local, lo, Elems);
  }
}

// Tokens of a sequence with n_chunks chunks whose last chunk holds last_len tokens.
INSTINFER_HOST_DEVICE INSTINFER_INLINE uint32_t seq_tokens(uint32_t n_chunks, uint32_t last_len,
                                                           uint32_t tokens_per_page) noexcept {
  return n_chunks == 0 ? 0u : (n_chunks - 1) * tokens_per_page + last_len;
}

// Byte offset in the pool of row `row` (of its page) of (kind, kv_head) in chunk `chunk`, laid
// out as chunk_layout says ([K|V][n_kv_heads][tokens_per_page][row]). kind: 0 = K, 1 = V.
INSTINFER_HOST_DEVICE INSTINFER_INLINE uint64_t kv_page_row_offset(uint32_t chunk, uint64_t chunk_bytes,
                                                                   uint32_t page_bytes, uint32_t n_kv_heads,
                                                                   uint32_t kind, uint32_t kv_head, uint32_t row,
                                                                   uint32_t row_bytes) noexcept {
  return uint64_t{chunk} * chunk_bytes + uint64_t{kind * n_kv_heads + kv_head} * page_bytes + uint64_t{row} * row_bytes;
}

// The same for token `token` of the sequence when tokens_per_page = 2^log2_tpp (the dense types;
// a quantized page's tokens_per_page is none: token / tpp and token % tpp there).
INSTINFER_HOST_DEVICE INSTINFER_INLINE uint64_t kv_row_offset(uint32_t chunk, uint64_t chunk_bytes, uint32_t page_bytes,
                                                              uint32_t n_kv_heads, uint32_t kind, uint32_t kv_head,
                                                              uint32_t token, uint32_t log2_tpp,
                                                              uint32_t row_bytes) noexcept {
  return kv_page_row_offset(chunk, chunk_bytes, page_bytes, n_kv_heads, kind, kv_head, token & ((1u << log2_tpp) - 1u),
                            row_bytes);
}

// How a batch is split over token ranges. Sequence b uses splits_for(len_b) splits of
// split_tokens tokens (the last one shorter); blocks beyond that exit at once.
struct decode_split_plan {
  uint32_t split_tokens = 0;  // a multiple of the kernel's tile
  uint32_t max_splits = 1;    // grid extent over splits

  INSTINFER_HOST_DEVICE constexpr uint32_t splits_for(uint32_t n_tokens) const noexcept {
    return n_tokens <= split_tokens ? 1u : (n_tokens + split_tokens - 1) / split_tokens;
  }
};

// Fraction of `waves` full waves of `target_blocks` resident blocks that `blocks` equal blocks use:
// the tail wave of a grid idles the rest of the device.
constexpr double wave_efficiency(uint64_t blocks, uint64_t target_blocks) noexcept {
  const uint64_t waves = (blocks + target_blocks - 1) / target_blocks;
  return static_cast<double>(blocks) / static_cast<double>(waves * target_blocks);
}

// Choose the split over token ranges: `base_blocks` = batch x kv heads x query-head tiles blocks
// without splitting, `target_blocks` = SMs x resident blocks per SM. Among split counts (splits
// of at least kMinSplitTokens tokens, a multiple of the tile) pick the one whose grid fills its
// waves best, preferring fewer splits unless more are clearly (> 2 %) better.
constexpr decode_split_plan plan_decode_splits(uint32_t max_tokens, uint64_t base_blocks, uint64_t target_blocks,
                                               uint32_t tile_tokens) noexcept {
  const auto round_up = [](uint64_t x, uint64_t m) { return (x + m - 1) / m * m; };
  const uint64_t len = max_tokens > 0 ? max_tokens : 1;
  decode_split_plan plan;
  plan.split_tokens = static_cast<uint32_t>(round_up(len, tile_tokens));
  plan.max_splits = 1;
  if (base_blocks == 0 || target_blocks == 0 || len <= kMinSplitTokens) return plan;
  const uint64_t min_split = round_up(kMinSplitTokens, tile_tokens);
  uint64_t max_s = (len + min_split - 1) / min_split;
  const uint64_t useful = 4 * ((target_blocks + base_blocks - 1) / base_blocks);
  if (max_s > useful) max_s = useful;
  double best = wave_efficiency(base_blocks, target_blocks);
  for (uint64_t s = 2; s <= max_s; ++s) {
    uint64_t split = round_up((len + s - 1) / s, tile_tokens);
    if (split < min_split) split = min_split;
    const uint64_t n = (len + split - 1) / split;
    if (n == plan.max_splits) continue;
    const double eff = wave_efficiency(base_blocks * n, target_blocks);
    if (eff > best + 0.02) {
      best = eff;
      plan.split_tokens = static_cast<uint32_t>(split);
      plan.max_splits = static_cast<uint32_t>(n);
    }
  }
  return plan;
}

// The query-head tile the kernel is instantiated for: the largest of 8, 4, 2, 1 dividing group_size.
constexpr uint32_t group_tile_for(uint32_t group_size) noexcept {
  return group_size % 8 == 0 ? 8u : group_size % 4 == 0 ? 4u : group_size % 2 == 0 ? 2u : 1u;
}

namespace detail {
using traits_f16_128_8 = decode_traits<128, 2, 8>;
static_assert(traits_f16_128_8::kLanesPerRow == 16 && traits_f16_128_8::kRowGroups == 8);
static_assert(traits_f16_128_8::kTileTokens == 16 && traits_f16_128_8::kTokensPerGroup == 2);
static_assert(traits_f16_128_8::kElemsPerLane == 8 && traits_f16_128_8::kSmemBytes == 32 * 1024);
using traits_f16_128_4 = decode_traits<128, 2, 4>;
static_assert(traits_f16_128_4::kTileTokens == 32 && traits_f16_128_4::kTokensPerGroup == 4);
static_assert(traits_f16_128_4::kSmemBytes == 64 * 1024);
using traits_f32_256_8 = decode_traits<256, 4, 8>;
static_assert(traits_f32_256_8::kLanesPerRow == 32 && traits_f32_256_8::kVecsPerLane == 2);
static_assert(traits_f32_256_8::kTileTokens == 4 && traits_f32_256_8::kTokensPerGroup == 1);
using traits_f16_64_1 = decode_traits<64, 2, 1>;
static_assert(traits_f16_64_1::kLanesPerRow == 8 && traits_f16_64_1::kRowGroups == 16);
static_assert(traits_f16_64_1::kTileTokens == 64);
// Quantized rows: f16's lanes and tiles over 136-byte (q8_0) / 72-byte (q4_0) rows in 4-byte copies.
using traits_q8_128_4 = traits_for<128, dtype::kQ8_0, 4>;
static_assert(traits_q8_128_4::kRowBytes == 136 && traits_q8_128_4::kCopyBytes == 4);
static_assert(traits_q8_128_4::kLanesPerRow == 16 && traits_q8_128_4::kTileTokens == 32);
static_assert(traits_for<256, dtype::kQ4_0, 8>::kCopyBytes == 16 && traits_for<64, dtype::kQ4_0, 1>::kRowBytes == 36);
static_assert(std::is_same_v<traits_for<128, dtype::kF16, 8>, traits_f16_128_8>);
static_assert(plan_decode_splits(32768, 1056, 528, 16).max_splits == 1);  // two full waves already
static_assert(plan_decode_splits(32768, 128, 396, 32).max_splits == 3);   // 384 of 396 slots, one wave
static_assert(plan_decode_splits(32768, 8, 528, 16).max_splits == 63);    // 504 of 528 slots; 64 is < 2 % better
static_assert(plan_decode_splits(100, 1, 528, 16).split_tokens == 112);
static_assert(group_tile_for(6) == 2 && group_tile_for(7) == 1 && group_tile_for(16) == 8);
}  // namespace detail

}  // namespace instinfer::cuda
