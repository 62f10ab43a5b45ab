// A CPU replay of the CUDA decode kernel's work partition and merge order (device/cuda/decode.cu),
// built from the same decode_math.hpp / state.hpp functions. It lets every CI run check the
// kernel's tiling, masking, row-group and split merges against the float64 reference, without a GPU.
// The only difference from the kernel: a dot product is summed in one sequence instead of per
// lane followed by a shuffle tree (a rounding-order difference, nothing structural).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "instinfer/core/dtype.hpp"
#include "instinfer/cuda/decode_math.hpp"
#include "instinfer/layout/chunk_layout.hpp"

namespace instinfer::test {

struct emulated_sequence {
  const uint32_t* chunks = nullptr;  // chunk ids, in token order
  uint32_t n_tokens = 0;
  const float* q = nullptr;  // [n_q_heads][head_dim]
  float* out = nullptr;      // [n_q_heads][head_dim]
  float* lse = nullptr;      // [n_q_heads]
};

// One (sequence, kv head, query-head tile) over all its splits, as the kernel's blocks and the
// merge kernel compute it. pool: chunks of cl.chunk_bytes() bytes at pool + id * chunk_bytes.
// A row's values as the kernel reads them: element by element (dense), or dequantize8 per lane
// vector (quantized).
template <uint32_t HeadDim>
void row_values(const std::byte* row, dtype t, float* out) {
  if (t == dtype::kQ8_0 || t == dtype::kQ4_0) {
    const auto* r = reinterpret_cast<const unsigned char*>(row);
    for (uint32_t e = 0; e < HeadDim; e += 8) {
      if (t == dtype::kQ8_0)
        cuda::dequantize8<dtype::kQ8_0>(r, e, out + e);
      else
        cuda::dequantize8<dtype::kQ4_0>(r, e, out + e);
    }
    return;
  }
  for (uint32_t e = 0; e < HeadDim; ++e) out[e] = load_as_float(row, t, e);
}

template <uint32_t HeadDim, uint32_t ElemBytes, uint32_t G, uint32_t RowBytes = HeadDim* ElemBytes>
void emulate_head_tile(const chunk_layout& cl, const std::byte* pool, const emulated_sequence& seq, uint32_t group_size,
                       uint32_t kv_head, uint32_t q_tile, float scale, float softcap, cuda::decode_split_plan plan) {
  using tr = cuda::decode_traits<HeadDim, ElemBytes, G, RowBytes>;
  constexpr uint32_t T = tr::kTileTokens;
  const dtype t = cl.page.kv_dtype;
  const uint32_t tpp = cl.tokens();  // the kernel: a shift for dense pages, a division for quantized
  const uint32_t q_head0 = kv_head * group_size + q_tile * G;
  const uint32_t n_splits = plan.splits_for(seq.n_tokens);

  std::vector<softmax_stats> split_stats(size_t{n_splits} * G);
  std::vector<float> split_o(size_t{n_splits} * G * HeadDim);
  for (uint32_t split = 0; split < n_splits; ++split) {
    const uint32_t tok_begin = split * plan.split_tokens;
    const uint32_t tok_end = std::min(seq.n_tokens, tok_begin + plan.split_tokens);
    const uint32_t n_tiles = (tok_end - tok_begin + T - 1) / T;
    softmax_stats st[tr::kRowGroups][G];
    static float o[tr::kRowGroups][G][HeadDim];  // static: keep large arrays off the stack
    for (auto& a : o)
      for (auto& b : a)
        for (float& x : b) x = 0.0f;
    for (auto& a : st)
      for (auto& b : a) b = softmax_stats{};

    for (uint32_t tile = 0; tile < n_tiles; ++tile) {
      const uint32_t t0 = tok_begin + tile * T;
      for (uint32_t ty = 0; ty < tr::kRowGroups; ++ty) {
        float s[tr::kTokensPerGroup][G];
        float v[tr::kTokensPerGroup][HeadDim];
        for (uint32_t j = 0; j < tr::kTokensPerGroup; ++j) {
          const uint32_t token = t0 + ty + j * tr::kRowGroups;
          const bool valid = token < tok_end;
          float kf[HeadDim];
          if (valid) {
            const uint32_t chunk = seq.chunks[token / tpp];
            const std::byte* krow = pool + cuda::kv_page_row_offset(chunk, cl.chunk_bytes(), cl.page.page_bytes,
                                                                    cl.n_kv_heads, 0, kv_head, token % tpp, RowBytes);
            const std::byte* vrow = pool + cuda::kv_page_row_offset(chunk, cl.chunk_bytes(), cl.page.page_bytes,
                                                                    cl.n_kv_heads, 1, kv_head, token % tpp, RowBytes);
            row_values<HeadDim>(krow, t, kf);
            row_values<HeadDim>(vrow, t, v[j]);
          } else {
            for (uint32_t e = 0; e < HeadDim; ++e) v[j][e] = 0.0f;
          }
          for (uint32_t g = 0; g < G; ++g) {
            const float* qh = seq.q + size_t{q_head0 + g} * HeadDim;
            float dot = 0.0f;
            if (valid)
              for (uint32_t e = 0; e < HeadDim; ++e) dot = std::fma(qh[e], kf[e], dot);
            s[j][g] = valid ? cuda::decode_logit(dot, scale, softcap) : -INFINITY;
          }
        }
        cuda::fold_tile(s, v, st[ty], o[ty]);
      }
    }
    // Row groups: group 0 folds in groups 1.. in order.
    for (uint32_t r = 1; r < tr::kRowGroups; ++r)
      for (uint32_t g = 0; g < G; ++g) merge_state(st[0][g], o[0][g], st[r][g], o[r][g], HeadDim);
    for (uint32_t g = 0; g < G; ++g) {
      split_stats[size_t{split} * G + g] = st[0][g];
      for (uint32_t e = 0; e < HeadDim; ++e) split_o[(size_t{split} * G + g) * HeadDim + e] = o[0][g][e];
    }
  }
  // Splits merge in split order (the merge kernel), then normalise.
  for (uint32_t g = 0; g < G; ++g) {
    softmax_stats acc = split_stats[g];
    float* acc_o = &split_o[size_t{g} * HeadDim];
    for (uint32_t split = 1; split < n_splits; ++split)
      merge_state(acc, acc_o, split_stats[size_t{split} * G + g], &split_o[(size_t{split} * G + g) * HeadDim], HeadDim);
    normalize_state(acc, acc_o, HeadDim);
    float* dst = seq.out + size_t{q_head0 + g} * HeadDim;
    for (uint32_t e = 0; e < HeadDim; ++e) dst[e] = acc_o[e];
    if (seq.lse != nullptr) seq.lse[q_head0 + g] = state_lse(acc);
  }
}

// Every kv head and query-head tile of one sequence.
template <uint32_t HeadDim, uint32_t ElemBytes, uint32_t G, uint32_t RowBytes = HeadDim* ElemBytes>
void emulate_sequence(const chunk_layout& cl, const std::byte* pool, const emulated_sequence& seq, uint32_t group_size,
                      float scale, float softcap, cuda::decode_split_plan plan) {
  for (uint32_t h = 0; h < cl.n_kv_heads; ++h)
    for (uint32_t qt = 0; qt < group_size / G; ++qt)
      emulate_head_tile<HeadDim, ElemBytes, G, RowBytes>(cl, pool, seq, group_size, h, qt, scale, softcap, plan);
}

}  // namespace instinfer::test
