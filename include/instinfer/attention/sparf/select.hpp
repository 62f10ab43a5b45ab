// SparF steps 1-3 for one (sequence, layer, kv head) and the query heads of its GQA group:
// choose channels from |q|, score every token approximately from those K columns only, keep the
// top k tokens of the most promising token pages, and compute alpha, the approximate softmax
// mass of the kept tokens per query head. The result is an explicit `sparf_selection` that the
// exact pass (exact.hpp) takes as input, so a storage tier can read just the token pages the
// selection names in between the two calls (dual-step loading).
//
// Step details:
//   1. channels: the top r hidden channels by |q| summed over the group's query heads; with
//      `whole_pages` (default) whole column pages are chosen instead: the channel groups of the
//      column layout ranked by their summed |q|, ceil(r / channels_per_page) of them, since a page
//      read costs the same for one of its channels as for all.
//   2. approximate scores q[I].K[t, I] with the temperature sqrt(d * |q[I]|_1 / |q|_1) in place of
//      sqrt(d) (SparQ's correction for the variance the dropped channels would have added; with a
//      custom `scale` s the approximate scale is s / sqrt(|q[I]|_1 / |q|_1)).
//   3. tokens: the top k by approximate score (per group: by the sum over the group's query heads
//      of their approximate probabilities). Flash-aware: a token page costs one read whether one
//      or all of its rows are used, so candidates are first limited to the page_spread *
//      ceil(k / tokens_per_page) token pages of largest approximate mass (0: no limit). alpha
//      accounts for the mass left out.
// GQA: the selection is per group, not per query head (separate selections would read up to
// group_size times the pages); each query head keeps its own temperature and alpha.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>

#include "instinfer/attention/sparf/params.hpp"
#include "instinfer/attention/sparf/top_k.hpp"
#include "instinfer/attention/sparf/workspace.hpp"
#include "instinfer/attention/state.hpp"

namespace instinfer {

namespace sparf_detail {

// Ranking order: higher score first, lower token index on ties (deterministic selection).
struct by_score {
  const float* score;
  bool operator()(uint32_t a, uint32_t b) const noexcept {
    return score[a] > score[b] || (score[a] == score[b] && a < b);
  }
};

}  // namespace sparf_detail

// Step 1 for one GQA group: the channels whose K columns are read, ascending, and the column
// pages per column block that costs. The top r of |q| summed over the group's query heads, or,
// with whole_pages, the top ceil(r / channels_per_page) column pages by summed |q|. Separate from
// sparf_select_head so a drive can read just those column pages before it scores the tokens.
// q: [group_size][head_dim]; channels, weight, scratch: head_dim entries each.
struct sparf_channel_choice {
  uint32_t n_channels = 0;
  uint32_t pages_per_block = 0;
};
inline sparf_channel_choice sparf_choose_channels(const sparf_config& cfg, const sparf_plan& plan, bool whole_pages,
                                                  const float* q, uint32_t* channels, float* weight,
                                                  float* scratch) noexcept {
  const uint32_t d = cfg.head_dim();
  const uint32_t G = cfg.group_size;
  const channel_layout& cl = cfg.columns;
  for (uint32_t i = 0; i < d; ++i) {
    float s = 0.0f;
    for (uint32_t g = 0; g < G; ++g) s += std::fabs(q[size_t{g} * d + i]);
    weight[i] = s;
  }
  sparf_channel_choice r;
  if (plan.r >= d) {
    for (uint32_t i = 0; i < d; ++i) channels[i] = i;
    r.n_channels = d;
    r.pages_per_block = cl.groups();
  } else if (whole_pages) {
    const uint32_t cpp = cl.channels_per_page;
    const uint32_t n_groups = cl.groups();
    const uint32_t want = std::min(n_groups, (plan.r + cpp - 1) / cpp);
    float* group_weight = scratch;  // n_groups <= d
    for (uint32_t gr = 0; gr < n_groups; ++gr) {
      float s = 0.0f;
      for (uint32_t j = 0; j < cpp; ++j) s += weight[gr * cpp + j];
      group_weight[gr] = s;
      channels[gr] = gr;
    }
    std::partial_sort(channels, channels + want, channels + n_groups, sparf_detail::by_score{group_weight});
    std::sort(channels, channels + want);
    // Expand groups into their channels, from the back so no group index is overwritten early.
    for (uint32_t i = want; i-- > 0;) {
      const uint32_t gr = channels[i];
      for (uint32_t j = cpp; j-- > 0;) channels[i * cpp + j] = gr * cpp + j;
    }
    r.n_channels = want * cpp;
    r.pages_per_block = want;
  } else {
    for (uint32_t i = 0; i < d; ++i) channels[i] = i;
    std::partial_sort(channels, channels + plan.r, channels + d, sparf_detail::by_score{weight});
    std::sort(channels, channels + plan.r);
    r.n_channels = plan.r;
    for (uint32_t j = 0; j < r.n_channels; ++j)
      if (j == 0 || cl.group_of(channels[j]) != cl.group_of(channels[j - 1])) ++r.pages_per_block;
  }
  return r;
}

// Where the K columns of one (sequence, layer) are: whole column blocks in memory, or single
// column pages fetched from storage ([n_blocks][columns.pages_per_block()], channel_layout::
// page_index; only the chosen channels' pages are dereferenced). The last block may be partial
// (the tail buffer). Exactly one of blocks / pages is non-null when there are tokens.
struct sparf_columns {
  const std::byte* const* blocks = nullptr;
  const std::byte* const* pages = nullptr;
  uint32_t n_blocks = 0;
};

// Steps 1-3 of one GQA group, as a value: the chosen tokens ascending (token order is page order
// for the reads) and each query head's alpha. Points into the caller's arrays (or the workspace's,
// then valid until its next use).
struct sparf_selection {
  const uint32_t* tokens = nullptr;  // [n], ascending, < n_tokens
  uint32_t n = 0;
  const float* alpha = nullptr;  // [group_size], in [0, 1]; 1 when every token is kept
};

namespace sparf_detail {

// Step 2 and the approximate softmax: ws.approx_ := [G][n] approximate probabilities, ws.rank_ :=
// the ranking score (logit for G == 1, summed probability otherwise). The arithmetic is the SIMD
// score kernel of ws's ISA (attention/sparf/score.hpp); false when it cannot be looked up.
inline bool approximate_scores(const sparf_config& cfg, const sparf_columns& cols, uint32_t n, const float* q,
                               uint32_t kv_head, const uint32_t* channels, const sparf_channel_choice& choice,
                               sparf_workspace& ws, sparf_counters& c) noexcept {
  const uint32_t d = cfg.head_dim(), G = cfg.group_size, C = choice.n_channels;
  const channel_layout& cl = cfg.columns;
  const dtype t = cl.column_dtype();  // f16 for a quantized cache (channel_layout.hpp)
  const uint32_t es = cl.elem_bytes();
  const float scale = cfg.effective_scale();
  auto kernel = ws.score_kernel(t);
  if (!kernel.ok()) return false;
  // Temperature per query head: scale / sqrt(|q[I]|_1 / |q|_1) (exactly `scale` when I is all),
  // folded into the kernel's q.
  float* qc = ws.q_channels_.data();
  for (uint32_t g = 0; g < G; ++g) {
    const float* qg = q + size_t{g} * d;
    float all = 0.0f, sel = 0.0f;
    for (uint32_t i = 0; i < d; ++i) all += std::fabs(qg[i]);
    for (uint32_t j = 0; j < C; ++j) sel += std::fabs(qg[channels[j]]);
    const float hs = (sel > 0.0f && all > 0.0f && C < d) ? scale / std::sqrt(sel / all) : scale;
    ws.head_scale_[g] = hs;
    for (uint32_t j = 0; j < C; ++j) qc[size_t{g} * C + j] = qg[channels[j]] * hs;
  }
  const std::byte** ptrs = ws.column_ptrs_.data();
  for (uint32_t b = 0; b < cols.n_blocks; ++b) {
    const uint32_t count = std::min(cl.tokens_per_page, n - b * cl.tokens_per_page);
    for (uint32_t j = 0; j < C; ++j) {
      const uint32_t ch = channels[j];
      ptrs[size_t{b} * C + j] =
          cols.pages ? cols.pages[size_t{b} * cl.pages_per_block() + cl.page_index(kv_head, cl.group_of(ch))] +
                           cl.in_page_offset(ch, 0)
                     : cols.blocks[b] + cl.offset(kv_head, 0, ch);
    }
    if (count == cl.tokens_per_page) {  // a written block: pages read from storage
      c.channel_pages_read += choice.pages_per_block;
      c.channel_bytes_used += uint64_t{C} * count * es;
    } else {  // the tail block: still in the group buffer
      c.buffered_channel_bytes += uint64_t{C} * count * es;
    }
  }
  sparf_score_args args;
  args.columns = ptrs;
  args.n_blocks = cols.n_blocks;
  args.block_tokens = cl.tokens_per_page;
  args.n_tokens = n;
  args.n_channels = C;
  args.group_size = G;
  args.q = qc;
  args.softcap = cfg.softcap;
  args.probs = ws.approx_.data();
  args.rank = ws.rank_.data();
  kernel.value()(args);
  return true;
}

// Step 3: the sinks, the top k - sinks - window of the candidate pages in between and the window
// into order[0, k), ascending; returns k.
inline uint32_t top_tokens(const sparf_config& cfg, const sparf_plan& plan, double page_spread, uint32_t n,
                           uint32_t n_pages, uint32_t* order, sparf_workspace& ws) noexcept {
  const uint32_t tpp = cfg.tokens.page.tokens_per_page;
  const uint32_t S = std::min(plan.sinks, n), W = std::min(plan.window, n - S);
  const uint32_t lo = S, hi = n - W;  // the sparse middle
  const uint32_t k = std::min(plan.k, n);
  const uint32_t k_mid = std::min(k - std::min(k, S + W), hi - lo);
  for (uint32_t i = 0; i < S; ++i) order[i] = i;
  uint32_t* mid = order + S;
  uint32_t got = hi - lo;
  if (k_mid < hi - lo) {
    // Candidate pages (those overlapping the middle): the max_pages of largest approximate mass.
    const uint32_t first_page = lo / tpp, end_page = hi == lo ? first_page : (hi - 1) / tpp + 1;
    const uint32_t mid_pages = end_page - first_page;
    const uint32_t max_pages =
        page_spread > 0.0
            ? static_cast<uint32_t>(std::min<double>(mid_pages, std::ceil(page_spread * ((k_mid + tpp - 1) / tpp))))
            : mid_pages;
    const uint8_t* pick = nullptr;
    if (max_pages < mid_pages) {
      const float* mass = cfg.group_size == 1 ? ws.approx_.data() : ws.rank_.data();
      float* ps = ws.page_score_.data();
      uint8_t* pk = ws.page_pick_.data();
      std::fill(ps, ps + n_pages, 0.0f);
      std::fill(pk, pk + n_pages, uint8_t{0});
      const auto page_sum = [&](uint32_t pg) noexcept {
        float s = 0.0f;
        for (uint32_t i = std::max(pg * tpp, lo), e = std::min(hi, pg * tpp + tpp); i < e; ++i) s += mass[i];
        ps[pg] = s;
      };
      // Whole pages eight at a time: eight independent sums (each in token order, as page_sum
      // adds) instead of one chain of dependent adds.
      uint32_t pg = first_page;
      if (pg < end_page && pg * tpp < lo) page_sum(pg++);
      for (; pg + 8 <= end_page && (pg + 8) * tpp <= hi; pg += 8) {
        float acc[8] = {};
        const float* m0 = mass + size_t{pg} * tpp;
        for (uint32_t i = 0; i < tpp; ++i)
          for (uint32_t x = 0; x < 8; ++x) acc[x] += m0[size_t{x} * tpp + i];
        std::copy(acc, acc + 8, ps + pg);
      }
      for (; pg < end_page; ++pg) page_sum(pg);
      uint32_t* chosen = ws.page_order_.data();
      const uint32_t np =
          top_ascending(ps, first_page, end_page, nullptr, 1, max_pages, chosen, ws.top_scratch_.data());
      for (uint32_t j = 0; j < np; ++j) pk[chosen[j]] = 1;
      pick = pk;
    }
    got = top_ascending(ws.rank_.data(), lo, hi, pick, tpp, k_mid, mid, ws.top_scratch_.data());
  } else {
    for (uint32_t i = lo; i < hi; ++i) mid[i - lo] = i;
  }
  for (uint32_t i = hi; i < n; ++i) mid[got + (i - hi)] = i;
  return S + got + W;
}

}  // namespace sparf_detail

// Steps 1-3 for kv head `kv_head` of one sequence of n_tokens tokens in n_chunks token pages.
// q: the group's query heads, [group_size][head_dim]. tokens_out: room for plan.k tokens and
// alpha_out: [group_size], or null for the workspace's (valid until its next use).
// Preconditions: cfg validated, plan = sparf_resolve(params, head_dim, n_tokens), ws reserved for
// (n_tokens, head_dim, group_size, columns.tokens_per_page). Counters: the item, its dense
// equivalent, the channels and column pages used and the tokens kept.
inline sparf_selection sparf_select_head(const sparf_config& cfg, const sparf_plan& plan, const sparf_params& params,
                                         const sparf_columns& cols, uint32_t n_tokens, uint32_t n_chunks,
                                         const float* q, uint32_t kv_head, sparf_workspace& ws, sparf_counters& c,
                                         uint32_t* tokens_out = nullptr, float* alpha_out = nullptr) noexcept {
  const uint32_t n = n_tokens, G = cfg.group_size;
  uint32_t* order = tokens_out ? tokens_out : ws.order_.data();
  float* alpha = alpha_out ? alpha_out : ws.alpha_.data();
  ++c.items;
  c.dense_pages += 2ull * n_chunks;
  c.dense_bytes += 2ull * n * cfg.tokens.page.row_bytes();
  if (n == 0) return sparf_selection{order, 0, alpha};

  uint32_t* channels = ws.channels_.data();
  const sparf_channel_choice choice =
      sparf_choose_channels(cfg, plan, params.whole_pages, q, channels, ws.weight_.data(), ws.column_.data());
  c.channels_used += choice.n_channels;
  // Every token kept (k >= n, e.g. compression 1): nothing to rank, so no approximate scores and
  // no column pages are read; alpha is 1 and this is dense attention.
  const bool keep_all = plan.k >= n;
  if (!keep_all && !sparf_detail::approximate_scores(cfg, cols, n, q, kv_head, channels, choice, ws, c)) {
    for (uint32_t g = 0; g < G; ++g) alpha[g] = 0.0f;  // no score kernel (see workspace::score_kernel)
    return sparf_selection{order, 0, alpha};
  }
  // top_tokens ranks in ws.order_ (room for every token), then the first k go to tokens_out.
  const uint32_t k = sparf_detail::top_tokens(cfg, plan, params.page_spread, n, n_chunks, ws.order_.data(), ws);
  if (order != ws.order_.data()) std::copy(ws.order_.data(), ws.order_.data() + k, order);
  c.selected_tokens += k;
  for (uint32_t g = 0; g < G; ++g) {
    float mass = 1.0f;
    if (k < n) {
      const float* pg = ws.approx_.data() + size_t{g} * n;
      mass = 0.0f;
      for (uint32_t j = 0; j < k; ++j) mass += pg[order[j]];
      mass = std::clamp(mass, 0.0f, 1.0f);
    }
    alpha[g] = mass;
  }
  return sparf_selection{order, k, alpha};
}

}  // namespace instinfer
