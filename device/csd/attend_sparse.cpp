// attend-sparse: SparF next to the flash (attend_engine.hpp).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <mutex>
#include <new>
#include <string>
#include <thread>

#include "attend_engine.hpp"
#include "instinfer/attention/sparf/exact.hpp"
#include "instinfer/attention/sparf/select.hpp"

namespace instinfer::csd {

// ==== attend sparse (SparF next to the flash) ====================================================
// Per (item, kv head) task, on the drive's cores: choose the channel groups from q, read only
// those column pages (the tail's from DRAM), select tokens, read only the K and V pages of this
// head that hold selected tokens, then the exact attention over them (attention/sparf/select.hpp and
// exact.hpp, the same code the host runs). Modelled flash time: the column reads, then the token reads.

status attend_engine::attend_sparse(kv_namespace& ns, const sq_entry& e, const std::byte* data, std::byte* res,
                                    uint64_t& result_bytes) {
  const int64_t wall0 = wall_ns();
  command c;
  INSTINFER_TRY(decode_command(ns, e, true, data, res, c));
  if (c.sparf.policy == sparse_policy::kPageSummary) return attend_page_summary(ns, c, wall0, result_bytes);
  if (!ns.sparf) return {errc::kUnsupported, "namespace " + std::to_string(ns.nsid) + " was created without SparF"};
  sparse_shared sh;
  sh.plans.resize(c.n_items());
  for (uint32_t i = 0; i < c.n_items(); ++i) {
    auto plan = sparf_resolve(c.sparf, ns.cfg.head_dim, c.items[i].n_tokens);
    if (!plan.ok())
      return {plan.error().code(), "sequence " + std::to_string(c.items[i].seq) + ": " + plan.error().message()};
    sh.plans[i] = *plan;
  }
  INSTINFER_TRY(prepare_columns(ns, c, sh));
  if (ctx_.o.debug_attend_delay_ms)
    std::this_thread::sleep_for(std::chrono::milliseconds(ctx_.o.debug_attend_delay_ms));

  sparse_worker_out total;
  const status s = run_sparse(ns, c, sh, total);
  // Flash model: the column reads from command start, the token reads once they are done.
  ctx_.stats.flash_pages_read += total.col_ppns.size() + total.tok_ppns.size();
  ctx_.stats.column_pages_read += total.col_ppns.size();
  ctx_.stats.sparse_token_pages_read += total.tok_ppns.size();
  ctx_.flash_done_at(sparse_reads(ctx_.timeline, total.col_ppns.data(), total.col_ppns.size(), total.tok_ppns.data(),
                                  total.tok_ppns.size(), ctx_.now_ns));
  // Compute model: approximate scores over the chosen channels of every token and their ranking,
  // then the exact pass over the selected tokens' K and V (compression 1 skips the first part).
  {
    // A column value's bytes: f16 for a quantized cache.
    const sparf_counters& k = total.counters;
    const double column_elem = static_cast<double>(dtype_size(channel_layout::column_dtype(ns.geo.kv_dtype)));
    ctx_.work.approx_elements += static_cast<double>(k.channel_bytes_used + k.buffered_channel_bytes) / column_elem;
    if (k.channel_bytes_used + k.buffered_channel_bytes > 0)
      for (uint32_t i = 0; i < c.n_items(); ++i)
        ctx_.work.ranked_tokens += static_cast<double>(c.items[i].n_tokens) * ns.cfg.n_kv_heads;
  }
  return finish_sparse(ns, c, s, total.counters, wall0, ctx_.stats.sparse_attends, result_bytes);
}

status attend_engine::finish_sparse(const kv_namespace& ns, command& c, const status& run, const sparf_counters& k,
                                    int64_t wall0, uint64_t& attends, uint64_t& result_bytes) {
  // A token row's bytes per element (a quantized row counts its block scales).
  const double elem = static_cast<double>(dtype_row_bytes(ns.geo.kv_dtype, ns.cfg.head_dim)) / ns.cfg.head_dim;
  ctx_.work.group = ns.cfg.group_size;
  ctx_.work.kv_dtype = ns.geo.kv_dtype;
  ctx_.work.kv_elements += static_cast<double>(k.token_bytes_used) / elem;
  ctx_.work.scored_tokens += static_cast<double>(k.selected_tokens);
  if (!run.ok()) return run;
  const sparf_wire_counters wc = encode_sparf_counters(k);
  std::memcpy(c.counters, &wc, sizeof wc);
  result_bytes = c.wire.result_bytes;
  ++attends;
  ctx_.stats.attend_wall_ns += static_cast<uint64_t>(wall_ns() - wall0);
  return {};
}

// Single-threaded: make every item's column data current (rebuilds program flash) and its V mean.
status attend_engine::prepare_columns(kv_namespace& ns, const command& c, sparse_shared& sh) {
  const uint32_t H = ns.cfg.n_kv_heads, d = ns.cfg.head_dim;
  sh.item_blocks.resize(c.n_items());
  sh.item_tail.assign(c.n_items(), nullptr);
  sh.v_mean.assign(uint64_t{c.n_items()} * H * d, 0.0f);
  std::vector<double> acc(uint64_t{H} * d);
  for (uint32_t i = 0; i < c.n_items(); ++i) {
    const uint32_t n = c.items[i].n_tokens;
    if (n == 0) continue;
    INSTINFER_TRY(columns_.ensure(ns, c.items[i].seq, c.args.layer, *c.tabs[i], n, sh.item_blocks[i], sh.item_tail[i]));
    std::fill(acc.begin(), acc.end(), 0.0);  // same order of additions as the host's channel_index
    for (uint32_t b : sh.item_blocks[i])
      for (size_t x = 0; x < acc.size(); ++x) acc[x] += ns.cblocks[b].v_sum[x];
    const double inv = 1.0 / static_cast<double>(n);
    for (size_t x = 0; x < acc.size(); ++x)
      sh.v_mean[uint64_t{i} * H * d + x] =
          static_cast<float>((acc[x] + (sh.item_tail[i] ? sh.item_tail[i]->v_sum[x] : 0.0)) * inv);
  }
  return {};
}

status attend_engine::run_sparse(const kv_namespace& ns, const command& c, const sparse_shared& sh,
                                 sparse_worker_out& total, bool pages) {
  const uint32_t n_tasks = c.n_items() * ns.cfg.n_kv_heads;
  std::atomic<uint32_t> next{0};
  std::atomic<int64_t> cpu{0};
  std::mutex mu;  // total
  first_error error;
  auto worker = [&](uint32_t wid) noexcept {
    const int64_t cpu0 = thread_cpu_ns();
    attend_worker& ws = workers_[wid];
    sparse_worker_out mine;
    status s = ws.ensure_reader(*ctx_.store, 4 * ctx_.o.pages_per_batch);
    while (s.ok()) try {
        const uint32_t ti = next.fetch_add(1, std::memory_order_relaxed);
        if (ti >= n_tasks) break;
        s = pages ? run_page_task(ns, c, sh, ti, ws, mine) : run_sparse_task(ns, c, sh, ti, ws, mine);
      } catch (const std::bad_alloc&) {
        s = {errc::kOutOfMemory, "SparF worker"};
      }
    if (!s.ok() && ws.reader) (void)ws.reader->wait_all();
    cpu.fetch_add(thread_cpu_ns() - cpu0, std::memory_order_relaxed);
    try {
      std::lock_guard lock(mu);
      total.counters.add(mine.counters);
      total.col_ppns.insert(total.col_ppns.end(), mine.col_ppns.begin(), mine.col_ppns.end());
      total.tok_ppns.insert(total.tok_ppns.end(), mine.tok_ppns.begin(), mine.tok_ppns.end());
    } catch (const std::bad_alloc&) {
      s = {errc::kOutOfMemory, "SparF read accounting"};
    }
    if (!s.ok()) error.note(std::move(s));
  };
  pool_.run(worker);
  ctx_.stats.cpu_ns += static_cast<uint64_t>(cpu.load());
  return error.take();
}

// One (item, kv head): choose channels, read their column pages, select (select.hpp), read the
// token pages holding selected tokens, the exact pass (exact.hpp).
status attend_engine::run_sparse_task(const kv_namespace& ns, const command& c, const sparse_shared& sh, uint32_t task,
                                      attend_worker& ws, sparse_worker_out& mine) {
  const uint32_t hq = ns.q_heads(), d = ns.cfg.head_dim, G = ns.cfg.group_size, H = ns.cfg.n_kv_heads;
  const sparf_config& cfg = ns.sparf_one_head;
  const uint32_t ctp = cfg.columns.tokens_per_page;
  const uint32_t i = task / H, h = task % H;
  const uint32_t n = c.items[i].n_tokens;
  const sparf_plan& plan = sh.plans[i];
  const uint32_t n_chunks = ns.chunks_for(n), n_cblocks = (n + ctp - 1) / ctp;
  const uint64_t q0 = uint64_t{i} * hq + uint64_t{h} * G;  // the group's first query head
  const float* qh = c.q + q0 * d;
  INSTINFER_TRY(ws.sparf.reserve(std::max(n, 1u), d, G, ctp));
  ws.selected.resize(std::max(plan.k, 1u));
  ws.alpha.resize(G);
  sparf_columns cols;
  if (n > 0) {
    ws.channels.resize(d);
    ws.weight.resize(d);
    ws.scratch.resize(d);
    const sparf_channel_choice choice = sparf_choose_channels(cfg, plan, c.sparf.whole_pages, qh, ws.channels.data(),
                                                              ws.weight.data(), ws.scratch.data());
    // Step one: the chosen column pages of every column block (none when every token is kept:
    // sparf_select_head then skips the approximate scores).
    INSTINFER_TRY(load_column_pages(ns, sh, i, h, n_cblocks, choice.n_channels, plan.k >= n, ws, mine));
    cols = sparf_columns{ws.col_ptrs.data(), nullptr, n_cblocks};
  }
  const sparf_selection sel = sparf_select_head(cfg, plan, c.sparf, cols, n, n_chunks, qh, 0, ws.sparf, mine.counters,
                                                ws.selected.data(), ws.alpha.data());
  // Step two: the K and V pages of this head holding selected tokens.
  ws.tok_ptrs.assign(n_chunks, nullptr);
  if (sel.n > 0) INSTINFER_TRY(load_token_pages(ns, *c.tabs[i], h, sel, ws, mine));
  return sparf_exact_head(cfg, sel, ws.tok_ptrs.data(), sh.v_mean.data() + (uint64_t{i} * H + h) * d, qh,
                          c.out + q0 * d, c.lse + q0, 0, ws.sparf, mine.counters);
}

status attend_engine::load_column_pages(const kv_namespace& ns, const sparse_shared& sh, uint32_t item, uint32_t head,
                                        uint32_t n_column_blocks, uint32_t n_channels, bool keep_all, attend_worker& ws,
                                        sparse_worker_out& mine) {
  const channel_layout& cl = ns.sparf_one_head.columns;
  const uint32_t groups = cl.groups();
  const uint64_t page = ns.geo.page_bytes;
  if (!reserve_aligned(ws.col_stage, ws.col_stage_bytes, uint64_t{keep_all ? 1 : n_column_blocks} * groups * page))
    return {errc::kOutOfMemory, "SparF column staging"};
  ws.col_ptrs.resize(n_column_blocks);
  const std::vector<uint32_t>& blks = sh.item_blocks[item];
  status s;
  for (uint32_t b = 0; b < n_column_blocks && s.ok(); ++b) {
    std::byte* blk = ws.col_stage.get() + (keep_all ? 0 : uint64_t{b} * groups * page);
    ws.col_ptrs[b] = blk;
    if (keep_all) continue;
    for (uint32_t j = 0; j < n_channels && s.ok(); ++j) {
      const uint32_t gr = cl.group_of(ws.channels[j]);
      if (j > 0 && cl.group_of(ws.channels[j - 1]) == gr) continue;
      if (b < blks.size()) {
        const uint32_t ppn = ns.cblocks[blks[b]].pages[uint64_t{head} * groups + gr];
        s = ws.reader->queue(ppn, blk + uint64_t{gr} * page);
        mine.col_ppns.push_back(ppn);
      } else {  // the tail: DRAM
        std::memcpy(blk + uint64_t{gr} * page, sh.item_tail[item]->k.get() + (uint64_t{head} * groups + gr) * page,
                    page);
      }
    }
  }
  if (s.ok()) s = ws.reader->submit();
  if (s.ok()) s = ws.reader->wait_all();
  return s;
}

status attend_engine::load_token_pages(const kv_namespace& ns, const page_table& tab, uint32_t head,
                                       const sparf_selection& sel, attend_worker& ws, sparse_worker_out& mine) {
  const uint32_t tpp = ns.geo.tokens_per_page, H = ns.cfg.n_kv_heads;
  const uint64_t page = ns.geo.page_bytes;
  const auto new_page = [&](uint32_t j) { return j == 0 || sel.tokens[j] / tpp != sel.tokens[j - 1] / tpp; };
  uint32_t n_need = 0;
  for (uint32_t j = 0; j < sel.n; ++j) n_need += new_page(j);
  if (!reserve_aligned(ws.tok_stage, ws.tok_stage_bytes, std::max<uint64_t>(1, n_need) * 2 * page))
    return {errc::kOutOfMemory, "SparF token staging"};
  uint32_t slot = 0;
  status s;
  for (uint32_t j = 0; j < sel.n && s.ok(); ++j) {
    if (!new_page(j)) continue;
    const uint32_t ci = sel.tokens[j] / tpp;
    std::byte* dst = ws.tok_stage.get() + uint64_t{slot++} * 2 * page;
    ws.tok_ptrs[ci] = dst;
    const uint32_t id = tab[ci];
    if (!ns.resident(id)) {
      mine.tok_ppns.push_back(ns.pages(id)[head]);
      mine.tok_ppns.push_back(ns.pages(id)[H + head]);
    }
    s = ws.stage_head(ns, id, head, dst);
  }
  if (s.ok()) s = ws.reader->submit();
  if (s.ok()) s = ws.reader->wait_all();
  return s;
}

}  // namespace instinfer::csd
