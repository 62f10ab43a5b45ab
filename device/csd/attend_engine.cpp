#include "attend_engine.hpp"

#include <time.h>
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <mutex>
#include <new>
#include <string>
#include <thread>

#include "instinfer/attention/sparf.hpp"
#include "instinfer/attention/state.hpp"

namespace instinfer::csd {

namespace {

int64_t thread_cpu_ns() noexcept {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return int64_t{ts.tv_sec} * 1000000000 + ts.tv_nsec;
}
int64_t wall_ns() noexcept {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Grow-only aligned staging: reallocated only when a command needs more than any before.
bool reserve_aligned(aligned_bytes& buf, uint64_t& have, uint64_t need) noexcept {
  if (have >= need) return true;
  buf = alloc_aligned(need);
  have = buf ? need : 0;
  return buf != nullptr;
}

// The first error any worker saw.
class first_error {
 public:
  void note(status s) noexcept {
    std::lock_guard lock(mutex_);
    if (error_.ok()) error_ = std::move(s);
  }
  status take() noexcept { return std::move(error_); }

 private:
  std::mutex mutex_;
  status error_;
};

}  // namespace

// One core's reader and staging buffers, kept between commands.
struct attend_engine::worker_state {
  std::unique_ptr<page_reader> reader;
  aligned_bytes staging;
  uint64_t staging_bytes = 0;
  std::vector<const std::byte*> ptrs;
  std::vector<float> o;
  std::vector<softmax_stats> st;
  // SparF
  sparf_workspace sparf;
  aligned_bytes col_stage, tok_stage;
  uint64_t col_stage_bytes = 0, tok_stage_bytes = 0;
  std::vector<const std::byte*> col_ptrs, tok_ptrs;
  std::vector<uint32_t> channels, selected;
  std::vector<float> weight, scratch, alpha;
};

// A decoded, validated attend command: where its parts lie, its items and their page tables.
struct attend_engine::command {
  attend_args args{};
  attend_wire_layout wire{};
  sparf_params sparf{};  // attend-sparse only
  std::vector<attend_entry> items;
  std::vector<const page_table*> tabs;  // per item; null for an item of no tokens
  const float* q = nullptr;             // [n_items][q_heads][head_dim]
  float* out = nullptr;                 // [n_items][q_heads][head_dim]
  float* lse = nullptr;                 // [n_items][q_heads]
  std::byte* counters = nullptr;        // attend-sparse: one sparf_wire_counters
  uint32_t n_items() const noexcept { return args.n_items; }
};

attend_engine::attend_engine(drive_context& ctx, column_ftl& columns)
    : ctx_(ctx), columns_(columns), pool_(ctx.o.n_cores), workers_(pool_.size()) {}

attend_engine::~attend_engine() = default;

status attend_engine::ensure_reader(worker_state& ws, uint32_t depth) noexcept {
  if (ws.reader) return {};
  auto r = ctx_.store->make_reader(depth);
  if (!r.ok()) return r.error();
  ws.reader = std::move(*r);
  return {};
}

status attend_engine::decode_command(const kv_namespace& ns, const sq_entry& e, bool sparse, const std::byte* data,
                                     std::byte* res, command& c) const {
  const char* what = sparse ? "attend-sparse" : "attend";
  c.args = get_args<attend_args>(e);
  INSTINFER_TRY(ns.check_layer(c.args.layer));
  if (c.args.n_items == 0 || c.args.n_items > kMaxAttendItems)
    return {errc::kInvalidArgument, "attend batch must hold 1..65536 items"};
  c.wire = attend_wire_layout::make(c.args.n_items, ns.q_heads(), ns.cfg.head_dim, sparse);
  if (e.data_bytes != c.wire.data_bytes) return {errc::kInvalidArgument, std::string(what) + " payload size mismatch"};
  if (e.result_bytes < c.wire.result_bytes)
    return {errc::kInvalidArgument, std::string(what) + " result buffer too small"};
  if (sparse) {
    sparf_wire_params wp;
    std::memcpy(&wp, data, sizeof wp);
    if (!decode_sparf_params(wp, c.sparf)) return {errc::kInvalidArgument, "unknown SparF mode"};
    INSTINFER_TRY(c.sparf.validate(ns.cfg.head_dim));
  }
  c.items.resize(c.args.n_items);
  std::memcpy(c.items.data(), data + c.wire.entries_offset, c.items.size() * sizeof(attend_entry));
  c.q = reinterpret_cast<const float*>(data + c.wire.q_offset);
  c.out = reinterpret_cast<float*>(res);
  c.lse = reinterpret_cast<float*>(res + c.wire.lse_offset);
  c.counters = res + c.wire.counters_offset;
  // Every item against the drive's own page tables, before any work.
  c.tabs.assign(c.args.n_items, nullptr);
  return check_items(ns, c);
}

status attend_engine::check_items(const kv_namespace& ns, command& c) const {
  const uint32_t tpp = ns.geo.tokens_per_page, layer = c.args.layer;
  for (uint32_t i = 0; i < c.n_items(); ++i) {
    const attend_entry& item = c.items[i];
    if (item.n_tokens == 0) continue;
    auto it = ns.tables.find(seq_layer_key{item.seq, layer});
    if (it == ns.tables.end())
      return {errc::kUnknownSequence, "sequence " + std::to_string(item.seq) + " has no pages in layer " +
                                          std::to_string(layer) + " of namespace " + std::to_string(ns.nsid)};
    const uint64_t n_chunks = ns.chunks_for(item.n_tokens);
    if (it->second.size() < n_chunks)
      return {errc::kInvalidArgument, "sequence " + std::to_string(item.seq) + " holds " +
                                          std::to_string(it->second.size()) + " chunks, attend asks for " +
                                          std::to_string(item.n_tokens) + " tokens"};
    for (uint64_t ci = 0; ci < n_chunks; ++ci) {
      const uint32_t id = it->second[ci];
      if (!ns.owns(id))
        return {errc::kInvalidArgument, "page table of sequence " + std::to_string(item.seq) + " has a hole"};
      const uint32_t need = ci + 1 < n_chunks ? tpp : item.n_tokens - static_cast<uint32_t>(ci) * tpp;
      if (ns.entry(id).n_tokens < need)
        return {errc::kInvalidArgument, "chunk " + std::to_string(id) + " of sequence " + std::to_string(item.seq) +
                                            " holds " + std::to_string(ns.entry(id).n_tokens) +
                                            " tokens, attend needs " + std::to_string(need)};
    }
    c.tabs[i] = &it->second;
  }
  return {};
}

// ==== dense attend ===============================================================================
// Plan (item, kv head, chunk range) tasks, stream each task's K and V pages double-buffered through
// the decode kernel into a partial state, then merge each (item, head)'s partials in token order.

struct attend_engine::dense_task {
  uint32_t item;
  uint32_t head;
  uint32_t c_begin;
  uint32_t c_end;
};
struct attend_engine::dense_plan {
  std::vector<dense_task> tasks;
  std::vector<uint32_t> first_task;  // [item * n_kv_heads + head]: its first task; one past the end last
};

status attend_engine::attend(kv_namespace& ns, const sq_entry& e, const std::byte* data, std::byte* res,
                             uint64_t& result_bytes) {
  const int64_t wall0 = wall_ns();
  command c;
  INSTINFER_TRY(decode_command(ns, e, false, data, res, c));
  if (ctx_.o.debug_attend_delay_ms)
    std::this_thread::sleep_for(std::chrono::milliseconds(ctx_.o.debug_attend_delay_ms));
  const dense_plan plan = plan_dense(ns, c);
  model_dense_reads(ns, c, plan);
  const uint64_t gd = uint64_t{ns.cfg.group_size} * ns.cfg.head_dim;
  std::vector<float> part_o(plan.tasks.size() * gd);
  std::vector<softmax_stats> part_s(plan.tasks.size() * ns.cfg.group_size);
  INSTINFER_TRY(run_dense(ns, c, plan, part_o.data(), part_s.data()));
  merge_dense(ns, c, plan, part_o.data(), part_s.data());
  result_bytes = c.wire.result_bytes;
  ctx_.stats.attend_wall_ns += static_cast<uint64_t>(wall_ns() - wall0);
  return {};
}

// Enough tasks to keep every core busy: an (item, head) splits its chunks when pairs are few.
attend_engine::dense_plan attend_engine::plan_dense(const kv_namespace& ns, const command& c) const {
  const uint32_t heads = ns.cfg.n_kv_heads;
  const uint64_t target_tasks = uint64_t{pool_.size()} * 4;
  dense_plan plan;
  plan.first_task.assign(uint64_t{c.n_items()} * heads + 1, 0);
  for (uint32_t i = 0; i < c.n_items(); ++i) {
    const uint32_t n_chunks = ns.chunks_for(c.items[i].n_tokens);
    const uint64_t pairs = uint64_t{c.n_items()} * heads;
    uint32_t per = n_chunks;
    if (pairs < target_tasks && n_chunks > 0) {
      const uint64_t splits = std::min<uint64_t>(n_chunks, (target_tasks + pairs - 1) / pairs);
      per = static_cast<uint32_t>((n_chunks + splits - 1) / splits);
    }
    for (uint32_t h = 0; h < heads; ++h) {
      plan.first_task[uint64_t{i} * heads + h] = static_cast<uint32_t>(plan.tasks.size());
      for (uint32_t ci = 0; ci < n_chunks; ci += per) plan.tasks.push_back({i, h, ci, std::min(n_chunks, ci + per)});
    }
  }
  plan.first_task.back() = static_cast<uint32_t>(plan.tasks.size());
  return plan;
}

// Modelled flash time: every page the engine will read from flash, queued at command start.
void attend_engine::model_dense_reads(const kv_namespace& ns, const command& c, const dense_plan& plan) {
  const uint32_t heads = ns.cfg.n_kv_heads;
  read_ppns_.clear();
  for (const dense_task& t : plan.tasks)
    for (uint32_t ci = t.c_begin; ci < t.c_end; ++ci) {
      const uint32_t id = (*c.tabs[t.item])[ci];
      if (ns.entry(id).slot != kNoSlot) continue;  // still in the DRAM group buffer
      const uint32_t* pages = ns.pages(id);
      read_ppns_.push_back(pages[t.head]);
      read_ppns_.push_back(pages[heads + t.head]);
    }
  ctx_.stats.flash_pages_read += read_ppns_.size();
  ctx_.flash_done_at(ctx_.timeline.read_batch(read_ppns_.data(), read_ppns_.size(), ctx_.now_ns));
}

status attend_engine::run_dense(const kv_namespace& ns, const command& c, const dense_plan& plan, float* part_o,
                                softmax_stats* part_s) {
  const uint32_t g = ns.cfg.group_size, d = ns.cfg.head_dim, batch = ctx_.o.pages_per_batch;
  const uint64_t stage_bytes = 2 * uint64_t{batch} * 2 * ns.geo.page_bytes;  // two buffers of `batch` x [K][V]
  std::atomic<uint32_t> next{0};
  std::atomic<int64_t> cpu{0};
  first_error error;
  auto worker = [&](uint32_t w) noexcept {
    const int64_t cpu0 = thread_cpu_ns();
    worker_state& ws = workers_[w];
    status s = ensure_reader(ws, 2 * batch * 2);
    if (s.ok() && !reserve_aligned(ws.staging, ws.staging_bytes, stage_bytes))
      s = {errc::kOutOfMemory, "staging buffer"};
    try {
      ws.ptrs.resize(batch);
      ws.o.resize(uint64_t{g} * d);
      ws.st.resize(g);
    } catch (const std::bad_alloc&) {
      s = {errc::kOutOfMemory, "attend worker"};
    }
    while (s.ok()) {
      const uint32_t ti = next.fetch_add(1, std::memory_order_relaxed);
      if (ti >= plan.tasks.size()) break;
      s = run_dense_task(ns, c, plan.tasks[ti], ws, part_o + uint64_t{ti} * g * d, part_s + uint64_t{ti} * g);
    }
    if (!s.ok()) error.note(std::move(s));
    cpu.fetch_add(thread_cpu_ns() - cpu0, std::memory_order_relaxed);
  };
  pool_.run(worker);
  ctx_.stats.cpu_ns += static_cast<uint64_t>(cpu.load());
  return error.take();
}

// One task: double-buffered streaming, reads of batch j+1 in flight while batch j is computed.
status attend_engine::run_dense_task(const kv_namespace& ns, const command& c, const dense_task& t, worker_state& ws,
                                     float* acc_o, softmax_stats* acc_s) noexcept {
  const uint32_t g = ns.cfg.group_size, d = ns.cfg.head_dim, heads = ns.cfg.n_kv_heads;
  const uint32_t tpp = ns.geo.tokens_per_page, batch = ctx_.o.pages_per_batch;
  const uint64_t page = ns.geo.page_bytes;
  const page_table& tab = *c.tabs[t.item];
  const uint32_t n_tok = c.items[t.item].n_tokens;
  const uint32_t n_chunks = ns.chunks_for(n_tok);
  std::fill(acc_o, acc_o + uint64_t{g} * d, 0.0f);
  std::fill(acc_s, acc_s + g, softmax_stats{});
  const float* qh = c.q + (uint64_t{t.item} * ns.q_heads() + uint64_t{t.head} * g) * d;
  auto load = [&](uint32_t c0, uint32_t c1, std::byte* buf) -> status {
    for (uint32_t ci = c0; ci < c1; ++ci) {
      const uint32_t id = tab[ci];
      std::byte* dst = buf + uint64_t{ci - c0} * 2 * page;
      if (const std::byte* s = ns.resident(id)) {
        std::memcpy(dst, s + uint64_t{t.head} * page, page);
        std::memcpy(dst + page, s + uint64_t{heads + t.head} * page, page);
      } else {
        const uint32_t* pages = ns.pages(id);
        INSTINFER_TRY(ws.reader->queue(pages[t.head], dst));
        INSTINFER_TRY(ws.reader->queue(pages[heads + t.head], dst + page));
      }
    }
    return ws.reader->submit();
  };
  std::byte* bufs[2] = {ws.staging.get(), ws.staging.get() + uint64_t{batch} * 2 * page};
  status s = load(t.c_begin, std::min(t.c_end, t.c_begin + batch), bufs[0]);
  uint32_t j = 0;
  for (uint32_t c0 = t.c_begin; s.ok() && c0 < t.c_end; c0 += batch, ++j) {
    const uint32_t c1 = std::min(t.c_end, c0 + batch);
    s = ws.reader->wait_all();
    if (!s.ok()) break;
    if (c1 < t.c_end) {
      s = load(c1, std::min(t.c_end, c1 + batch), bufs[(j + 1) % 2]);
      if (!s.ok()) break;
    }
    std::byte* buf = bufs[j % 2];
    for (uint32_t ci = c0; ci < c1; ++ci) ws.ptrs[ci - c0] = buf + uint64_t{ci - c0} * 2 * page;
    const uint32_t last = c1 == n_chunks ? n_tok - (n_chunks - 1) * tpp : tpp;
    ns.kernel(ns.params, ws.ptrs.data(), c1 - c0, last, 0, qh, ws.o.data(), ws.st.data());
    for (uint32_t k = 0; k < g; ++k)
      merge_state(acc_s[k], acc_o + uint64_t{k} * d, ws.st[k], ws.o.data() + uint64_t{k} * d, d);
  }
  if (!s.ok()) (void)ws.reader->wait_all();
  return s;
}

// Merge each (item, head)'s partials in token order, normalise, write out and lse.
void attend_engine::merge_dense(const kv_namespace& ns, const command& c, const dense_plan& plan, const float* part_o,
                                const softmax_stats* part_s) {
  const uint32_t g = ns.cfg.group_size, d = ns.cfg.head_dim, heads = ns.cfg.n_kv_heads, hq = ns.q_heads();
  std::vector<float> o_acc(uint64_t{g} * d);
  std::vector<softmax_stats> s_acc(g);
  for (uint32_t i = 0; i < c.n_items(); ++i)
    for (uint32_t h = 0; h < heads; ++h) {
      std::fill(s_acc.begin(), s_acc.end(), softmax_stats{});
      std::fill(o_acc.begin(), o_acc.end(), 0.0f);
      const uint64_t pair = uint64_t{i} * heads + h;
      for (uint32_t ti = plan.first_task[pair]; ti < plan.first_task[pair + 1]; ++ti)
        for (uint32_t k = 0; k < g; ++k)
          merge_state(s_acc[k], o_acc.data() + uint64_t{k} * d, part_s[uint64_t{ti} * g + k],
                      part_o + (uint64_t{ti} * g + k) * d, d);
      for (uint32_t k = 0; k < g; ++k) {
        normalize_state(s_acc[k], o_acc.data() + uint64_t{k} * d, d);
        const uint64_t qh = uint64_t{i} * hq + uint64_t{h} * g + k;
        std::memcpy(c.out + qh * d, o_acc.data() + uint64_t{k} * d, uint64_t{d} * 4);
        c.lse[qh] = state_lse(s_acc[k]);
      }
    }
}

// ==== attend sparse (SparF next to the flash) ====================================================
// Per (item, kv head) task, on the drive's cores: choose the channel groups from q, read only
// those column pages (the tail's from DRAM), select tokens, read only the K and V pages of this
// head that hold selected tokens, then the exact attention over them (attention/sparf.hpp, the
// same code the host runs). Modelled flash time: the column reads, then the token reads.

struct attend_engine::sparse_shared {
  std::vector<sparf_plan> plans;                            // per item
  std::vector<std::vector<uint32_t>> item_blocks;           // per item: its column blocks
  std::vector<const kv_namespace::column_tail*> item_tail;  // per item: its tail, or null
  std::vector<float> v_mean;                                // [n_items][n_kv_heads][head_dim]
};
struct attend_engine::sparse_worker_out {
  sparf_counters counters;
  std::vector<uint32_t> col_ppns, tok_ppns;  // flash pages read, for the model
};

status attend_engine::attend_sparse(kv_namespace& ns, const sq_entry& e, const std::byte* data, std::byte* res,
                                    uint64_t& result_bytes) {
  const int64_t wall0 = wall_ns();
  if (!ns.sparf) return {errc::kUnsupported, "namespace " + std::to_string(ns.nsid) + " was created without SparF"};
  command c;
  INSTINFER_TRY(decode_command(ns, e, true, data, res, c));
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
  const double t_columns = ctx_.timeline.read_batch(total.col_ppns.data(), total.col_ppns.size(), ctx_.now_ns);
  ctx_.flash_done_at(t_columns);
  ctx_.flash_done_at(
      ctx_.timeline.read_batch(total.tok_ppns.data(), total.tok_ppns.size(), std::max(ctx_.now_ns, t_columns)));
  if (!s.ok()) return s;
  const sparf_wire_counters wc = encode_sparf_counters(total.counters);
  std::memcpy(c.counters, &wc, sizeof wc);
  result_bytes = c.wire.result_bytes;
  ++ctx_.stats.sparse_attends;
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
    std::fill(acc.begin(), acc.end(), 0.0);  // same order of additions as the host's sparf_index
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
                                 sparse_worker_out& total) {
  const uint32_t n_tasks = c.n_items() * ns.cfg.n_kv_heads;
  std::atomic<uint32_t> next{0};
  std::atomic<int64_t> cpu{0};
  std::mutex mu;  // total
  first_error error;
  auto worker = [&](uint32_t wid) noexcept {
    const int64_t cpu0 = thread_cpu_ns();
    worker_state& ws = workers_[wid];
    sparse_worker_out mine;
    status s = ensure_reader(ws, 4 * ctx_.o.pages_per_batch);
    while (s.ok()) try {
        const uint32_t ti = next.fetch_add(1, std::memory_order_relaxed);
        if (ti >= n_tasks) break;
        s = run_sparse_task(ns, c, sh, ti, ws, mine);
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

// One (item, kv head): choose channels, dual-step loading around the SparF calls.
status attend_engine::run_sparse_task(const kv_namespace& ns, const command& c, const sparse_shared& sh, uint32_t task,
                                      worker_state& ws, sparse_worker_out& mine) {
  const uint32_t hq = ns.q_heads(), d = ns.cfg.head_dim, G = ns.cfg.group_size, H = ns.cfg.n_kv_heads;
  const sparf_config& cfg = ns.sparf_one_head;
  const uint32_t ctp = cfg.columns.tokens_per_page;
  const bool whole_pages = c.sparf.whole_pages;
  const double spread = c.sparf.page_spread;
  const uint32_t i = task / H, h = task % H;
  const uint32_t n = c.items[i].n_tokens;
  const sparf_plan& plan = sh.plans[i];
  const uint32_t n_chunks = ns.chunks_for(n), n_cblocks = (n + ctp - 1) / ctp;
  const float* qh = c.q + (uint64_t{i} * hq + uint64_t{h} * G) * d;
  sparf_work w;
  w.n_tokens = n;
  w.n_chunks = n_chunks;
  w.n_column_blocks = n_cblocks;
  w.v_mean = sh.v_mean.data() + (uint64_t{i} * H + h) * d;
  w.q = qh;
  w.out = c.out + (uint64_t{i} * hq + uint64_t{h} * G) * d;
  w.lse = c.lse + uint64_t{i} * hq + uint64_t{h} * G;
  INSTINFER_TRY(ws.sparf.reserve(std::max(n, 1u), d, G, ctp));
  if (n == 0) {
    sparf_attend_head(cfg, plan, whole_pages, spread, w, 0, ws.sparf, mine.counters);
    return {};
  }
  ws.channels.resize(d);
  ws.weight.resize(d);
  ws.scratch.resize(d);
  const sparf_channel_choice choice =
      sparf_choose_channels(cfg, plan, whole_pages, qh, ws.channels.data(), ws.weight.data(), ws.scratch.data());
  // Step one: the chosen column pages of every column block (none when every token is kept:
  // sparf_attend_head then skips the approximate scores).
  const bool keep_all = plan.k >= n;
  INSTINFER_TRY(load_column_pages(ns, sh, i, h, n_cblocks, choice.n_channels, keep_all, ws, mine));
  w.column_blocks = ws.col_ptrs.data();
  ws.tok_ptrs.assign(n_chunks, nullptr);
  w.chunks = ws.tok_ptrs.data();
  ws.selected.resize(std::max(plan.k, 1u));
  uint32_t n_sel = 0;
  w.selected = ws.selected.data();
  w.n_selected = &n_sel;
  ws.alpha.resize(G);  // the group's query heads
  w.alpha = ws.alpha.data();
  sparf_attend_head(cfg, plan, whole_pages, spread, w, 0, ws.sparf, mine.counters, true);
  w.preselected = true;  // the exact pass below reuses this selection and alpha
  // Step two: the K and V pages of this head holding selected tokens.
  INSTINFER_TRY(load_token_pages(ns, *c.tabs[i], h, n_sel, ws, mine));
  sparf_attend_head(cfg, plan, whole_pages, spread, w, 0, ws.sparf, mine.counters);
  return {};
}

status attend_engine::load_column_pages(const kv_namespace& ns, const sparse_shared& sh, uint32_t item, uint32_t head,
                                        uint32_t n_column_blocks, uint32_t n_channels, bool keep_all, worker_state& ws,
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
                                       uint32_t n_selected, worker_state& ws, sparse_worker_out& mine) {
  const uint32_t tpp = ns.geo.tokens_per_page, H = ns.cfg.n_kv_heads;
  const uint64_t page = ns.geo.page_bytes;
  uint32_t n_need = 0;
  for (uint32_t j = 0; j < n_selected; ++j)
    if (j == 0 || ws.selected[j] / tpp != ws.selected[j - 1] / tpp) ++n_need;
  if (!reserve_aligned(ws.tok_stage, ws.tok_stage_bytes, std::max<uint64_t>(1, n_need) * 2 * page))
    return {errc::kOutOfMemory, "SparF token staging"};
  uint32_t slot = 0;
  status s;
  for (uint32_t j = 0; j < n_selected && s.ok(); ++j) {
    const uint32_t ci = ws.selected[j] / tpp;
    if (j > 0 && ws.selected[j - 1] / tpp == ci) continue;
    std::byte* dst = ws.tok_stage.get() + uint64_t{slot++} * 2 * page;
    ws.tok_ptrs[ci] = dst;
    const uint32_t id = tab[ci];
    if (const std::byte* src = ns.resident(id)) {
      std::memcpy(dst, src + uint64_t{head} * page, page);
      std::memcpy(dst + page, src + uint64_t{H + head} * page, page);
    } else {
      const uint32_t* pages = ns.pages(id);
      s = ws.reader->queue(pages[head], dst);
      if (s.ok()) s = ws.reader->queue(pages[H + head], dst + page);
      mine.tok_ppns.push_back(pages[head]);
      mine.tok_ppns.push_back(pages[H + head]);
    }
  }
  if (s.ok()) s = ws.reader->submit();
  if (s.ok()) s = ws.reader->wait_all();
  return s;
}

}  // namespace instinfer::csd
