// SparF's vocabulary: parameters, the per-length plan (r, k), the column/token layouts it runs
// over (sparf_config) and the counters of what it read. No algorithm here: kv/kv_cache.hpp and the
// CSD protocol include this header without compiling SparF (attention/sparf/select.hpp, exact.hpp).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

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

// Which sparse policy attend_sparse runs (chosen per call; the cache keeps the data of every
// policy it was created with: cache_options::sparf, cache_options::page_summaries).
enum class sparse_policy : uint8_t {
  kSparf = 0,        // SparF: channel-indexed K copy, approximate token scores, top-k tokens
  kPageSummary = 1,  // Quest-style: per page group and channel min / max of K, top pages read whole
};

inline const char* sparse_policy_name(sparse_policy p) noexcept {
  return p == sparse_policy::kSparf ? "sparf" : p == sparse_policy::kPageSummary ? "page-summary" : "unknown";
}

struct sparf_params {
  static constexpr double kDefaultCompression = 0.125;
  static constexpr double kDefaultChannelShare = 0.5;

  // The policy. kPageSummary reads the same fields as follows: kCompression: `compression` is the
  // fraction of page groups read (the K+V traffic, since no column copy is read); kExplicit: k
  // tokens -> ceil(k / tokens_per_page) groups (r is ignored); sinks and window as below, as the
  // groups holding those tokens. whole_pages and page_spread are SparF's only.
  sparse_policy policy = sparse_policy::kSparf;
  sparf_mode mode = sparf_mode::kCompression;
  double compression = kDefaultCompression;  // kCompression: in (0, 1]
  // kCompression, SparF: the share S of the budget spent on the K columns of every token, the rest
  // on the selected tokens' K and V rows: r = 2 S c d channels, k = (1 - S) c n tokens. In (0, 1).
  // 0.5 is SparQ's even split; see kDefaultChannelShare for the default.
  double channel_share = kDefaultChannelShare;
  uint32_t r = 0;           // kExplicit: channels, [1, head_dim]
  uint32_t k = 0;           // kExplicit: tokens, [1, n_tokens]
  bool whole_pages = true;  // choose whole column pages of channels (see above)
  // Token pages that may be read, as a multiple of the fewest that can hold k tokens
  // (ceil(k / tokens_per_page)); 0: no limit (plain SparQ top-k over all tokens). See step 3.
  // Smaller is faster where pages cost (fuller pages; host at 64k, 1/8: 2.8x dense at 2, 3.1-3.9x
  // at 1.5) and less accurate (docs/experiment.md, "The page spread"); 2 keeps the quality.
  double page_spread = 2.0;
  // Dense ends (attention sinks and a recent window): the first sink_tokens and the last
  // window_tokens tokens of every sequence are always selected; the approximate top-k only
  // chooses among the tokens in between. They count toward k (sparf_resolve raises k to hold them
  // when it is smaller), so the exact pass reads them like any selected token. The defaults, 16
  // and 64, are what docs/experiment.md ("Long-context sparse evaluation") measured best (the page
  // policy needs them); every backend runs them (csd: in the drive). 0, 0: plain SparF over every
  // token.
  static constexpr uint32_t kDefaultSinkTokens = 16;
  static constexpr uint32_t kDefaultWindowTokens = 64;
  uint32_t sink_tokens = kDefaultSinkTokens;
  uint32_t window_tokens = kDefaultWindowTokens;
  // Selection reuse across decode steps (SparF only, where the host runs it: host, ssd, cuda; 0 =
  // off, the default). A (sequence, layer)'s selection is reused while every kv head's query group
  // keeps a cosine similarity >= reuse_min_cosine to the queries it was made for, for at most
  // reuse_max_steps calls after the one that made it: steps 1-3 (column reads, approximate scores,
  // top-k) are skipped, the tokens appended since are attended exactly, and alpha is the one of the
  // selection. Any change to the sequence other than appends (fork, truncation) or to these
  // parameters starts a fresh selection.
  float reuse_min_cosine = 0.0f;
  uint32_t reuse_max_steps = 8;
  static constexpr uint32_t kMaxReuseSteps = 1024;

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

  bool reuses() const noexcept { return reuse_min_cosine > 0.0f; }
  // The fields a selection depends on (not the reuse settings' own max steps): equal ones may
  // share a selection.
  bool same_selection(const sparf_params& o) const noexcept {
    return policy == o.policy && mode == o.mode && compression == o.compression && channel_share == o.channel_share &&
           r == o.r && k == o.k && whole_pages == o.whole_pages && page_spread == o.page_spread &&
           sink_tokens == o.sink_tokens && window_tokens == o.window_tokens;
  }

  // Checks that do not depend on the sequence length.
  status validate(uint32_t head_dim) const {
    if (policy != sparse_policy::kSparf && policy != sparse_policy::kPageSummary)
      return {errc::kInvalidArgument, "unknown sparse policy " + std::to_string(static_cast<unsigned>(policy)) +
                                          " (0: SparF, 1: page summary)"};
    if (!(page_spread == 0.0 || (page_spread >= 1.0 && page_spread <= 1e6)))
      return {errc::kInvalidArgument,
              "SparF page_spread must be 0 (off) or in [1, 1e6], got " + std::to_string(page_spread)};
    if (!(reuse_min_cosine >= 0.0f && reuse_min_cosine <= 1.0f))  // also rejects NaN
      return {errc::kInvalidArgument,
              "reuse_min_cosine must be 0 (off) or in (0, 1], got " + std::to_string(reuse_min_cosine)};
    if (reuses() && policy != sparse_policy::kSparf)
      return {errc::kInvalidArgument, "selection reuse (reuse_min_cosine > 0) is SparF's only"};
    if (reuses() && (reuse_max_steps == 0 || reuse_max_steps > kMaxReuseSteps))
      return {errc::kInvalidArgument, "reuse_max_steps must be in [1, " + std::to_string(kMaxReuseSteps) + "], got " +
                                          std::to_string(reuse_max_steps)};
    if (!(channel_share > 0.0 && channel_share < 1.0))  // also rejects NaN
      return {errc::kInvalidArgument, "SparF channel_share must be in (0, 1) (the budget's share for K columns), got " +
                                          std::to_string(channel_share)};
    if (mode == sparf_mode::kCompression) {
      if (!(compression > 0.0 && compression <= 1.0))  // also rejects NaN
        return {errc::kInvalidArgument, "SparF compression must be in (0, 1] (fraction of dense K+V traffic), got " +
                                            std::to_string(compression)};
      return {};
    }
    if (mode != sparf_mode::kExplicit) return {errc::kInvalidArgument, "unknown SparF mode"};
    if (policy == sparse_policy::kSparf && (r == 0 || r > head_dim))
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
  uint32_t sinks = 0;   // tokens [0, sinks) always kept
  uint32_t window = 0;  // tokens [n_tokens - window, n_tokens) always kept; sinks + window <= k
};

// Compression c < 1 with channel share S gives r = ceil(2 S c d) and k = ceil((1 - S) c n): the
// share S of the budget for the r K columns (r * n values), the rest for the k full K and V rows
// (2 * k * d values), so (r * n + 2 * k * d) / (2 * n * d) = c. S = 0.5 is SparQ's split
// (r = c d, k = c n / 2). Compression 1 means dense: r = d, k = n.
// n_tokens == 0 resolves to an empty plan (nothing to attend). Sinks and window are clipped to the
// sequence and k is raised to at least sinks + window (both mandatory).
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
  } else if (p.compression >= 1.0) {
    plan.r = head_dim;
    plan.k = n_tokens;
  } else {
    const double r = std::ceil(2.0 * p.channel_share * p.compression * head_dim);
    const double k = std::ceil((1.0 - p.channel_share) * p.compression * n_tokens);
    plan.r = static_cast<uint32_t>(std::clamp(r, 1.0, static_cast<double>(head_dim)));
    plan.k = static_cast<uint32_t>(std::clamp(k, 1.0, static_cast<double>(n_tokens)));
  }
  plan.sinks = std::min(p.sink_tokens, n_tokens);
  plan.window = std::min(p.window_tokens, n_tokens - plan.sinks);
  plan.k = std::max(plan.k, plan.sinks + plan.window);
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
  // What was counted after `before` (an earlier reading of the same running totals).
  sparf_counters since(const sparf_counters& before) const noexcept {
    sparf_counters d;
    d.token_pages_read = token_pages_read - before.token_pages_read;
    d.channel_pages_read = channel_pages_read - before.channel_pages_read;
    d.token_bytes_used = token_bytes_used - before.token_bytes_used;
    d.channel_bytes_used = channel_bytes_used - before.channel_bytes_used;
    d.buffered_channel_bytes = buffered_channel_bytes - before.buffered_channel_bytes;
    d.dense_pages = dense_pages - before.dense_pages;
    d.dense_bytes = dense_bytes - before.dense_bytes;
    d.selected_tokens = selected_tokens - before.selected_tokens;
    d.channels_used = channels_used - before.channels_used;
    d.items = items - before.items;
    return d;
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
        c.tokens_per_page != c.page_bytes / (c.channels_per_page * c.elem_bytes()))
      return {errc::kInvalidArgument, "SparF column layout is invalid (use channel_layout::make)"};
    if (c.head_dim != g.head_dim || c.kv_dtype != g.kv_dtype || c.n_kv_heads != tokens.n_kv_heads)
      return {errc::kInvalidArgument, "SparF column layout and token chunks disagree on head_dim, dtype or kv heads"};
    if (!(scale >= 0.0f) || !std::isfinite(scale)) return {errc::kInvalidArgument, "SparF scale must be >= 0"};
    return {};
  }
};

}  // namespace instinfer
