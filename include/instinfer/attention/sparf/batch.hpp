// SparF over a batch of sequences of one layer (all kv heads of each): validation, then per kv
// head sparf_select_head (select.hpp) and sparf_exact_head (exact.hpp). This is the pointer-array
// form the host tiers and the tests use; a caller that reads pages in between runs it twice:
// sparf_select, then sparf_attend with `sparf_work::preselected` (the selection handed back as a
// sparf_selection per kv head, so nothing is selected twice).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <new>
#include <span>
#include <string>

#include "instinfer/attention/sparf/exact.hpp"
#include "instinfer/attention/sparf/params.hpp"
#include "instinfer/attention/sparf/select.hpp"
#include "instinfer/attention/sparf/workspace.hpp"

namespace instinfer {

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

namespace sparf_detail {

// The checks of one work item: shapes, null pointers, and a preselected selection that
// sparf_select could have produced (or a clear error instead of trusting it).
inline status check_work(const sparf_config& cfg, const sparf_plan& plan, const sparf_work& w,
                         bool select_only) noexcept {
  const uint32_t tpp = cfg.tokens.page.tokens_per_page;
  const uint32_t ctp = cfg.columns.tokens_per_page;
  if (w.n_chunks != (w.n_tokens + tpp - 1) / tpp)
    return {errc::kInvalidArgument, std::to_string(w.n_tokens) + " tokens need " +
                                        std::to_string((w.n_tokens + tpp - 1) / tpp) + " chunks, got " +
                                        std::to_string(w.n_chunks)};
  if (w.n_column_blocks != (w.n_tokens + ctp - 1) / ctp)
    return {errc::kInvalidArgument, std::to_string(w.n_tokens) + " tokens need " +
                                        std::to_string((w.n_tokens + ctp - 1) / ctp) + " column blocks, got " +
                                        std::to_string(w.n_column_blocks)};
  if (w.q == nullptr || (w.n_tokens > 0 && w.column_blocks == nullptr && w.column_pages == nullptr))
    return {errc::kInvalidArgument, "null q or column blocks"};
  if (w.preselected && !select_only) {
    if (w.selected == nullptr || w.n_selected == nullptr || w.alpha == nullptr)
      return {errc::kInvalidArgument, "a preselected attend needs selected, n_selected and alpha"};
    for (uint32_t h = 0; h < cfg.n_kv_heads(); ++h) {
      if (w.n_selected[h] > plan.k) return {errc::kInvalidArgument, "n_selected exceeds the plan's k"};
      const uint32_t* sel = w.selected + size_t{h} * plan.k;
      for (uint32_t j = 0; j < w.n_selected[h]; ++j)
        if (sel[j] >= w.n_tokens || (j > 0 && sel[j] <= sel[j - 1]))
          return {errc::kInvalidArgument, "selected tokens must be ascending and < n_tokens"};
    }
  }
  if (select_only) {
    if (w.selected == nullptr || w.n_selected == nullptr)
      return {errc::kInvalidArgument, "sparf_select needs selected and n_selected"};
  } else if (w.out == nullptr || (w.n_tokens > 0 && (w.chunks == nullptr || w.v_mean == nullptr))) {
    return {errc::kInvalidArgument, "null out, chunks or v_mean"};
  }
  return {};
}

// One kv head of one work item: select (unless preselected), then the exact pass (unless
// select_only). Preconditions as sparf_select_head / sparf_exact_head.
inline status run_head(const sparf_config& cfg, const sparf_plan& plan, const sparf_params& params, const sparf_work& w,
                       uint32_t h, sparf_workspace& ws, sparf_counters& c, bool select_only,
                       decode_chunks_fn kernel) noexcept {
  const uint32_t G = cfg.group_size, d = cfg.head_dim();
  const float* q = w.q + size_t{h} * G * d;
  sparf_selection sel;
  if (w.preselected && !select_only) {
    sel = sparf_selection{w.selected + size_t{h} * plan.k, w.n_selected[h], w.alpha + size_t{h} * G};
  } else {
    const sparf_columns cols{w.column_blocks, w.column_pages, w.n_column_blocks};
    sel = sparf_select_head(cfg, plan, params, cols, w.n_tokens, w.n_chunks, q, h, ws, c,
                            w.selected ? w.selected + size_t{h} * plan.k : nullptr,
                            w.alpha ? w.alpha + size_t{h} * G : nullptr);
    if (w.n_selected) w.n_selected[h] = sel.n;
  }
  if (select_only) return {};
  return sparf_exact_head(cfg, sel, w.chunks, w.v_mean ? w.v_mean + size_t{h} * d : nullptr, q,
                          w.out + size_t{h} * G * d, w.lse ? w.lse + size_t{h} * G : nullptr, h, ws, c, kernel);
}

inline status run_batch(const sparf_config& cfg, const sparf_params& params, std::span<const sparf_work> batch,
                        sparf_workspace& ws, sparf_counters* counters, bool select_only) noexcept {
  try {
    INSTINFER_TRY(cfg.validate());
    INSTINFER_TRY(params.validate(cfg.head_dim()));
    uint32_t max_tokens = 0;
    for (size_t b = 0; b < batch.size(); ++b) {
      const std::string where = "SparF batch item " + std::to_string(b) + ": ";
      auto plan = sparf_resolve(params, cfg.head_dim(), batch[b].n_tokens);
      if (!plan.ok()) return {plan.error().code(), where + plan.error().message()};
      if (status s = check_work(cfg, *plan, batch[b], select_only); !s.ok()) return {s.code(), where + s.message()};
      max_tokens = std::max(max_tokens, batch[b].n_tokens);
    }
    INSTINFER_TRY(ws.reserve(max_tokens, cfg.head_dim(), cfg.group_size, cfg.columns.tokens_per_page));
    decode_chunks_fn kernel = nullptr;
    if (!select_only) {  // before anything is written
      auto found = ws.kernel(sparf_exact_params(cfg));
      if (!found.ok()) return found.error();
      kernel = found.value();
    }
    sparf_counters local;
    for (const sparf_work& w : batch) {
      const sparf_plan plan = sparf_resolve(params, cfg.head_dim(), w.n_tokens).value();
      for (uint32_t h = 0; h < cfg.n_kv_heads(); ++h)
        INSTINFER_TRY(run_head(cfg, plan, params, w, h, ws, local, select_only, kernel));
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

// Dual-step loading, step one: steps 1-3 only. Fills w.selected / w.n_selected (required) and
// w.alpha (when given) from the column data; chunks, out and lse are not touched. A storage
// backend then reads just the token pages holding the selected tokens and calls sparf_attend with
// those pages and `preselected`. counters get the column pages read.
inline status sparf_select(const sparf_config& cfg, const sparf_params& params, std::span<const sparf_work> batch,
                           sparf_workspace& ws, sparf_counters* counters = nullptr) noexcept {
  return sparf_detail::run_batch(cfg, params, batch, ws, counters, true);
}

}  // namespace instinfer
