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
#include <limits>

#include "instinfer/attention/sparf/params.hpp"
#include "instinfer/attention/sparf/workspace.hpp"
#include "instinfer/attention/state.hpp"

namespace instinfer {

namespace sparf_detail {

// n stored elements -> float. f16 without a table or branches: the 15 magnitude bits shifted
// into an f32 and rescaled by 2^112 give normals and subnormals exactly; inf/NaN are patched.
inline void widen(const std::byte* src, dtype t, float* dst, uint32_t n) noexcept {
  if (t != dtype::kF16) {
    convert_elements(src, t, dst, dtype::kF32, n);
    return;
  }
  for (uint32_t i = 0; i < n; ++i) {
    uint16_t h;
    std::memcpy(&h, src + size_t{i} * 2, 2);
    const uint32_t magnitude = static_cast<uint32_t>(h & 0x7fffu) << 13;
    float f = bits_float(magnitude) * 0x1p112f;
    if ((h & 0x7c00u) == 0x7c00u) f = bits_float(magnitude | 0x7f800000u);
    dst[i] = bits_float(float_bits(f) | (static_cast<uint32_t>(h & 0x8000u) << 16));
  }
}

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
// the ranking score (logit for G == 1, summed probability otherwise).
inline void approximate_scores(const sparf_config& cfg, const sparf_columns& cols, uint32_t n, const float* q,
                               uint32_t kv_head, const uint32_t* channels, const sparf_channel_choice& choice,
                               sparf_workspace& ws, sparf_counters& c) noexcept {
  const uint32_t d = cfg.head_dim(), G = cfg.group_size;
  const channel_layout& cl = cfg.columns;
  const dtype t = cl.column_dtype();  // f16 for a quantized cache (channel_layout.hpp)
  const uint32_t es = cl.elem_bytes();
  const float scale = cfg.effective_scale();
  // Temperature per query head: scale / sqrt(|q[I]|_1 / |q|_1) (exactly `scale` when I is all).
  for (uint32_t g = 0; g < G; ++g) {
    const float* qg = q + size_t{g} * d;
    float all = 0.0f, sel = 0.0f;
    for (uint32_t i = 0; i < d; ++i) all += std::fabs(qg[i]);
    for (uint32_t j = 0; j < choice.n_channels; ++j) sel += std::fabs(qg[channels[j]]);
    ws.head_scale_[g] = (sel > 0.0f && all > 0.0f && choice.n_channels < d) ? scale / std::sqrt(sel / all) : scale;
  }
  float* approx = ws.approx_.data();
  std::fill(approx, approx + size_t{G} * n, 0.0f);
  float* col = ws.column_.data();
  for (uint32_t b = 0; b < cols.n_blocks; ++b) {
    const uint32_t first = b * cl.tokens_per_page;
    const uint32_t count = std::min(cl.tokens_per_page, n - first);
    for (uint32_t j = 0; j < choice.n_channels; ++j) {
      const uint32_t ch = channels[j];
      const std::byte* src =
          cols.pages ? cols.pages[size_t{b} * cl.pages_per_block() + cl.page_index(kv_head, cl.group_of(ch))] +
                           cl.in_page_offset(ch, 0)
                     : cols.blocks[b] + cl.offset(kv_head, 0, ch);
      widen(src, t, col, count);
      for (uint32_t g = 0; g < G; ++g) {
        const float qv = q[size_t{g} * d + ch];
        float* a = approx + size_t{g} * n + first;
        for (uint32_t i = 0; i < count; ++i) a[i] += qv * col[i];
      }
    }
    if (count == cl.tokens_per_page) {  // a written block: pages read from storage
      c.channel_pages_read += choice.pages_per_block;
      c.channel_bytes_used += uint64_t{choice.n_channels} * count * es;
    } else {  // the tail block: still in the group buffer
      c.buffered_channel_bytes += uint64_t{choice.n_channels} * count * es;
    }
  }
  // Approximate softmax per query head, in place: logits, max, then probabilities.
  for (uint32_t g = 0; g < G; ++g) {
    float* a = approx + size_t{g} * n;
    const float hs = ws.head_scale_[g];
    softmax_stats s;
    for (uint32_t i = 0; i < n; ++i) {
      a[i] = apply_softcap(a[i] * hs, cfg.softcap);
      s.m = std::max(s.m, a[i]);
    }
    if (G == 1) std::copy(a, a + n, ws.rank_.data());  // rank by logit: exp underflow makes no ties
    if (s.m == -std::numeric_limits<float>::infinity()) {
      std::fill(a, a + n, 0.0f);
      continue;
    }
    for (uint32_t i = 0; i < n; ++i) {
      a[i] = expf(a[i] - s.m);
      s.d += a[i];
    }
    const float inv = 1.0f / s.d;
    for (uint32_t i = 0; i < n; ++i) a[i] *= inv;
  }
  if (G > 1) {
    float* rank = ws.rank_.data();
    std::fill(rank, rank + n, 0.0f);
    for (uint32_t g = 0; g < G; ++g)
      for (uint32_t i = 0; i < n; ++i) rank[i] += approx[size_t{g} * n + i];
  }
}

// Step 3: the top k of the candidate pages into order[0, k), ascending; returns k.
inline uint32_t top_tokens(const sparf_config& cfg, const sparf_plan& plan, double page_spread, uint32_t n,
                           uint32_t n_pages, uint32_t* order, sparf_workspace& ws) noexcept {
  const uint32_t tpp = cfg.tokens.page.tokens_per_page;
  uint32_t k = std::min(plan.k, n);
  uint32_t n_cand = n;
  const uint32_t max_pages =
      page_spread > 0.0
          ? static_cast<uint32_t>(std::min<double>(n_pages, std::ceil(page_spread * ((k + tpp - 1) / tpp))))
          : n_pages;
  if (k < n && max_pages < n_pages) {
    // Candidate pages: the max_pages token pages of largest approximate mass.
    const float* mass = cfg.group_size == 1 ? ws.approx_.data() : ws.rank_.data();
    float* ps = ws.page_score_.data();
    uint32_t* po = ws.page_order_.data();
    uint8_t* pick = ws.page_pick_.data();
    for (uint32_t pg = 0; pg < n_pages; ++pg) {
      float s = 0.0f;
      for (uint32_t i = pg * tpp, e = std::min(n, i + tpp); i < e; ++i) s += mass[i];
      ps[pg] = s;
      po[pg] = pg;
      pick[pg] = 0;
    }
    std::nth_element(po, po + max_pages, po + n_pages, by_score{ps});
    for (uint32_t j = 0; j < max_pages; ++j) pick[po[j]] = 1;
    n_cand = 0;
    for (uint32_t i = 0; i < n; ++i)
      if (pick[i / tpp]) order[n_cand++] = i;
    k = std::min(k, n_cand);
  } else {
    for (uint32_t i = 0; i < n; ++i) order[i] = i;
  }
  if (k < n_cand) {
    std::nth_element(order, order + k, order + n_cand, by_score{ws.rank_.data()});
    std::sort(order, order + k);
  }
  return k;
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
  if (!keep_all) sparf_detail::approximate_scores(cfg, cols, n, q, kv_head, channels, choice, ws, c);
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
