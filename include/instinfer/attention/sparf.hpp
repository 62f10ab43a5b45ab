// SparF: the paper's flash-aware sparse decode attention (a SparQ over flash pages).
//
// For one (sequence, layer, kv_head) and the query heads of its GQA group:
//   1. channels: rank the hidden channels by |q| (summed over the group's query heads) and keep
//      the top r; with `whole_pages` (default) whole column pages are chosen instead: the channel
//      groups of the column layout ranked by their summed |q|, ceil(r / channels_per_page) of
//      them, since a page read costs the same for one of its channels as for all.
//   2. approximate scores: read only those K columns from the channel-indexed copy
//      (layout/channel_layout.hpp) and score every token with q[I].K[t, I], scaled with the
//      temperature sqrt(d * |q[I]|_1 / |q|_1) in place of sqrt(d) (SparQ's correction for the
//      variance the dropped channels would have added; with a custom `scale` s the approximate
//      scale is s / sqrt(|q[I]|_1 / |q|_1)).
//   3. tokens: keep the top k tokens by approximate score (per group: by the sum over the group's
//      query heads of their approximate softmax probabilities). Flash-aware: a token page costs
//      one read whether one or all of its rows are used, and the top k of a real context are
//      spread over many pages, so the candidates are first limited to the token pages with the
//      largest approximate mass, page_spread * ceil(k / tokens_per_page) of them (default 2x the
//      fewest that could hold k tokens; 0 turns it off). alpha accounts for the mass left out.
//   4. exact attention over the chosen tokens only, from their full K and V rows in the
//      token-indexed chunks (layout/chunk_layout.hpp), and the blend
//          out = alpha * softmax(scale * q K_T^T) V_T + (1 - alpha) * mean(V)
//      with alpha the approximate softmax mass of the chosen tokens (per query head) and mean(V)
//      a running mean over all tokens kept beside the index (no extra read).
// Dual-step loading: a page (token-indexed K or V page, or column page) holding no selected entry
// is never read; of the pages read only the selected entries are used (and, on a drive, moved
// over the channel bus). `sparf_counters` counts both: pages read and bytes used.
//
// GQA: the selection (channels and tokens) is per *group*, not per query head. All query heads of
// a group share their kv head's pages; separate selections would read the union of up to
// group_size token sets and channel sets, i.e. up to group_size times the pages, which undoes the
// compression on flash. Each query head keeps its own temperature, exact softmax and alpha.
// With group_size 1 (MHA, the paper's OPT-13B) this is exactly per-head SparQ.
//
// Compression 1 (r = head_dim, k = all tokens) is dense attention: alpha is 1 and the output is
// softmax(scale * q K^T) V over every token (tests check it against the host decode kernels).
// The returned lse is that of the chosen tokens' exact logits minus log(alpha): the estimate of
// the full log-sum-exp that lets a SparF partial merge with other tiers (exact when alpha = 1).
//
// All softmax arithmetic goes through attention/state.hpp.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <new>
#include <span>
#include <string>
#include <vector>

#include "instinfer/attention/state.hpp"
#include "instinfer/core/dtype.hpp"
#include "instinfer/core/status.hpp"
#include "instinfer/layout/channel_layout.hpp"
#include "instinfer/layout/chunk_layout.hpp"

namespace instinfer {

// ---- parameters ---------------------------------------------------------------------------------

enum class sparf_mode : uint8_t {
  kCompression = 0,  // r and k follow from a target fraction of dense K+V traffic
  kExplicit = 1,     // r and k given
};

struct sparf_params {
  static constexpr double kDefaultCompression = 0.125;

  sparf_mode mode = sparf_mode::kCompression;
  double compression = kDefaultCompression;  // kCompression: in (0, 1]
  uint32_t r = 0;                            // kExplicit: channels, [1, head_dim]
  uint32_t k = 0;                            // kExplicit: tokens, [1, n_tokens]
  bool whole_pages = true;                   // choose whole column pages of channels (see above)
  // Token pages that may be read, as a multiple of the fewest that can hold k tokens
  // (ceil(k / tokens_per_page)); 0: no limit (plain SparQ top-k over all tokens). See step 3.
  double page_spread = 2.0;

  static sparf_params with_compression(double c) noexcept {
    sparf_params p;
    p.mode = sparf_mode::kCompression;
    p.compression = c;
    return p;
  }
  static sparf_params with_rk(uint32_t r, uint32_t k) noexcept {
    sparf_params p;
    p.mode = sparf_mode::kExplicit;
    p.r = r;
    p.k = k;
    return p;
  }

  // Checks that do not depend on the sequence length.
  status validate(uint32_t head_dim) const {
    if (!(page_spread == 0.0 || (page_spread >= 1.0 && page_spread <= 1e6)))
      return {errc::kInvalidArgument,
              "SparF page_spread must be 0 (off) or in [1, 1e6], got " + std::to_string(page_spread)};
    if (mode == sparf_mode::kCompression) {
      if (!(compression > 0.0 && compression <= 1.0))  // also rejects NaN
        return {errc::kInvalidArgument, "SparF compression must be in (0, 1] (fraction of dense K+V traffic), got " +
                                            std::to_string(compression)};
      return {};
    }
    if (mode != sparf_mode::kExplicit) return {errc::kInvalidArgument, "unknown SparF mode"};
    if (r == 0 || r > head_dim)
      return {errc::kInvalidArgument, "SparF r (channels) must be in [1, head_dim = " + std::to_string(head_dim) +
                                          "], got " + std::to_string(r)};
    if (k == 0) return {errc::kInvalidArgument, "SparF k (tokens) must be >= 1, got 0"};
    return {};
  }
};

// r and k for one sequence length.
struct sparf_plan {
  uint32_t r = 0;  // channels asked for (whole_pages rounds the channels used up to whole pages)
  uint32_t k = 0;  // tokens kept
  uint32_t n_tokens = 0;
};

// Compression c < 1 gives r = ceil(c * d) and k = ceil(c * n / 2), SparQ's split of the budget:
// half for the r K columns (r * n values), half for the k full K and V rows (2 * k * d values),
// so (r * n + 2 * k * d) / (2 * n * d) = c. Compression 1 means dense: r = d, k = n.
// n_tokens == 0 resolves to an empty plan (nothing to attend).
inline result<sparf_plan> sparf_resolve(const sparf_params& p, uint32_t head_dim, uint32_t n_tokens) {
  INSTINFER_TRY(p.validate(head_dim));
  sparf_plan plan;
  plan.n_tokens = n_tokens;
  if (n_tokens == 0) return plan;
  if (p.mode == sparf_mode::kExplicit) {
    if (p.k > n_tokens)
      return status{errc::kInvalidArgument, "SparF k = " + std::to_string(p.k) + " exceeds the sequence's " +
                                                std::to_string(n_tokens) + " tokens"};
    plan.r = p.r;
    plan.k = p.k;
    return plan;
  }
  if (p.compression >= 1.0) {
    plan.r = head_dim;
    plan.k = n_tokens;
    return plan;
  }
  const double r = std::ceil(p.compression * head_dim);
  const double k = std::ceil(p.compression * n_tokens / 2.0);
  plan.r = static_cast<uint32_t>(std::clamp(r, 1.0, static_cast<double>(head_dim)));
  plan.k = static_cast<uint32_t>(std::clamp(k, 1.0, static_cast<double>(n_tokens)));
  return plan;
}

// ---- counters -----------------------------------------------------------------------------------

// What a SparF attend read, beside what dense attention would have read. Token pages: one page =
// tokens_per_page rows of one (kv_head, K|V); column pages: as in channel_layout. Buffered column
// values (the tail block not yet written) cost no page read.
struct sparf_counters {
  uint64_t token_pages_read = 0;        // token-indexed K and V pages holding a selected token
  uint64_t channel_pages_read = 0;      // written column pages holding a chosen channel
  uint64_t token_bytes_used = 0;        // K and V bytes of the selected rows
  uint64_t channel_bytes_used = 0;      // K-column bytes of the chosen channels in the pages read
  uint64_t buffered_channel_bytes = 0;  // K-column bytes taken from the tail buffer
  uint64_t dense_pages = 0;             // token-indexed K and V pages dense attention reads
  uint64_t dense_bytes = 0;             // K and V bytes dense attention reads
  uint64_t selected_tokens = 0;         // sum of k over (sequence, kv_head)
  uint64_t channels_used = 0;           // sum of channels used over (sequence, kv_head)
  uint64_t items = 0;                   // (sequence, kv_head) pairs attended

  void add(const sparf_counters& o) noexcept {
    token_pages_read += o.token_pages_read;
    channel_pages_read += o.channel_pages_read;
    token_bytes_used += o.token_bytes_used;
    channel_bytes_used += o.channel_bytes_used;
    buffered_channel_bytes += o.buffered_channel_bytes;
    dense_pages += o.dense_pages;
    dense_bytes += o.dense_bytes;
    selected_tokens += o.selected_tokens;
    channels_used += o.channels_used;
    items += o.items;
  }
  uint64_t pages_read() const noexcept { return token_pages_read + channel_pages_read; }
  // Pages read over the pages dense attention reads (the CSD's flash-page saving).
  double page_fraction() const noexcept {
    return dense_pages ? static_cast<double>(pages_read()) / static_cast<double>(dense_pages) : 0.0;
  }
  // Bytes used over dense bytes (the traffic after the in-page filter of dual-step loading).
  double byte_fraction() const noexcept {
    return dense_bytes ? static_cast<double>(token_bytes_used + channel_bytes_used + buffered_channel_bytes) /
                             static_cast<double>(dense_bytes)
                       : 0.0;
  }
};

// ---- configuration and work items ---------------------------------------------------------------

struct sparf_config {
  chunk_layout tokens{};     // the token-indexed chunks (K and V rows)
  channel_layout columns{};  // the channel-indexed K copy
  uint32_t group_size = 1;   // query heads per kv head; query head j uses kv head j / group_size
  float scale = 0.0f;        // logit scale; 0: 1/sqrt(head_dim)
  float softcap = 0.0f;      // logit soft-cap; <= 0: off

  uint32_t head_dim() const noexcept { return tokens.page.head_dim; }
  uint32_t n_kv_heads() const noexcept { return tokens.n_kv_heads; }
  uint32_t n_q_heads() const noexcept { return group_size * tokens.n_kv_heads; }
  float effective_scale() const noexcept {
    return scale > 0.0f ? scale : 1.0f / std::sqrt(static_cast<float>(head_dim()));
  }

  static result<sparf_config> make(const chunk_layout& tokens, uint32_t channels_per_page, uint32_t group_size,
                                   float scale = 0.0f, float softcap = 0.0f) {
    auto columns = channel_layout::make(tokens.page.page_bytes, tokens.page.head_dim, tokens.page.kv_dtype,
                                        channels_per_page, tokens.n_kv_heads);
    if (!columns.ok()) return columns.error();
    sparf_config c{tokens, columns.value(), group_size, scale, softcap};
    INSTINFER_TRY(c.validate());
    return c;
  }

  status validate() const {
    const page_geometry& g = tokens.page;
    if (const errc e = page_geometry::check(g.page_bytes, g.head_dim, g.kv_dtype); e != errc::kOk)
      return page_geometry::make(g.page_bytes, g.head_dim, g.kv_dtype).error();
    if (g.tokens_per_page != g.page_bytes / g.row_bytes())
      return {errc::kInvalidArgument, "token page geometry is inconsistent (use page_geometry::make)"};
    if (tokens.n_kv_heads == 0) return {errc::kInvalidArgument, "SparF needs n_kv_heads >= 1"};
    if (group_size == 0) return {errc::kInvalidArgument, "SparF needs group_size >= 1"};
    const channel_layout& c = columns;
    if (channel_layout::check(c.page_bytes, c.head_dim, c.kv_dtype, c.channels_per_page, c.n_kv_heads) != errc::kOk ||
        c.tokens_per_page != c.page_bytes / (c.channels_per_page * dtype_size(c.kv_dtype)))
      return {errc::kInvalidArgument, "SparF column layout is invalid (use channel_layout::make)"};
    if (c.head_dim != g.head_dim || c.kv_dtype != g.kv_dtype || c.n_kv_heads != tokens.n_kv_heads)
      return {errc::kInvalidArgument, "SparF column layout and token chunks disagree on head_dim, dtype or kv heads"};
    if (!(scale >= 0.0f) || !std::isfinite(scale)) return {errc::kInvalidArgument, "SparF scale must be >= 0"};
    return {};
  }
};

// One sequence of a SparF batch (one layer).
struct sparf_work {
  const std::byte* const* chunks = nullptr;  // token-indexed chunks, in token order
  uint32_t n_chunks = 0;
  uint32_t n_tokens = 0;                            // tokens of the sequence in this layer
  const std::byte* const* column_blocks = nullptr;  // ceil(n_tokens / columns.tokens_per_page) blocks;
                                                    // a last, partial one is the tail buffer
  uint32_t n_column_blocks = 0;
  // Alternative to column_blocks, for column data fetched page by page from storage: one pointer
  // per column page, [n_column_blocks][columns.pages_per_block()] (channel_layout::page_index);
  // only the pages of the channels SparF chooses are dereferenced (null elsewhere is fine).
  const std::byte* const* column_pages = nullptr;
  const float* v_mean = nullptr;  // [n_kv_heads][head_dim]: mean of V over the n_tokens tokens
  const float* q = nullptr;       // [n_q_heads][head_dim]
  float* out = nullptr;           // [n_q_heads][head_dim], normalised
  float* lse = nullptr;           // [n_q_heads] or null
  // Optional, for analysis: the chosen tokens of every kv head, ascending, [n_kv_heads][plan k]
  // (plan k from sparf_resolve), and how many were chosen per kv head ([n_kv_heads]; <= plan k).
  uint32_t* selected = nullptr;
  uint32_t* n_selected = nullptr;
  // Dual-step loading without selecting twice: sparf_select also writes each query head's alpha
  // (the approximate softmax mass of its group's chosen tokens) here, [n_q_heads]; sparf_attend
  // with `preselected` then takes selected, n_selected and alpha as inputs and skips steps 1-3 (the
  // output is the same as selecting again). Counters: the select call counts the items, dense
  // pages and columns, the preselected attend only the token pages and bytes.
  float* alpha = nullptr;
  bool preselected = false;
};

// Reusable scratch: grows to the largest (n_tokens, group) seen, then the hot path allocates nothing.
class sparf_workspace {
 public:
  status reserve(uint32_t n_tokens, uint32_t head_dim, uint32_t group_size, uint32_t column_tokens) noexcept {
    try {
      const size_t n = n_tokens, g = group_size, d = head_dim;
      if (approx_.size() < n * g) approx_.resize(n * g);
      if (rank_.size() < n) rank_.resize(n);
      if (order_.size() < n) order_.resize(n);
      if (page_score_.size() < n) page_score_.resize(n);
      if (page_order_.size() < n) page_order_.resize(n);
      if (page_pick_.size() < n) page_pick_.resize(n);
      if (row_.size() < std::max<size_t>(d, column_tokens)) row_.resize(std::max<size_t>(d, column_tokens));
      if (vrow_.size() < d) vrow_.resize(d);
      if (channels_.size() < d) channels_.resize(d);
      if (weight_.size() < d) weight_.resize(d);
      if (head_scale_.size() < g) head_scale_.resize(g);
      if (stats_.size() < g) stats_.resize(g);
      if (stats_block_.size() < g) stats_block_.resize(g);
      if (o_.size() < g * d) o_.resize(g * d);
      if (ob_.size() < g * d) ob_.resize(g * d);
      if (logits_.size() < g * kBlock) logits_.resize(g * kBlock);
      return {};
    } catch (const std::bad_alloc&) {
      return {errc::kOutOfMemory, "SparF workspace for " + std::to_string(n_tokens) + " tokens"};
    }
  }

  static constexpr uint32_t kBlock = 64;  // selected tokens per exact-softmax block

  std::vector<float> approx_;         // [group][n_tokens] approximate logits, then probabilities
  std::vector<float> rank_;           // [n_tokens] ranking score
  std::vector<uint32_t> order_;       // token indices; the first k are the selection
  std::vector<float> page_score_;     // [n_chunks] approximate mass per token page
  std::vector<uint32_t> page_order_;  // [n_chunks]
  std::vector<uint8_t> page_pick_;    // [n_chunks] candidate page
  std::vector<float> row_;            // one converted K row or column
  std::vector<float> vrow_;           // one converted V row
  std::vector<uint32_t> channels_;
  std::vector<float> weight_;
  std::vector<float> head_scale_;
  std::vector<softmax_stats> stats_, stats_block_;
  std::vector<float> o_, ob_;
  std::vector<float> logits_;
};

// ---- the algorithm ------------------------------------------------------------------------------

namespace sparf_detail {

// Stats of a block of logits: (max, sum of exp(l - max)); p[i] := exp(l[i] - max).
inline softmax_stats block_stats(const float* logits, float* p, uint32_t n) noexcept {
  softmax_stats s;
  for (uint32_t i = 0; i < n; ++i) s.m = std::max(s.m, logits[i]);
  if (n == 0 || s.m == -std::numeric_limits<float>::infinity()) return softmax_stats{};
  for (uint32_t i = 0; i < n; ++i) {
    p[i] = expf(logits[i] - s.m);
    s.d += p[i];
  }
  return s;
}

// All 65536 fp16 values as float (256 KiB, built once): the scalar bit conversion is branchy and
// was most of SparF's time; per-ISA F16C/NEON conversion stays with the decode kernels.
struct f16_lut {
  float v[65536];
  f16_lut() noexcept {
    for (uint32_t i = 0; i < 65536; ++i) v[i] = f16_to_float(f16_t{static_cast<uint16_t>(i)});
  }
};
inline const float* f16_table() noexcept {
  static const f16_lut table;  // static storage: nothing allocated, nothing thrown
  return table.v;
}

// n stored elements -> float.
inline void to_float(const std::byte* src, dtype t, float* dst, uint32_t n) noexcept {
  if (t == dtype::kF16) {
    const float* lut = f16_table();
    uint16_t bits[64];
    for (uint32_t i0 = 0; i0 < n; i0 += 64) {
      const uint32_t m = std::min(64u, n - i0);
      std::memcpy(bits, src + size_t{i0} * 2, size_t{m} * 2);
      for (uint32_t i = 0; i < m; ++i) dst[i0 + i] = lut[bits[i]];
    }
    return;
  }
  convert_elements(src, t, dst, dtype::kF32, n);
}

// Dot product with 8 independent partial sums (vectorisable without -ffast-math).
inline float dot(const float* a, const float* b, uint32_t n) noexcept {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  uint32_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (uint32_t j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  for (; i < n; ++i) acc[i % 8] += a[i] * b[i];
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
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
// sparf_attend_head so a drive can read just those column pages before it runs the rest.
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

// SparF of one kv head of one work item: fills out/lse of the group's query heads and adds to c.
// Preconditions: cfg validated, ws reserved for (n_tokens, head_dim, group_size, column tokens),
// plan resolved for w.n_tokens, w's pointer arrays sized as sparf_work says.
// With select_only, stops after step 3 (w.selected / w.n_selected filled; chunks, out, lse untouched).
inline void sparf_attend_head(const sparf_config& cfg, const sparf_plan& plan, bool whole_pages, double page_spread,
                              const sparf_work& w, uint32_t kv_head, sparf_workspace& ws, sparf_counters& c,
                              bool select_only = false) noexcept {
  constexpr uint32_t kB = sparf_workspace::kBlock;
  const uint32_t d = cfg.head_dim();
  const uint32_t G = cfg.group_size;
  const uint32_t n = w.n_tokens;
  const dtype t = cfg.tokens.page.kv_dtype;
  const uint32_t es = dtype_size(t);
  const channel_layout& cl = cfg.columns;
  const chunk_layout& tl = cfg.tokens;
  const uint32_t tpp = tl.page.tokens_per_page;
  const float* q = w.q + size_t{kv_head} * G * d;
  float* out = w.out ? w.out + size_t{kv_head} * G * d : nullptr;
  float* lse = w.lse ? w.lse + size_t{kv_head} * G : nullptr;
  const float scale = cfg.effective_scale();

  const bool reuse = w.preselected && !select_only;  // steps 1-3 were done by sparf_select
  if (!reuse) {
    ++c.items;
    c.dense_pages += 2ull * w.n_chunks;
    c.dense_bytes += 2ull * n * d * es;
  }
  if (n == 0) {
    if (w.n_selected && !reuse) w.n_selected[kv_head] = 0;
    if (select_only) return;
    for (uint32_t i = 0; i < G * d; ++i) out[i] = 0.0f;
    if (lse)
      for (uint32_t g = 0; g < G; ++g) lse[g] = -std::numeric_limits<float>::infinity();
    return;
  }

  uint32_t* order = ws.order_.data();
  uint32_t k = 0;
  float* head_alpha = ws.head_scale_.data();  // [G]: reused once the temperatures are spent
  if (reuse) {
    order = w.selected + size_t{kv_head} * plan.k;
    k = w.n_selected[kv_head];
    for (uint32_t g = 0; g < G; ++g) head_alpha[g] = w.alpha[size_t{kv_head} * G + g];
  } else {
    // 1. channels (see sparf_choose_channels).
    uint32_t* channels = ws.channels_.data();
    const sparf_channel_choice choice =
        sparf_choose_channels(cfg, plan, whole_pages, q, channels, ws.weight_.data(), ws.row_.data());
    const uint32_t n_channels = choice.n_channels;
    const uint32_t n_pages_per_block = choice.pages_per_block;
    c.channels_used += n_channels;

    // Every token kept (k >= n, e.g. compression 1): nothing to rank, so no approximate scores and
    // no column pages are read; alpha is 1 and this is dense attention.
    const bool keep_all = plan.k >= n;
    float* approx = ws.approx_.data();  // [G][n]
    if (!keep_all) {
      // Temperature per query head: scale / sqrt(|q[I]|_1 / |q|_1) (exactly `scale` when I is all).
      for (uint32_t g = 0; g < G; ++g) {
        const float* qg = q + size_t{g} * d;
        float all = 0.0f, sel = 0.0f;
        for (uint32_t i = 0; i < d; ++i) all += std::fabs(qg[i]);
        for (uint32_t j = 0; j < n_channels; ++j) sel += std::fabs(qg[channels[j]]);
        ws.head_scale_[g] = (sel > 0.0f && all > 0.0f && n_channels < d) ? scale / std::sqrt(sel / all) : scale;
      }

      // 2. approximate logits from the chosen channels' columns only.
      std::fill(approx, approx + size_t{G} * n, 0.0f);
      float* col = ws.row_.data();
      for (uint32_t b = 0; b < w.n_column_blocks; ++b) {
        const uint32_t first = b * cl.tokens_per_page;
        const uint32_t count = std::min(cl.tokens_per_page, n - first);
        for (uint32_t j = 0; j < n_channels; ++j) {
          const uint32_t ch = channels[j];
          const std::byte* src =
              w.column_pages
                  ? w.column_pages[size_t{b} * cl.pages_per_block() + cl.page_index(kv_head, cl.group_of(ch))] +
                        cl.in_page_offset(ch, 0)
                  : w.column_blocks[b] + cl.offset(kv_head, 0, ch);
          sparf_detail::to_float(src, t, col, count);
          for (uint32_t g = 0; g < G; ++g) {
            const float qv = q[size_t{g} * d + ch];
            float* a = approx + size_t{g} * n + first;
            for (uint32_t i = 0; i < count; ++i) a[i] += qv * col[i];
          }
        }
        if (count == cl.tokens_per_page) {  // a written block: pages read from storage
          c.channel_pages_read += n_pages_per_block;
          c.channel_bytes_used += uint64_t{n_channels} * count * es;
        } else {  // the tail block: still in the group buffer
          c.buffered_channel_bytes += uint64_t{n_channels} * count * es;
        }
      }

      // Approximate softmax per query head: logits, stats, then probabilities in place.
      float* p_scratch = ws.logits_.data();
      for (uint32_t g = 0; g < G; ++g) {
        float* a = approx + size_t{g} * n;
        const float hs = ws.head_scale_[g];
        for (uint32_t i = 0; i < n; ++i) a[i] = apply_softcap(a[i] * hs, cfg.softcap);
        if (G == 1) std::copy(a, a + n, ws.rank_.data());  // rank by logit: exp underflow makes no ties
        softmax_stats s;
        for (uint32_t i0 = 0; i0 < n; i0 += kB)
          merge_state(s, nullptr, sparf_detail::block_stats(a + i0, p_scratch, std::min(kB, n - i0)), nullptr, 0);
        const float inv = s.empty() ? 0.0f : 1.0f / s.d;
        for (uint32_t i = 0; i < n; ++i) a[i] = expf(a[i] - s.m) * inv;
      }
      if (G > 1) {
        float* rank = ws.rank_.data();
        std::fill(rank, rank + n, 0.0f);
        for (uint32_t g = 0; g < G; ++g)
          for (uint32_t i = 0; i < n; ++i) rank[i] += approx[size_t{g} * n + i];
      }
    }

    // 3. tokens: the top k, then in token order (page order for the reads).
    k = std::min(plan.k, n);
    uint32_t n_cand = n;
    const uint32_t n_pages = w.n_chunks;
    const uint32_t max_pages =
        page_spread > 0.0
            ? static_cast<uint32_t>(std::min<double>(n_pages, std::ceil(page_spread * ((k + tpp - 1) / tpp))))
            : n_pages;
    if (k < n && max_pages < n_pages) {
      // Candidate pages: the max_pages token pages of largest approximate mass.
      const float* mass = G == 1 ? approx : ws.rank_.data();
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
      std::nth_element(po, po + max_pages, po + n_pages, sparf_detail::by_score{ps});
      for (uint32_t j = 0; j < max_pages; ++j) pick[po[j]] = 1;
      n_cand = 0;
      for (uint32_t i = 0; i < n; ++i)
        if (pick[i / tpp]) order[n_cand++] = i;
      k = std::min(k, n_cand);
    } else {
      for (uint32_t i = 0; i < n; ++i) order[i] = i;
    }
    if (k < n_cand) {
      std::nth_element(order, order + k, order + n_cand, sparf_detail::by_score{ws.rank_.data()});
      std::sort(order, order + k);
    }
    c.selected_tokens += k;
    if (w.selected) std::copy(order, order + k, w.selected + size_t{kv_head} * plan.k);
    if (w.n_selected) w.n_selected[kv_head] = k;
    // alpha per query head: the approximate mass of the chosen tokens (1 when all are kept).
    for (uint32_t g = 0; g < G; ++g) {
      float alpha = 1.0f;
      if (k < n) {
        const float* pg = ws.approx_.data() + size_t{g} * n;
        float mass = 0.0f;
        for (uint32_t j = 0; j < k; ++j) mass += pg[order[j]];
        alpha = std::clamp(mass, 0.0f, 1.0f);
      }
      head_alpha[g] = alpha;
      if (w.alpha) w.alpha[size_t{kv_head} * G + g] = alpha;
    }
  }
  if (select_only) return;

  // 4. exact attention over the chosen tokens, per query head; alpha from the approximate mass.
  const float* v_mean = w.v_mean + size_t{kv_head} * d;
  uint32_t last_chunk = UINT32_MAX;
  for (uint32_t j = 0; j < k; ++j) {
    const uint32_t chunk = order[j] / tpp;
    if (chunk != last_chunk) c.token_pages_read += 2;  // the K page and the V page of this head
    last_chunk = chunk;
  }
  c.token_bytes_used += 2ull * k * d * es;

  float* kv_row = ws.row_.data();
  float* v_row = ws.vrow_.data();
  float* o = ws.o_.data();            // [G][d] running unnormalised output
  float* ob = ws.ob_.data();          // [G][d] block output
  float* logits = ws.logits_.data();  // [G][kB]
  std::fill(o, o + size_t{G} * d, 0.0f);
  for (uint32_t g = 0; g < G; ++g) ws.stats_[g] = softmax_stats{};
  for (uint32_t j0 = 0; j0 < k; j0 += kB) {
    const uint32_t m = std::min(kB, k - j0);
    for (uint32_t j = 0; j < m; ++j) {  // logits: each K row converted once for the whole group
      const uint32_t tok = order[j0 + j];
      sparf_detail::to_float(w.chunks[tok / tpp] + tl.offset(kv_kind::kKey, kv_head, tok % tpp, 0), t, kv_row, d);
      for (uint32_t g = 0; g < G; ++g) {
        const float s_dot = sparf_detail::dot(q + size_t{g} * d, kv_row, d);
        logits[size_t{g} * kB + j] = apply_softcap(s_dot * scale, cfg.softcap);
      }
    }
    for (uint32_t g = 0; g < G; ++g) {
      float* lg = logits + size_t{g} * kB;
      ws.stats_block_[g] = sparf_detail::block_stats(lg, lg, m);  // lg := exp(l - block max)
      std::fill(ob + size_t{g} * d, ob + size_t{g + 1} * d, 0.0f);
    }
    for (uint32_t j = 0; j < m; ++j) {  // values: each V row converted once for the whole group
      const uint32_t tok = order[j0 + j];
      sparf_detail::to_float(w.chunks[tok / tpp] + tl.offset(kv_kind::kValue, kv_head, tok % tpp, 0), t, v_row, d);
      for (uint32_t g = 0; g < G; ++g) {
        const float pj = logits[size_t{g} * kB + j];
        float* obg = ob + size_t{g} * d;
        for (uint32_t i = 0; i < d; ++i) obg[i] += pj * v_row[i];
      }
    }
    for (uint32_t g = 0; g < G; ++g)
      merge_state(ws.stats_[g], o + size_t{g} * d, ws.stats_block_[g], ob + size_t{g} * d, d);
  }
  for (uint32_t g = 0; g < G; ++g) {
    float* og = o + size_t{g} * d;
    const softmax_stats s = ws.stats_[g];
    normalize_state(s, og, d);
    const float alpha = head_alpha[g];
    float* outg = out + size_t{g} * d;
    if (alpha >= 1.0f) {
      std::copy(og, og + d, outg);
    } else {
      for (uint32_t i = 0; i < d; ++i) outg[i] = alpha * og[i] + (1.0f - alpha) * v_mean[i];
    }
    if (lse) lse[g] = alpha > 0.0f ? state_lse(s) - std::log(alpha) : state_lse(s);
  }
}

namespace sparf_detail {

inline status run_batch(const sparf_config& cfg, const sparf_params& params, std::span<const sparf_work> batch,
                        sparf_workspace& ws, sparf_counters* counters, bool select_only) noexcept {
  try {
    INSTINFER_TRY(cfg.validate());
    INSTINFER_TRY(params.validate(cfg.head_dim()));
    uint32_t max_tokens = 0;
    for (size_t b = 0; b < batch.size(); ++b) {
      const sparf_work& w = batch[b];
      const std::string where = "SparF batch item " + std::to_string(b) + ": ";
      auto plan = sparf_resolve(params, cfg.head_dim(), w.n_tokens);
      if (!plan.ok()) return {plan.error().code(), where + plan.error().message()};
      const uint32_t tpp = cfg.tokens.page.tokens_per_page;
      const uint32_t ctp = cfg.columns.tokens_per_page;
      if (w.n_chunks != (w.n_tokens + tpp - 1) / tpp)
        return {errc::kInvalidArgument, where + std::to_string(w.n_tokens) + " tokens need " +
                                            std::to_string((w.n_tokens + tpp - 1) / tpp) + " chunks, got " +
                                            std::to_string(w.n_chunks)};
      if (w.n_column_blocks != (w.n_tokens + ctp - 1) / ctp)
        return {errc::kInvalidArgument, where + std::to_string(w.n_tokens) + " tokens need " +
                                            std::to_string((w.n_tokens + ctp - 1) / ctp) + " column blocks, got " +
                                            std::to_string(w.n_column_blocks)};
      if (w.q == nullptr || (w.n_tokens > 0 && w.column_blocks == nullptr && w.column_pages == nullptr))
        return {errc::kInvalidArgument, where + "null q or column blocks"};
      if (w.preselected && !select_only) {
        if (w.selected == nullptr || w.n_selected == nullptr || w.alpha == nullptr)
          return {errc::kInvalidArgument, where + "a preselected attend needs selected, n_selected and alpha"};
        for (uint32_t h = 0; h < cfg.n_kv_heads(); ++h) {  // sparf_select's output, or a clear error
          if (w.n_selected[h] > plan->k) return {errc::kInvalidArgument, where + "n_selected exceeds the plan's k"};
          const uint32_t* sel = w.selected + size_t{h} * plan->k;
          for (uint32_t j = 0; j < w.n_selected[h]; ++j)
            if (sel[j] >= w.n_tokens || (j > 0 && sel[j] <= sel[j - 1]))
              return {errc::kInvalidArgument, where + "selected tokens must be ascending and < n_tokens"};
        }
      }
      if (select_only) {
        if (w.selected == nullptr || w.n_selected == nullptr)
          return {errc::kInvalidArgument, where + "sparf_select needs selected and n_selected"};
      } else if (w.out == nullptr || (w.n_tokens > 0 && (w.chunks == nullptr || w.v_mean == nullptr))) {
        return {errc::kInvalidArgument, where + "null out, chunks or v_mean"};
      }
      max_tokens = std::max(max_tokens, w.n_tokens);
    }
    INSTINFER_TRY(ws.reserve(max_tokens, cfg.head_dim(), cfg.group_size, cfg.columns.tokens_per_page));
    sparf_counters local;
    for (const sparf_work& w : batch) {
      const sparf_plan plan = sparf_resolve(params, cfg.head_dim(), w.n_tokens).value();
      for (uint32_t h = 0; h < cfg.n_kv_heads(); ++h)
        sparf_attend_head(cfg, plan, params.whole_pages, params.page_spread, w, h, ws, local, select_only);
    }
    if (counters) counters->add(local);
    return {};
  } catch (const std::bad_alloc&) {
    return {errc::kOutOfMemory, "SparF: out of host memory"};
  }
}

}  // namespace sparf_detail

// SparF decode attention of one layer for a batch of sequences (all kv heads of each).
// counters (optional) receives the pages and bytes read. Bad parameters (r = 0, r > head_dim,
// k = 0, k > a sequence's tokens, compression outside (0, 1]) fail before anything is written.
// Only the chunks holding a selected token are dereferenced: the other entries of w.chunks may
// be null (a storage backend passes just the pages sparf_select said it needs).
inline status sparf_attend(const sparf_config& cfg, const sparf_params& params, std::span<const sparf_work> batch,
                           sparf_workspace& ws, sparf_counters* counters = nullptr) noexcept {
  return sparf_detail::run_batch(cfg, params, batch, ws, counters, false);
}

// Dual-step loading, step one: steps 1-3 only. Fills w.selected / w.n_selected (required) from
// the column blocks; chunks, out and lse are not touched (chunk pointers may all be null). A
// storage backend then reads just the token pages holding the selected tokens (token / tokens
// per page) and calls sparf_attend with those pages; the selection is deterministic, so it is the
// same. counters get the column pages read.
inline status sparf_select(const sparf_config& cfg, const sparf_params& params, std::span<const sparf_work> batch,
                           sparf_workspace& ws, sparf_counters* counters = nullptr) noexcept {
  return sparf_detail::run_batch(cfg, params, batch, ws, counters, true);
}

// ---- the host-side index: channel-indexed K copy and V running mean of one (sequence, layer) ----

// Kept by a KV backend beside its token-indexed chunks. Tokens arrive in order (append); whole
// column blocks are sealed as they fill (the drive writes them then), the last partial block is
// the tail buffer. V is summed in double per block in token order, and the mean is the sealed
// blocks' sums (added in block order) plus the tail's over the token count: it does not depend on
// how the tokens were batched, nor on truncations and re-appends in between.
// Fork: copy the index (sealed blocks are immutable, so a storage backend may share them).
class sparf_index {
 public:
  sparf_index() = default;
  explicit sparf_index(const channel_layout& layout)
      : layout_(layout),
        sealed_sum_(size_t{layout.n_kv_heads} * layout.head_dim, 0.0),
        v_mean_(sealed_sum_.size(), 0.0f) {}
  sparf_index(const sparf_index& o)
      : layout_(o.layout_),
        n_tokens_(o.n_tokens_),
        blocks_(o.blocks_),
        block_sum_(o.block_sum_),
        sealed_sum_(o.sealed_sum_),
        v_mean_(o.v_mean_) {
    rebuild_pointers();
  }
  sparf_index& operator=(const sparf_index& o) {
    if (this != &o) {
      sparf_index tmp(o);
      *this = std::move(tmp);
    }
    return *this;
  }
  sparf_index(sparf_index&&) noexcept = default;
  sparf_index& operator=(sparf_index&&) noexcept = default;

  static result<sparf_index> create(const channel_layout& layout) {
    if (channel_layout::check(layout.page_bytes, layout.head_dim, layout.kv_dtype, layout.channels_per_page,
                              layout.n_kv_heads) != errc::kOk ||
        layout.tokens_per_page != layout.page_bytes / (layout.channels_per_page * dtype_size(layout.kv_dtype)))
      return status{errc::kInvalidArgument, "sparf_index: invalid column layout (use channel_layout::make)"};
    try {
      return sparf_index(layout);
    } catch (const std::bad_alloc&) {
      return status{errc::kOutOfMemory, "sparf_index"};
    }
  }

  const channel_layout& layout() const noexcept { return layout_; }
  uint32_t n_tokens() const noexcept { return n_tokens_; }
  uint32_t n_blocks() const noexcept { return static_cast<uint32_t>(blocks_.size()); }
  // Blocks that are full (written to storage); the rest (0 or 1) is the tail buffer.
  uint32_t sealed_blocks() const noexcept { return tp() ? n_tokens_ / tp() : 0; }
  const std::byte* block(uint32_t b) const noexcept { return blocks_[b].data(); }
  // Storage backends keep sealed blocks on the device: the host copy of block b (sealed) can be
  // dropped; its V sums stay. block(b) / block_pointers() are then null for it.
  void drop_block_memory(uint32_t b) noexcept {
    if (b >= sealed_blocks()) return;
    std::vector<std::byte>().swap(blocks_[b]);
    pointers_[b] = nullptr;
  }
  bool block_resident(uint32_t b) const noexcept { return b < blocks_.size() && !blocks_[b].empty(); }
  // Column bytes held in this process (resident sealed blocks and the tail buffer).
  uint64_t resident_bytes() const noexcept {
    uint64_t bytes = 0;
    for (const auto& blk : blocks_) bytes += blk.size();
    return bytes;
  }
  // n_blocks() pointers, for sparf_work::column_blocks; valid until the next append or truncate.
  const std::byte* const* block_pointers() const noexcept { return pointers_.data(); }
  // [n_kv_heads][head_dim] mean of the stored V rows (zeros when empty).
  const float* v_mean() const noexcept { return v_mean_.data(); }
  // Column bytes on storage (sealed blocks) and in the tail buffer.
  uint64_t stored_bytes() const noexcept { return uint64_t{sealed_blocks()} * layout_.block_bytes(); }
  uint64_t buffered_bytes() const noexcept {
    return tp() ? uint64_t{n_tokens_ % tp()} * layout_.n_kv_heads * layout_.head_dim * layout_.elem_bytes() : 0;
  }

  // Append n tokens. k, v: [n][n_kv_heads][head_dim] in the layout dtype (as stored in the chunks).
  // On failure the index is unchanged. Returns through `sealed` (optional) how many blocks this
  // call sealed, so a storage backend can write them.
  status append(uint32_t n, const std::byte* k, const std::byte* v, uint32_t* sealed = nullptr) noexcept {
    if (sealed) *sealed = 0;
    if (n == 0) return {};
    if (tp() == 0) return {errc::kInvalidArgument, "sparf_index::append: index has no layout"};
    if (k == nullptr || v == nullptr) return {errc::kInvalidArgument, "sparf_index::append: null K or V rows"};
    if (uint64_t{n_tokens_} + n > UINT32_MAX) return {errc::kInvalidArgument, "sparf_index: too many tokens"};
    const channel_layout& L = layout_;
    const uint32_t end = n_tokens_ + n;
    INSTINFER_TRY(grow((size_t{end} + tp() - 1) / tp()));
    const uint32_t H = L.n_kv_heads, d = L.head_dim, es = L.elem_bytes();
    for (uint32_t i = 0; i < n; ++i) {
      const uint32_t tok = n_tokens_ + i;
      const uint32_t b = tok / tp();
      std::byte* blk = blocks_[b].data();
      for (uint32_t h = 0; h < H; ++h) {
        const std::byte* krow = k + (size_t{i} * H + h) * d * es;
        const std::byte* vrow = v + (size_t{i} * H + h) * d * es;
        for (uint32_t ch = 0; ch < d; ++ch) std::memcpy(blk + L.offset(h, tok % tp(), ch), krow + size_t{ch} * es, es);
        double* vs = block_sum_[b].data() + size_t{h} * d;
        for (uint32_t ch = 0; ch < d; ++ch) vs[ch] += static_cast<double>(load_as_float(vrow, L.kv_dtype, ch));
      }
      if ((tok + 1) % tp() == 0)  // block b sealed: fold its sum into the sealed prefix
        for (size_t x = 0; x < sealed_sum_.size(); ++x) sealed_sum_[x] += block_sum_[b][x];
    }
    if (sealed) *sealed = end / tp() - n_tokens_ / tp();
    n_tokens_ = end;
    update_mean();
    return {};
  }

  // Keep the first n tokens (remove_range to the end). v_tail: the stored V rows of the tokens of
  // the new partial block, [n % tokens_per_page][n_kv_heads][head_dim] in the layout dtype (the
  // caller reads them from its chunks); null when n is a multiple of tokens_per_page. A block that
  // was sealed and becomes partial again is the tail buffer again: its columns are rewritten from
  // k_tail (same shape as v_tail) when given, which they must be if the block's memory was dropped.
  status truncate(uint32_t n, const std::byte* v_tail, const std::byte* k_tail = nullptr) noexcept {
    if (n > n_tokens_)
      return {errc::kInvalidArgument,
              "sparf_index::truncate: " + std::to_string(n) + " > " + std::to_string(n_tokens_) + " tokens"};
    if (n == n_tokens_) return {};
    const uint32_t partial = n % tp();
    if (partial > 0 && v_tail == nullptr)
      return {errc::kInvalidArgument, "sparf_index::truncate: the V rows of the new tail block are needed"};
    const size_t keep = (size_t{n} + tp() - 1) / tp();
    if (partial > 0 && k_tail == nullptr && !block_resident(static_cast<uint32_t>(keep - 1)))
      return {errc::kInvalidArgument, "sparf_index::truncate: the new tail block was dropped; its K rows are needed"};
    if (partial > 0 && !block_resident(static_cast<uint32_t>(keep - 1))) {
      try {
        blocks_[keep - 1].assign(layout_.block_bytes(), std::byte{0});
      } catch (const std::bad_alloc&) {
        return {errc::kOutOfMemory, "sparf_index::truncate: tail block"};
      }
      pointers_[keep - 1] = blocks_[keep - 1].data();
    }
    blocks_.resize(keep);
    block_sum_.resize(keep);
    pointers_.resize(keep);
    if (partial > 0 && k_tail != nullptr) {
      const uint32_t H = layout_.n_kv_heads, d = layout_.head_dim, es = layout_.elem_bytes();
      std::byte* blk = blocks_[keep - 1].data();
      for (uint32_t i = 0; i < partial; ++i)
        for (uint32_t h = 0; h < H; ++h)
          for (uint32_t ch = 0; ch < d; ++ch)
            std::memcpy(blk + layout_.offset(h, i, ch), k_tail + ((size_t{i} * H + h) * d + ch) * es, es);
    }
    if (partial > 0) {
      std::vector<double>& bs = block_sum_[keep - 1];
      std::fill(bs.begin(), bs.end(), 0.0);
      const uint32_t H = layout_.n_kv_heads, d = layout_.head_dim, es = layout_.elem_bytes();
      for (uint32_t i = 0; i < partial; ++i)
        for (uint32_t h = 0; h < H; ++h)
          for (uint32_t ch = 0; ch < d; ++ch)
            bs[size_t{h} * d + ch] +=
                static_cast<double>(load_as_float(v_tail + (size_t{i} * H + h) * d * es, layout_.kv_dtype, ch));
    }
    std::fill(sealed_sum_.begin(), sealed_sum_.end(), 0.0);
    for (uint32_t b = 0; b < n / tp(); ++b)
      for (size_t x = 0; x < sealed_sum_.size(); ++x) sealed_sum_[x] += block_sum_[b][x];
    n_tokens_ = n;
    update_mean();
    return {};
  }

 private:
  uint32_t tp() const noexcept { return layout_.tokens_per_page; }

  status grow(size_t need) noexcept {
    const size_t had = blocks_.size();
    try {
      blocks_.reserve(need);
      block_sum_.reserve(need);
      pointers_.reserve(need);
      while (blocks_.size() < need) {
        blocks_.emplace_back(layout_.block_bytes());
        block_sum_.emplace_back(sealed_sum_.size(), 0.0);
        pointers_.push_back(blocks_.back().data());
      }
      return {};
    } catch (const std::bad_alloc&) {
      blocks_.resize(had);
      block_sum_.resize(had);
      pointers_.resize(had);
      return {errc::kOutOfMemory, "sparf_index: column blocks for " + std::to_string(need) + " blocks"};
    }
  }

  void update_mean() noexcept {
    const double inv = n_tokens_ ? 1.0 / static_cast<double>(n_tokens_) : 0.0;
    const bool tail = n_tokens_ % tp() != 0;
    for (size_t x = 0; x < sealed_sum_.size(); ++x)
      v_mean_[x] = static_cast<float>((sealed_sum_[x] + (tail ? block_sum_.back()[x] : 0.0)) * inv);
  }

  void rebuild_pointers() {
    pointers_.clear();
    for (const auto& b : blocks_) pointers_.push_back(b.empty() ? nullptr : b.data());
  }

  channel_layout layout_{};
  uint32_t n_tokens_ = 0;
  std::vector<std::vector<std::byte>> blocks_;
  std::vector<std::vector<double>> block_sum_;  // per block: [n_kv_heads][head_dim] sum of V
  std::vector<const std::byte*> pointers_;
  std::vector<double> sealed_sum_;  // sum of the sealed blocks' sums, in block order
  std::vector<float> v_mean_;
};

}  // namespace instinfer
