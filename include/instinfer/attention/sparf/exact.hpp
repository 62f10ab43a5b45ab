// SparF step 4 for one kv head: exact attention over the selected tokens only, blended with the
// mean of V,
//     out = alpha * softmax(scale * q K_T^T) V_T + (1 - alpha) * mean(V)
// with alpha the approximate softmax mass of the chosen tokens (per query head, from select.hpp).
//
// There is one decode algorithm: the selected tokens' K and V rows are gathered into staged
// pseudo-chunks (full pages of one kv head, laid out as chunk_layout says, the last one partial)
// and handed to the decode kernel (attention/decode.hpp) a stage at a time; the stages' partial
// states merge and normalise through attention/state.hpp. The returned lse is that of the chosen
// tokens' exact logits minus log(alpha): the estimate of the full log-sum-exp that lets a SparF
// partial merge with other tiers (exact when alpha = 1).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>

#include "instinfer/attention/decode.hpp"
#include "instinfer/attention/sparf/params.hpp"
#include "instinfer/attention/sparf/select.hpp"
#include "instinfer/attention/sparf/workspace.hpp"
#include "instinfer/attention/state.hpp"

namespace instinfer {

namespace sparf_detail {

// Page bytes of the exact pass's pseudo-chunks: the staged rows are SparF's own copy, so their
// pages need not be the cache's. 16 KiB pages give the decode kernel whole blocks (kBlockTokens
// rows of about 16 KiB of K) where small cache pages would cut every block at a few rows.
inline constexpr uint32_t kExactPageBytes = 16384;

// The pseudo-chunks' page geometry (cfg's when the larger one does not hold the rows).
inline page_geometry exact_geometry(const sparf_config& cfg) noexcept {
  const page_geometry& g = cfg.tokens.page;
  if (g.page_bytes >= kExactPageBytes || page_geometry::check(kExactPageBytes, g.head_dim, g.kv_dtype) != errc::kOk)
    return g;
  auto big = page_geometry::make(kExactPageBytes, g.head_dim, g.kv_dtype);
  return big.ok() ? big.value() : g;
}

}  // namespace sparf_detail

// The decode kernel's view of the exact pass's pseudo-chunks: one kv head, 16 KiB pages
// (sparf_detail::exact_geometry).
inline decode_params sparf_exact_params(const sparf_config& cfg) noexcept {
  decode_params p;
  p.layout = chunk_layout::make(sparf_detail::exact_geometry(cfg), 1);
  p.group_size = cfg.group_size;
  p.scale = cfg.scale;
  p.softcap = cfg.softcap;
  return p;
}

namespace sparf_detail {

// Largest number of pseudo-chunks one stage holds (smallest pages).
inline constexpr uint32_t kMaxStagedChunks =
    static_cast<uint32_t>(sparf_workspace::kStageBytes / (2 * page_geometry::kMinPageBytes));

// One row: inline 32-byte moves for whole multiples of 32 (every f16/bf16/f32 row of a supported
// head_dim), not a library call per row; memcpy for the rest (quantized rows).
inline void copy_row(std::byte* dst, const std::byte* src, uint32_t bytes) noexcept {
  if (bytes % 32 != 0) {
    std::memcpy(dst, src, bytes);
    return;
  }
  for (uint32_t i = 0; i < bytes; i += 32) __builtin_memcpy(dst + i, src + i, 32);
}

// Copies tokens sel[first, first + n) of kv_head (K and V rows) into consecutive pseudo-chunks
// at stage; ptrs receives the pseudo-chunk bases. sel is ascending, so a source page's base is
// found once per page (no division per row); rows of one head's page are contiguous.
inline void stage_rows(const sparf_config& cfg, const std::byte* const* chunks, const uint32_t* sel, uint32_t n,
                       uint32_t kv_head, std::byte* stage, const std::byte** ptrs) noexcept {
  const chunk_layout& src = cfg.tokens;
  const chunk_layout dst = chunk_layout::make(exact_geometry(cfg), 1);
  const uint32_t tpp = src.tokens(), dtpp = dst.tokens(), row = src.page.row_bytes();
  const uint64_t k_page = src.page_offset(kv_kind::kKey, kv_head), v_page = src.page_offset(kv_kind::kValue, kv_head);
  const uint64_t dst_k = dst.page_offset(kv_kind::kKey, 0), dst_v = dst.page_offset(kv_kind::kValue, 0);
  // The rows are scattered over the sequence's pages: prefetch kAhead selections ahead so the
  // copies do not wait on memory one row at a time. The look-ahead keeps its own page cursor.
  constexpr uint32_t kAhead = 32;
  uint32_t ahead_chunk = UINT32_MAX;
  const std::byte* ahead_base = nullptr;
  const auto prefetch_row = [&](uint32_t tok) noexcept {
    const uint32_t c = tok / tpp;
    if (c != ahead_chunk) {
      ahead_chunk = c;
      ahead_base = chunks[c];
    }
    const uint64_t in_page = uint64_t{tok - c * tpp} * row;
    const std::byte* kr = ahead_base + k_page + in_page;
    const std::byte* vr = ahead_base + v_page + in_page;
    for (uint32_t l = 0; l < row; l += 64) {
      __builtin_prefetch(kr + l, 0, 3);
      __builtin_prefetch(vr + l, 0, 3);
    }
  };
  for (uint32_t j = 0; j < std::min(n, kAhead); ++j) prefetch_row(sel[j]);
  uint32_t cur_chunk = UINT32_MAX, cur_first = 0;
  const std::byte* cur_k = nullptr;
  const std::byte* cur_v = nullptr;
  std::byte* chunk = stage;
  uint32_t slot = 0;  // row inside the current pseudo-chunk
  for (uint32_t j = 0; j < n; ++j) {
    if (j + kAhead < n) prefetch_row(sel[j + kAhead]);
    if (slot == 0) ptrs[j / dtpp] = chunk;
    const uint32_t tok = sel[j];
    if (tok - cur_first >= tpp || cur_chunk == UINT32_MAX) {
      cur_chunk = tok / tpp;
      cur_first = cur_chunk * tpp;
      cur_k = chunks[cur_chunk] + k_page;
      cur_v = chunks[cur_chunk] + v_page;
    }
    const uint64_t in_page = uint64_t{tok - cur_first} * row;
    copy_row(chunk + dst_k + uint64_t{slot} * row, cur_k + in_page, row);
    copy_row(chunk + dst_v + uint64_t{slot} * row, cur_v + in_page, row);
    if (++slot == dtpp) {
      slot = 0;
      chunk += dst.chunk_bytes();
    }
  }
}

}  // namespace sparf_detail

// Step 4 for kv head `kv_head`: fills out [group_size][head_dim] (normalised) and lse
// [group_size] (optional) of the group's query heads q [group_size][head_dim].
// chunks: the sequence's token-indexed chunks in token order; only those holding a selected
// token are dereferenced. v_mean: this kv head's mean of V over all tokens, [head_dim].
// kernel: the decode kernel for sparf_exact_params(cfg), or null to look it up (kept in ws).
// Preconditions: cfg validated, ws reserved, sel from sparf_select_head (ascending tokens).
// Counters: the token pages holding a selected token (K and V) and the bytes of the rows used.
inline status sparf_exact_head(const sparf_config& cfg, const sparf_selection& sel, const std::byte* const* chunks,
                               const float* v_mean, const float* q, float* out, float* lse, uint32_t kv_head,
                               sparf_workspace& ws, sparf_counters& c, decode_chunks_fn kernel = nullptr) noexcept {
  const uint32_t d = cfg.head_dim(), G = cfg.group_size;
  const uint32_t tpp = cfg.tokens.page.tokens_per_page;
  if (sel.n == 0) {
    std::fill(out, out + size_t{G} * d, 0.0f);
    if (lse) std::fill(lse, lse + G, -std::numeric_limits<float>::infinity());
    return {};
  }
  const decode_params p = sparf_exact_params(cfg);
  if (kernel == nullptr) {
    auto found = ws.kernel(p);
    if (!found.ok()) return found.error();
    kernel = found.value();
  }
  uint32_t last_chunk = UINT32_MAX;
  for (uint32_t j = 0; j < sel.n; ++j) {
    const uint32_t chunk = sel.tokens[j] / tpp;
    if (chunk != last_chunk) c.token_pages_read += 2;  // the K page and the V page of this head
    last_chunk = chunk;
  }
  c.token_bytes_used += 2ull * sel.n * cfg.tokens.page.row_bytes();

  // A stage at a time: gather, run the kernel, merge its partial state into the running one.
  const uint32_t per_stage = std::min<uint32_t>(
      sparf_detail::kMaxStagedChunks, static_cast<uint32_t>(sparf_workspace::kStageBytes / p.layout.chunk_bytes()));
  const uint32_t stpp = p.layout.tokens();  // tokens of a pseudo-chunk
  const uint32_t stage_tokens = per_stage * stpp;
  const std::byte* ptrs[sparf_detail::kMaxStagedChunks];
  float* o = ws.o_.data();
  softmax_stats* stats = ws.stats_.data();
  for (uint32_t j0 = 0; j0 < sel.n; j0 += stage_tokens) {
    const uint32_t m = std::min(stage_tokens, sel.n - j0);
    const uint32_t n_chunks = (m + stpp - 1) / stpp;
    sparf_detail::stage_rows(cfg, chunks, sel.tokens + j0, m, kv_head, ws.stage(), ptrs);
    const bool first = j0 == 0;
    float* o_dst = first ? o : ws.o_part_.data();
    softmax_stats* s_dst = first ? stats : ws.stats_part_.data();
    kernel(p, ptrs, n_chunks, m - (n_chunks - 1) * stpp, 0, q, o_dst, s_dst);
    if (!first)
      for (uint32_t g = 0; g < G; ++g) merge_state(stats[g], o + size_t{g} * d, s_dst[g], o_dst + size_t{g} * d, d);
  }
  for (uint32_t g = 0; g < G; ++g) {
    float* og = o + size_t{g} * d;
    normalize_state(stats[g], og, d);
    const float alpha = sel.alpha[g];
    float* outg = out + size_t{g} * d;
    if (alpha >= 1.0f) {
      std::copy(og, og + d, outg);
    } else {
      for (uint32_t i = 0; i < d; ++i) outg[i] = alpha * og[i] + (1.0f - alpha) * v_mean[i];
    }
    if (lse) lse[g] = alpha > 0.0f ? state_lse(stats[g]) - std::log(alpha) : state_lse(stats[g]);
  }
  return {};
}

}  // namespace instinfer
