// Online-softmax state: all of instinfer's softmax and merge math, in one place.
//
// A partial attention result over a subset of tokens is (m, d, o): the running max logit m, the
// denominator d = sum exp(s_i - m), and the *unnormalised* output o = sum exp(s_i - m) v_i.
// Partials over disjoint token sets merge exactly in any order; `normalize` gives o / d and
// lse = m + log(d). Host kernels, the CSD engine and CUDA kernels all use these functions
// (they are host-and-device). Decode drivers merge a row's partials with `merge_partials` and write
// results with `write_normalized`; results from different tiers merge through `merge_normalized`.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "instinfer/core/config.hpp"

namespace instinfer {

struct softmax_stats {
  float m = -std::numeric_limits<float>::infinity();  // max logit seen; -inf when empty
  float d = 0.0f;                                     // sum of exp(logit - m)

  INSTINFER_HOST_DEVICE constexpr bool empty() const noexcept { return d == 0.0f; }
};

// Rescale factors to merge `b` into `a`: new m, and the factors for a's and b's sums.
struct merge_factors {
  float m;
  float scale_a;
  float scale_b;
};

INSTINFER_HOST_DEVICE INSTINFER_INLINE merge_factors merge_factors_for(softmax_stats a, softmax_stats b) noexcept {
  // An empty side has m = -inf; never form (-inf) - (-inf).
  if (b.empty()) return {a.m, 1.0f, 0.0f};
  if (a.empty()) return {b.m, 0.0f, 1.0f};
  const float m = a.m > b.m ? a.m : b.m;
  return {m, expf(a.m - m), expf(b.m - m)};
}

// a := a (+) b for the stats and the unnormalised outputs (n elements each).
INSTINFER_HOST_DEVICE INSTINFER_INLINE void merge_state(softmax_stats& a, float* o_a, softmax_stats b, const float* o_b,
                                                        uint32_t n) noexcept {
  const merge_factors f = merge_factors_for(a, b);
  for (uint32_t i = 0; i < n; ++i) o_a[i] = o_a[i] * f.scale_a + o_b[i] * f.scale_b;
  a.d = a.d * f.scale_a + b.d * f.scale_b;
  a.m = f.m;
}

// Natural-log sum of exponentials of the logits covered: m + log(d); -inf when empty.
INSTINFER_HOST_DEVICE INSTINFER_INLINE float state_lse(softmax_stats s) noexcept {
  return s.empty() ? -std::numeric_limits<float>::infinity() : s.m + logf(s.d);
}

// o := o / d (zeros when empty: attention over no tokens contributes nothing).
INSTINFER_HOST_DEVICE INSTINFER_INLINE void normalize_state(softmax_stats s, float* o, uint32_t n) noexcept {
  const float inv = s.empty() ? 0.0f : 1.0f / s.d;
  for (uint32_t i = 0; i < n; ++i) o[i] *= inv;
}

// Merges partials [first, last) in that order into one row: `n_states` states of `head_dim` each.
//   stats: [..][n_states], o: [..][n_states][head_dim], both indexed by partial
//   out_stats: [n_states]; out: [n_states][head_dim] unnormalised (written, not accumulated)
// The first partial is copied and the rest merged into it, so the order (token order, in every
// driver) fixes the rounding. An empty range gives empty states and zeros.
INSTINFER_HOST_DEVICE INSTINFER_INLINE void merge_partial_range(const softmax_stats* stats, const float* o,
                                                                uint32_t first, uint32_t last, uint32_t n_states,
                                                                uint32_t head_dim, softmax_stats* out_stats,
                                                                float* out) noexcept {
  const uint64_t row_floats = uint64_t{n_states} * head_dim;
  if (first >= last) {
    for (uint32_t h = 0; h < n_states; ++h) out_stats[h] = softmax_stats{};
    for (uint64_t i = 0; i < row_floats; ++i) out[i] = 0.0f;
    return;
  }
  const float* o_first = o + uint64_t{first} * row_floats;
  for (uint64_t i = 0; i < row_floats; ++i) out[i] = o_first[i];
  for (uint32_t h = 0; h < n_states; ++h) out_stats[h] = stats[uint64_t{first} * n_states + h];
  for (uint32_t p = first + 1; p < last; ++p) {
    const float* op = o + uint64_t{p} * row_floats;
    const softmax_stats* sp = stats + uint64_t{p} * n_states;
    for (uint32_t h = 0; h < n_states; ++h)
      merge_state(out_stats[h], out + uint64_t{h} * head_dim, sp[h], op + uint64_t{h} * head_dim, head_dim);
  }
}

// Merges a CSR of partials: output row r is partials [indptr[r], indptr[r + 1]) in order (as
// FlashInfer's VariableLengthMergeStates). out_stats: [n_rows][n_states]; out: [n_rows][n_states][head_dim].
INSTINFER_HOST_DEVICE INSTINFER_INLINE void merge_partials(const uint32_t* indptr, uint32_t n_rows,
                                                           const softmax_stats* stats, const float* o,
                                                           uint32_t n_states, uint32_t head_dim,
                                                           softmax_stats* out_stats, float* out) noexcept {
  for (uint32_t r = 0; r < n_rows; ++r)
    merge_partial_range(stats, o, indptr[r], indptr[r + 1], n_states, head_dim, out_stats + uint64_t{r} * n_states,
                        out + uint64_t{r} * n_states * head_dim);
}

// The one writer of final results: out = o / d per state (zeros when empty) and, when lse is not
// null, lse = m + log(d) (-inf when empty). out may alias o.
//   stats: [n_states]; o, out: [n_states][head_dim]; lse: [n_states] or null
INSTINFER_HOST_DEVICE INSTINFER_INLINE void write_normalized(const softmax_stats* stats, const float* o,
                                                             uint32_t n_states, uint32_t head_dim, float* out,
                                                             float* lse) noexcept {
  for (uint32_t h = 0; h < n_states; ++h) {
    const float inv = stats[h].empty() ? 0.0f : 1.0f / stats[h].d;
    const float* oh = o + uint64_t{h} * head_dim;
    float* dst = out + uint64_t{h} * head_dim;
    for (uint32_t i = 0; i < head_dim; ++i) dst[i] = oh[i] * inv;
    if (lse != nullptr) lse[h] = state_lse(stats[h]);
  }
}

// Merge two normalised partials (o, lse) over disjoint token sets into (out, out_lse).
// out may alias o_a or o_b. This is the cross-tier API: e.g. a hot window in RAM and cold pages on a CSD.
INSTINFER_HOST_DEVICE INSTINFER_INLINE void merge_normalized(const float* o_a, float lse_a, const float* o_b,
                                                             float lse_b, float* out, float* out_lse,
                                                             uint32_t n) noexcept {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  if (lse_b == kNegInf) {
    for (uint32_t i = 0; i < n; ++i) out[i] = o_a[i];
    *out_lse = lse_a;
    return;
  }
  if (lse_a == kNegInf) {
    for (uint32_t i = 0; i < n; ++i) out[i] = o_b[i];
    *out_lse = lse_b;
    return;
  }
  const float m = lse_a > lse_b ? lse_a : lse_b;
  const float wa = expf(lse_a - m);
  const float wb = expf(lse_b - m);
  const float inv = 1.0f / (wa + wb);
  for (uint32_t i = 0; i < n; ++i) out[i] = (o_a[i] * wa + o_b[i] * wb) * inv;
  *out_lse = m + logf(wa + wb);
}

// Logit soft-capping (Gemma-2 style): cap * tanh(x / cap); cap <= 0 disables it.
INSTINFER_HOST_DEVICE INSTINFER_INLINE float apply_softcap(float logit, float cap) noexcept {
  return cap > 0.0f ? cap * tanhf(logit / cap) : logit;
}

}  // namespace instinfer
