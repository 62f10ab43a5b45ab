// The page-summary sparse policy (Quest-style), the algorithm only: per page group (one chunk's
// token range, tokens_per_page tokens) and kv head, the per-channel min and max of K; an upper
// bound of every logit of the group from them; the top groups under a budget; exact attention
// over the chosen groups' pages, read whole (a flash page costs one read however few of its rows
// are used, so the policy picks pages, not tokens, and keeps no column copy).
//
// Bound: for a query q and any row k of the group, q.k = sum_c q_c k_c <= sum_c max(q_c min_c,
// q_c max_c). GQA: a group's score is the max of the bound over the kv head's query heads (the
// pages are read once for all of them, so a page any query head needs is kept; the sum would let
// one head's large bounds hide another head's one important page).
//
// Summaries are f32 (min and max are values of the cache dtype, exact in f32): 2 x head_dim x 4
// bytes per (group, kv head) beside the group's K and V pages, 2 x tokens_per_page x row bytes.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>

#include "instinfer/attention/sparf/params.hpp"
#include "instinfer/attention/sparf/top_k.hpp"
#include "instinfer/core/dtype.hpp"

namespace instinfer {

// One group's summary: [n_kv_heads][2][head_dim] f32, min row then max row per kv head.
inline constexpr size_t page_summary_floats(uint32_t n_kv_heads, uint32_t head_dim) noexcept {
  return size_t{2} * n_kv_heads * head_dim;
}

// An empty summary: min = +inf, max = -inf (the first folded row sets both).
inline void page_summary_clear(float* summary, uint32_t n_kv_heads, uint32_t head_dim) noexcept {
  for (uint32_t h = 0; h < n_kv_heads; ++h) {
    float* mn = summary + size_t{2} * h * head_dim;
    std::fill(mn, mn + head_dim, std::numeric_limits<float>::infinity());
    std::fill(mn + head_dim, mn + 2 * head_dim, -std::numeric_limits<float>::infinity());
  }
}

// Folds n K rows [n][n_kv_heads][head_dim] of `t` (row bytes dtype_row_bytes(t, head_dim)) into
// one group's summary. Quantized rows are read as the decode kernel reads them (load_as_float).
inline void page_summary_fold(float* summary, uint32_t n_kv_heads, uint32_t head_dim, dtype t, const std::byte* k,
                              uint32_t n) noexcept {
  const size_t row = dtype_row_bytes(t, head_dim);
  for (uint32_t i = 0; i < n; ++i)
    for (uint32_t h = 0; h < n_kv_heads; ++h) {
      const std::byte* r = k + (size_t{i} * n_kv_heads + h) * row;
      float* mn = summary + size_t{2} * h * head_dim;
      float* mx = mn + head_dim;
      if (t == dtype::kF32) {  // the common dense case without a per-element switch
        const float* x = reinterpret_cast<const float*>(r);
        for (uint32_t c = 0; c < head_dim; ++c) {
          mn[c] = std::min(mn[c], x[c]);
          mx[c] = std::max(mx[c], x[c]);
        }
        continue;
      }
      for (uint32_t c = 0; c < head_dim; ++c) {
        const float x = load_as_float(r, t, c);
        mn[c] = std::min(mn[c], x);
        mx[c] = std::max(mx[c], x);
      }
    }
}

// The group's score for one kv head: max over the group_size query heads q [group_size][head_dim]
// of sum_c max(q_c min_c, q_c max_c). Ranking only: the logit scale (positive) and a soft-cap
// (monotone) do not change the order, so neither is applied.
inline float page_summary_score(const float* summary_head, const float* q, uint32_t group_size,
                                uint32_t head_dim) noexcept {
  const float* mn = summary_head;
  const float* mx = summary_head + head_dim;
  float best = -std::numeric_limits<float>::infinity();
  constexpr uint32_t kLanes = 8;  // independent partial sums: vectorised, no serial add chain
  for (uint32_t g = 0; g < group_size; ++g) {
    const float* qg = q + size_t{g} * head_dim;
    float acc[kLanes] = {};
    uint32_t c = 0;
    for (; c + kLanes <= head_dim; c += kLanes)
      for (uint32_t l = 0; l < kLanes; ++l) acc[l] += std::max(qg[c + l] * mn[c + l], qg[c + l] * mx[c + l]);
    float s = 0.0f;
    for (; c < head_dim; ++c) s += std::max(qg[c] * mn[c], qg[c] * mx[c]);
    for (uint32_t l = 0; l < kLanes; ++l) s += acc[l];
    best = std::max(best, s);
  }
  return best;
}

// How many groups one sequence reads, and which are mandatory.
struct page_summary_plan {
  uint32_t n_groups = 0;      // ceil(n_tokens / tokens_per_page)
  uint32_t n_select = 0;      // groups read per kv head (mandatory ones included)
  uint32_t sink_groups = 0;   // groups [0, sink_groups) always read
  uint32_t window_first = 0;  // groups [window_first, n_groups) always read (n_groups: none)
  uint32_t n_mandatory = 0;   // size of the union of both ranges
};

// The budget of sparf_params for the page policy (see sparf_params::policy). n_tokens == 0
// resolves to an empty plan.
inline result<page_summary_plan> page_summary_resolve(const sparf_params& p, uint32_t head_dim,
                                                      uint32_t tokens_per_page, uint32_t n_tokens) {
  INSTINFER_TRY(p.validate(head_dim));
  if (tokens_per_page == 0) return status{errc::kInvalidArgument, "page summary: tokens_per_page is 0"};
  page_summary_plan plan;
  if (n_tokens == 0) return plan;
  const uint32_t tpp = tokens_per_page;
  plan.n_groups = (n_tokens + tpp - 1) / tpp;
  if (p.mode == sparf_mode::kExplicit) {
    if (p.k > n_tokens)
      return status{errc::kInvalidArgument, "page summary: k = " + std::to_string(p.k) + " exceeds the sequence's " +
                                                std::to_string(n_tokens) + " tokens"};
    plan.n_select = (p.k + tpp - 1) / tpp;
  } else {
    const double want = std::ceil(p.compression * plan.n_groups);
    plan.n_select = static_cast<uint32_t>(std::clamp(want, 1.0, static_cast<double>(plan.n_groups)));
  }
  const uint32_t sinks = std::min(p.sink_tokens, n_tokens);
  const uint32_t window = std::min(p.window_tokens, n_tokens - sinks);
  plan.sink_groups = (sinks + tpp - 1) / tpp;
  plan.window_first = window ? (n_tokens - window) / tpp : plan.n_groups;
  plan.n_mandatory = plan.sink_groups + (plan.n_groups - std::max(plan.window_first, plan.sink_groups));
  plan.n_select = std::clamp(plan.n_select, plan.n_mandatory, plan.n_groups);
  return plan;
}

// The chosen groups of one kv head, ascending: the mandatory ones and the highest scores among
// the rest (ties: the lower group; NaN ranks last). scores: [n_groups]; scratch: room for
// 2 x n_groups; out: n_select. Returns the number written (plan.n_select). The free groups lie
// between the sinks and the window, one range, so the radix top-k of SparF (top_k.hpp) picks them
// in ascending order and no sort is needed.
inline uint32_t page_summary_select(const page_summary_plan& plan, const float* scores, uint32_t* scratch,
                                    uint32_t* out) noexcept {
  const uint32_t n = plan.n_groups;
  const uint32_t free_lo = std::min(plan.sink_groups, n);
  const uint32_t free_hi = std::max(plan.window_first, free_lo);
  const uint32_t want = plan.n_select - plan.n_mandatory;  // <= free_hi - free_lo by page_summary_resolve
  uint32_t m = 0;
  for (uint32_t g = 0; g < free_lo; ++g) out[m++] = g;
  m += sparf_detail::top_ascending(scores, free_lo, free_hi, nullptr, 1, want, out + m, scratch);
  for (uint32_t g = free_hi; g < n; ++g) out[m++] = g;
  return m;
}

}  // namespace instinfer
