// The drive's page summaries (kv_namespace::summaries): what the write, copy and reset paths do
// to them. The algorithm (the fold, the bound, the selection) is attention/sparf/page_summary.hpp,
// the host's; only the bookkeeping is here. Allocation failures drop a summary (it is rebuilt from
// the rows when attended), so no FTL command fails because of them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>

#include "drive_context.hpp"
#include "instinfer/attention/sparf/page_summary.hpp"
#include "kv_namespace.hpp"

namespace instinfer::csd {

// A namespace created with page summaries (before its tables are sized). The page policy's exact
// pass runs over one kv head's staged K and V pages, as SparF's does (sparf_exact_head); the column
// layout in its config is never used (channels per page: the default).
inline status summary_configure(kv_namespace& ns) {
  const namespace_config& c = ns.cfg;
  auto one = sparf_config::make(chunk_layout::make(ns.geo, 1), 0, c.group_size, c.scale, c.softcap);
  if (!one.ok()) return one.error();
  ns.page_summaries = true;
  ns.summary_one_head = *one;
  return {};
}

// Frees the chunk's summary (a reset chunk, or one about to be rebuilt).
inline void summary_drop(drive_context& ctx, kv_namespace& ns, uint64_t chunk) noexcept {
  if (!ns.page_summaries) return;
  std::unique_ptr<float[]>& s = ns.summaries[chunk - ns.base];
  if (!s) return;
  s.reset();
  const uint64_t bytes = ns.summary_floats() * sizeof(float);
  ns.summary_bytes -= bytes;
  ctx.stats.summary_bytes -= bytes;
}

// A fresh, empty summary for the chunk (replacing any), or null when out of memory or over the
// drive's summary budget (drive_options::summary_bytes): the chunk then keeps none.
inline float* summary_fresh(drive_context& ctx, kv_namespace& ns, uint64_t chunk) noexcept {
  summary_drop(ctx, ns, chunk);
  const uint64_t bytes = ns.summary_floats() * sizeof(float);
  if (ctx.stats.summary_bytes + bytes > ctx.o.summary_bytes) return nullptr;
  std::unique_ptr<float[]> s(new (std::nothrow) float[ns.summary_floats()]);
  if (!s) return nullptr;
  page_summary_clear(s.get(), ns.cfg.n_kv_heads, ns.cfg.head_dim);
  ns.summary_bytes += bytes;
  ctx.stats.summary_bytes += bytes;
  ns.summaries[chunk - ns.base] = std::move(s);
  return ns.summaries[chunk - ns.base].get();
}

// Rows just written at [first, first + n) of the chunk: k is [n][n_kv_heads][row] (the write
// command's order). The first rows of a chunk start its summary; later ones fold into it.
inline void summary_fold_rows(drive_context& ctx, kv_namespace& ns, uint64_t chunk, uint32_t first, const std::byte* k,
                              uint32_t n) noexcept {
  if (!ns.page_summaries) return;
  float* s = first == 0 ? summary_fresh(ctx, ns, chunk) : ns.summaries[chunk - ns.base].get();
  if (s) page_summary_fold(s, ns.cfg.n_kv_heads, ns.cfg.head_dim, ns.geo.kv_dtype, k, n);
}

// The summary of the first n rows of a chunk's K pages (chunk_layout order: the n_kv_heads K pages
// first, as in a whole chunk) into out.
inline void summary_of_pages(const kv_namespace& ns, float* out, const std::byte* k_pages, uint32_t n) noexcept {
  const uint32_t H = ns.cfg.n_kv_heads, d = ns.cfg.head_dim;
  page_summary_clear(out, H, d);
  for (uint32_t h = 0; h < H; ++h)  // one kv head's page: [n][row], i.e. rows of a one-head fold
    page_summary_fold(out + size_t{2} * h * d, 1, d, ns.geo.kv_dtype, k_pages + uint64_t{h} * ns.geo.page_bytes, n);
}

}  // namespace instinfer::csd
