// attend-sparse with the page-summary policy next to the flash (attend_engine.hpp): per (item, kv
// head) task, on the drive's cores, score every page group from its summary in DRAM, choose the
// groups (attention/sparf/page_summary.hpp, the host's code), read the chosen groups' K and V pages
// of this head whole, and run the exact pass over their rows (attention/sparf/exact.hpp, alpha 1:
// exact over what it reads). No column copy is read. Modelled flash time: the page reads.
#include <algorithm>
#include <chrono>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <string>
#include <thread>

#include "attend_engine.hpp"
#include "instinfer/attention/sparf/exact.hpp"
#include "page_summaries.hpp"

namespace instinfer::csd {

status attend_engine::attend_page_summary(kv_namespace& ns, command& c, int64_t wall0, uint64_t& result_bytes) {
  if (!ns.page_summaries)
    return {errc::kUnsupported, "namespace " + std::to_string(ns.nsid) +
                                    " was created without page summaries (namespace_config::page_summaries; "
                                    "cache_options::page_summaries on the host): no page-summary policy here"};
  const uint32_t d = ns.cfg.head_dim, tpp = ns.geo.tokens_per_page;
  sparse_shared sh;
  sh.page_plans.resize(c.n_items());
  for (uint32_t i = 0; i < c.n_items(); ++i) {
    auto plan = page_summary_resolve(c.sparf, d, tpp, c.items[i].n_tokens);
    if (!plan.ok())
      return {plan.error().code(), "sequence " + std::to_string(c.items[i].seq) + ": " + plan.error().message()};
    sh.page_plans[i] = *plan;
  }
  INSTINFER_TRY(prepare_summaries(ns, c, sh));
  if (ctx_.o.debug_attend_delay_ms)
    std::this_thread::sleep_for(std::chrono::milliseconds(ctx_.o.debug_attend_delay_ms));

  sparse_worker_out total;
  const status s = run_sparse(ns, c, sh, total, true);
  // Flash model: the chosen pages, once the summaries (and any rebuild reads) are known.
  ctx_.stats.flash_pages_read += total.tok_ppns.size();
  ctx_.stats.page_summary_pages_read += total.tok_ppns.size();
  ctx_.flash_done_at(
      ctx_.timeline.read_batch(total.tok_ppns.data(), total.tok_ppns.size(), std::max(ctx_.now_ns, ctx_.flash_end)));
  // Compute model: the bound of every (group, kv head) per query head (a multiply pair and a max
  // per summary channel: counted as approximate-score elements), then the exact pass over the
  // chosen groups' rows.
  for (uint32_t i = 0; i < c.n_items(); ++i)
    ctx_.work.approx_elements += 2.0 * d * sh.page_plans[i].n_groups * ns.cfg.n_kv_heads;
  return finish_sparse(ns, c, s, total.counters, wall0, ctx_.stats.page_summary_attends, result_bytes);
}

// Single-threaded: every item's group summaries. A chunk's summary covers the rows it holds; an
// item that attends fewer (its last group, after a truncation that kept part of a chunk) gets one
// of just those rows, made for this command; a missing one (an allocation failed when the rows
// were written) is made and kept. Both fold the K pages: from the group buffer, or read from flash.
status attend_engine::prepare_summaries(kv_namespace& ns, const command& c, sparse_shared& sh) {
  const uint32_t H = ns.cfg.n_kv_heads, tpp = ns.geo.tokens_per_page;
  const uint64_t page = ns.geo.page_bytes;
  aligned_bytes k_pages;  // H K pages read from flash, allocated when first needed
  sh.item_summaries.resize(c.n_items());
  for (uint32_t i = 0; i < c.n_items(); ++i) {
    const uint32_t n = c.items[i].n_tokens;
    if (n == 0) continue;
    const page_table& tab = *c.tabs[i];
    std::vector<const float*>& sums = sh.item_summaries[i];
    sums.resize(sh.page_plans[i].n_groups);
    for (uint32_t g = 0; g < sums.size(); ++g) {
      const uint32_t id = tab[g];
      const uint32_t m = std::min(tpp, n - g * tpp);  // rows of the group attended (check_items: <= held)
      const float* kept = ns.summaries[id - ns.base].get();
      if (kept && ns.entry(id).n_tokens == m) {
        sums[g] = kept;
        continue;
      }
      const std::byte* src = ns.resident(id);
      if (src == nullptr) {
        if (!ns.entry(id).on_flash)
          return {errc::kInternal, "chunk " + std::to_string(id) + " holds tokens but no data"};
        if (!k_pages && !(k_pages = alloc_aligned(H * page)))
          return {errc::kOutOfMemory, "page summary rebuild staging"};
        for (uint32_t h = 0; h < H; ++h) {
          const uint32_t ppn = ns.pages(id)[h];
          INSTINFER_TRY(ctx_.store->read(ppn, k_pages.get() + uint64_t{h} * page));
          ctx_.note_read(ppn);
          ++ctx_.stats.summary_rebuild_pages_read;
        }
        src = k_pages.get();
      }
      // Kept when it covers the whole chunk and fits the budget; else for this command only.
      float* made = ns.entry(id).n_tokens == m ? summary_fresh(ctx_, ns, id) : nullptr;
      if (made == nullptr) {
        sh.rebuilt.emplace_back(new (std::nothrow) float[ns.summary_floats()]);
        made = sh.rebuilt.back().get();
      }
      if (made == nullptr) return {errc::kOutOfMemory, "page summary of chunk " + std::to_string(id)};
      summary_of_pages(ns, made, src, m);
      sums[g] = made;
    }
  }
  return {};
}

// One (item, kv head): score the groups, choose, read the chosen groups' K and V pages of this
// head, the exact pass over all their rows. Counters as the host's policy counts them: whole
// groups, both pages of each per kv head.
status attend_engine::run_page_task(const kv_namespace& ns, const command& c, const sparse_shared& sh, uint32_t task,
                                    attend_worker& ws, sparse_worker_out& mine) {
  const uint32_t hq = ns.q_heads(), d = ns.cfg.head_dim, G = ns.cfg.group_size, H = ns.cfg.n_kv_heads;
  const uint32_t tpp = ns.geo.tokens_per_page;
  const uint32_t i = task / H, h = task % H;
  const uint32_t n = c.items[i].n_tokens;
  const page_summary_plan& plan = sh.page_plans[i];
  const uint64_t q0 = uint64_t{i} * hq + uint64_t{h} * G;  // the group's first query head
  const float* q = c.q + q0 * d;
  float* out = c.out + q0 * d;
  float* lse = c.lse + q0;
  const uint64_t row = ns.geo.row_bytes();
  sparf_counters& k = mine.counters;
  ++k.items;
  k.dense_pages += 2ull * plan.n_groups;
  k.dense_bytes += 2ull * n * row;
  if (n == 0) {
    std::fill(out, out + uint64_t{G} * d, 0.0f);
    std::fill(lse, lse + G, -std::numeric_limits<float>::infinity());
    return {};
  }
  const std::vector<const float*>& sums = sh.item_summaries[i];
  ws.group_order.resize(2 * size_t{plan.n_groups});  // page_summary_select's scratch
  ws.groups.resize(plan.n_select);
  auto score = ws.sparf.page_summary_kernel();
  if (!score.ok()) return score.error();
  page_summary_score_args a;  // this kv head only: a summary block's other heads are not read
  a.groups = sums.data();
  a.n_groups = plan.n_groups;
  a.group_end = plan.n_groups;
  a.kv_begin = h;
  a.n_kv = 1;
  a.head_dim = d;
  a.group_size = G;
  a.q = q - uint64_t{h} * G * d;  // the item's first query head
  ws.group_scores.resize(uint64_t{H} * plan.n_groups);
  a.scores = ws.group_scores.data();
  score.value()(a);
  const uint32_t n_chosen = page_summary_select(plan, ws.group_scores.data() + uint64_t{h} * plan.n_groups,
                                                ws.group_order.data(), ws.groups.data());
  ws.tokens.clear();
  for (uint32_t j = 0; j < n_chosen; ++j) {
    const uint32_t g = ws.groups[j];
    for (uint32_t t = g * tpp, end = std::min(n, g * tpp + tpp); t < end; ++t) ws.tokens.push_back(t);
  }
  ws.ones.assign(G, 1.0f);
  const sparf_selection sel{ws.tokens.data(), static_cast<uint32_t>(ws.tokens.size()), ws.ones.data()};
  INSTINFER_TRY(ws.sparf.reserve(sel.n, d, G, ns.summary_one_head.columns.tokens_per_page));
  ws.tok_ptrs.assign(plan.n_groups, nullptr);
  INSTINFER_TRY(load_token_pages(ns, *c.tabs[i], h, sel, ws, mine));
  k.selected_tokens += sel.n;
  k.token_pages_read += 2ull * n_chosen;
  k.token_bytes_used += 2ull * sel.n * row;
  return sparf_exact_head(ns.summary_one_head, sel, ws.tok_ptrs.data(), nullptr, q, out, lse, 0, ws.sparf,
                          ws.exact_counters);
}

}  // namespace instinfer::csd
