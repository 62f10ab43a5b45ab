#include "sparf/page_summary_attender.hpp"

#include <algorithm>
#include <atomic>
#include <limits>
#include <new>
#include <span>
#include <string>
#include <thread>
#include <unordered_set>
#include <utility>

#include "instinfer/attention/sparf/exact.hpp"
#include "instinfer/attention/state.hpp"

namespace instinfer {

page_summary_attender::page_summary_attender(backend& b, const backend_config& config, const sparf_config& cfg)
    : backend_(b),
      config_(config),
      cfg_(cfg),
      block_floats_(page_summary_floats(config.shape.n_kv_heads, config.shape.head_dim)),
      pool_(config.pool ? config.pool
                        : std::make_shared<thread_pool>(std::min<uint32_t>(
                              config.n_threads ? config.n_threads : std::max(1u, std::thread::hardware_concurrency()),
                              std::max(1u, config.shape.n_kv_heads)))),
      worker_status_(attender_workers(*pool_, config.shape.n_kv_heads)),
      ws_(worker_status_.size()),
      exact_counters_(worker_status_.size()) {
  per_head_.group_size = cfg.group_size;
  per_head_.scale = cfg.scale;
  per_head_.softcap = cfg.softcap;
  per_head_.layout = chunk_layout::make(config.page, 1);  // a K page and a V page of one kv head
}

// ---- summaries ----------------------------------------------------------------------------------

void page_summary_attender::extend(layer_state& ls, uint32_t n, const std::byte* k) const {
  if (n == 0) return;
  const uint32_t tpp = config_.page.tokens_per_page, H = config_.shape.n_kv_heads, d = config_.shape.head_dim;
  const dtype t = config_.shape.kv_dtype;
  const size_t token_bytes = size_t{H} * dtype_row_bytes(t, d);
  const uint32_t first = ls.n_tokens, end = first + n;
  const uint32_t g0 = first / tpp, g_end = (end + tpp - 1) / tpp;
  std::vector<std::shared_ptr<const block>> fresh;
  fresh.reserve(g_end - g0);
  for (uint32_t g = g0; g < g_end; ++g) {
    // A partial group's block may be shared with a fork: fold into a copy, never in place.
    auto b = g < ls.groups.size() ? std::make_shared<block>(*ls.groups[g]) : std::make_shared<block>(block_floats_);
    if (g >= ls.groups.size()) page_summary_clear(b->data(), H, d);
    const uint32_t from = std::max(first, g * tpp), to = std::min(end, (g + 1) * tpp);
    page_summary_fold(b->data(), H, d, t, k + size_t{from - first} * token_bytes, to - from);
    fresh.push_back(std::move(b));
  }
  ls.groups.reserve(g_end);  // the last allocation: nothing below throws
  for (uint32_t g = g0; g < g_end; ++g) {
    if (g < ls.groups.size())
      ls.groups[g] = std::move(fresh[g - g0]);
    else
      ls.groups.push_back(std::move(fresh[g - g0]));
  }
  ls.n_tokens = end;
}

status page_summary_attender::on_append(seq_id seq, uint32_t layer, uint32_t first, uint32_t n, const std::byte* k,
                                        const std::byte*) noexcept {
  try {
    auto& layers = seqs_[seq];
    if (layers.empty()) layers.resize(config_.shape.n_layers);
    layer_state& ls = layers[layer];
    if (first != ls.n_tokens)
      return {errc::kInternal, "page summaries of sequence " + std::to_string(seq) + " layer " + std::to_string(layer) +
                                   " hold " + std::to_string(ls.n_tokens) + " tokens, an append starts at " +
                                   std::to_string(first)};
    undo_.valid = false;
    const uint32_t g0 = first / config_.page.tokens_per_page;
    std::shared_ptr<const block> tail = g0 < ls.groups.size() ? ls.groups[g0] : nullptr;
    extend(ls, n, k);
    undo_ = append_undo{seq, layer, first, g0 + size_t{tail != nullptr}, std::move(tail), true};
  } catch (const std::bad_alloc&) {
    return {errc::kOutOfMemory, "page summaries"};
  }
  return {};
}

void page_summary_attender::undo_last_append() noexcept {
  if (!undo_.valid) return;
  undo_.valid = false;
  auto found = seqs_.find(undo_.seq);
  if (found == seqs_.end()) return;
  layer_state& ls = found->second[undo_.layer];
  ls.groups.resize(undo_.n_groups);  // shrinks: no allocation
  if (undo_.tail) ls.groups.back() = std::move(undo_.tail);
  ls.n_tokens = undo_.n_tokens;
}

status page_summary_attender::on_fork(seq_id src, seq_id dst) noexcept {
  auto found = seqs_.find(src);
  if (found == seqs_.end()) return {};
  try {
    std::vector<layer_state> copy = found->second;  // shares every block
    seqs_[dst] = std::move(copy);
  } catch (const std::bad_alloc&) {
    return {errc::kOutOfMemory, "page summaries of a fork"};
  }
  return {};
}

status page_summary_attender::on_truncate(seq_id seq, uint32_t layer, uint32_t keep, const stored_rows_reader& old_rows,
                                          uint32_t n_suffix, const std::byte* suffix_k, const std::byte*) noexcept {
  const uint32_t tpp = config_.page.tokens_per_page;
  try {
    layer_state next;
    auto found = seqs_.find(seq);
    if (found != seqs_.end()) {
      const layer_state& cur = found->second[layer];
      if (keep > cur.n_tokens)
        return {errc::kInternal, "page summaries: truncation keeps " + std::to_string(keep) + " of " +
                                     std::to_string(cur.n_tokens) + " tokens"};
      const uint32_t whole = keep / tpp;
      next.groups.assign(cur.groups.begin(), cur.groups.begin() + whole);
      next.n_tokens = whole * tpp;
      if (keep % tpp != 0) {  // the new tail group: rebuilt from the rows it keeps
        std::vector<std::byte> k, v;
        INSTINFER_TRY(old_rows(whole * tpp, keep, k, v));
        extend(next, keep - whole * tpp, k.data());
      }
    } else if (keep != 0) {
      return {errc::kInternal,
              "page summaries: no state for a sequence that keeps " + std::to_string(keep) + " tokens"};
    }
    extend(next, n_suffix, suffix_k);
    auto& layers = seqs_[seq];  // allocated here, where failing is allowed, not at the commit
    if (layers.empty()) layers.resize(config_.shape.n_layers);
    auto& staged = staged_[seq];
    for (staged_layer& s : staged)
      if (s.layer == layer) {
        s.state = std::move(next);
        return {};
      }
    staged.push_back(staged_layer{layer, std::move(next)});
  } catch (const std::bad_alloc&) {
    return {errc::kOutOfMemory, "page summaries of a truncation"};
  }
  return {};
}

void page_summary_attender::on_truncate_end(seq_id seq, bool commit) noexcept {
  auto found = staged_.find(seq);
  if (found == staged_.end()) return;
  auto layers = seqs_.find(seq);  // on_truncate created the entry
  if (commit && layers != seqs_.end())
    for (staged_layer& s : found->second) layers->second[s.layer] = std::move(s.state);
  staged_.erase(found);
}

void page_summary_attender::on_free(seq_id seq) noexcept {
  seqs_.erase(seq);
  staged_.erase(seq);
}

uint64_t page_summary_attender::resident_bytes() const noexcept {
  try {
    std::unordered_set<const block*> seen;
    for (const auto& [seq, layers] : seqs_)
      for (const layer_state& ls : layers)
        for (const auto& b : ls.groups) seen.insert(b.get());
    return seen.size() * block_floats_ * sizeof(float);
  } catch (const std::bad_alloc&) {
    return 0;
  }
}

// ---- attend -------------------------------------------------------------------------------------

template <class F>
status page_summary_attender::for_each_head(F&& fn) noexcept {
  return for_each_kv_head(*pool_, worker_status_, config_.shape.n_kv_heads, std::forward<F>(fn));
}

status page_summary_attender::attend_sparse(uint32_t layer, const attend_batch& batch, const sparf_params& params,
                                            sparf_counters* counters) noexcept {
  const uint32_t d = config_.shape.head_dim, tpp = config_.page.tokens_per_page;
  try {
    for (const attend_item& it : batch) {  // every plan and summary first: nothing is written on a bad one
      auto plan = page_summary_resolve(params, d, tpp, it.n_tokens);
      if (!plan.ok())
        return {plan.error().code(), "sequence " + std::to_string(it.seq) + ": " + plan.error().message()};
      auto found = seqs_.find(it.seq);
      const uint32_t held = found == seqs_.end() ? 0 : found->second[layer].n_tokens;
      if (held != it.n_tokens)
        return {errc::kInternal, "page summaries of sequence " + std::to_string(it.seq) + " hold " +
                                     std::to_string(held) + " tokens, its page table " + std::to_string(it.n_tokens)};
    }
  } catch (const std::bad_alloc&) {
    return {errc::kOutOfMemory, "attend_sparse"};
  }
  if (!kernel_staged_) {
    auto b = select_decode_kernel(best_cpu_isa(), per_head_);
    if (!b.ok()) return b.error();
    auto c = ws_[0].kernel(sparf_exact_params(cfg_));
    if (!c.ok()) return c.error();
    auto s = ws_[0].page_summary_kernel();
    if (!s.ok()) return s.error();
    score_kernel_ = s.value();
    kernel_staged_ = b.value();
    exact_kernel_ = c.value();
  }
  sparf_counters total;
  for (const attend_item& it : batch) {
    auto found = seqs_.find(it.seq);
    const layer_state* ls = found == seqs_.end() ? nullptr : &found->second[layer];
    INSTINFER_TRY(attend_one(it, ls, page_summary_resolve(params, d, tpp, it.n_tokens).value(), total));
  }
  if (counters) counters->add(total);
  return {};
}

// One sequence: score and choose per kv head, bring the chosen pages in, exact pass per kv head.
status page_summary_attender::attend_one(const attend_item& it, const layer_state* ls, const page_summary_plan& plan,
                                         sparf_counters& c) noexcept {
  const kv_shape& shape = config_.shape;
  const uint32_t H = shape.n_kv_heads, G = shape.group_size(), d = shape.head_dim;
  const uint32_t W = static_cast<uint32_t>(worker_status_.size()), n_groups = plan.n_groups, n_sel = plan.n_select;
  const uint64_t row = config_.page.row_bytes();
  c.items += H;
  c.dense_pages += 2ull * H * n_groups;
  c.dense_bytes += 2ull * H * it.n_tokens * row;
  if (it.n_tokens == 0) {
    std::fill(it.out, it.out + size_t{shape.n_q_heads} * d, 0.0f);
    if (it.lse) std::fill(it.lse, it.lse + shape.n_q_heads, -std::numeric_limits<float>::infinity());
    return {};
  }
  try {
    sc_.scores.resize(size_t{H} * n_groups);
    sc_.group_ptrs.resize(n_groups);
    sc_.order.resize(size_t{W} * 2 * n_groups);  // page_summary_select's scratch: 2 x n_groups a worker
    sc_.chosen.resize(size_t{H} * n_sel);
    sc_.ptrs.resize(size_t{H} * n_sel);
    sc_.o.resize(size_t{W} * G * d);
    sc_.stats.resize(size_t{W} * G);
  } catch (const std::bad_alloc&) {
    return {errc::kOutOfMemory, "attend_sparse: host scratch"};
  }
  // Scores: runs of groups over the workers, every kv head of a block while it is in cache (a
  // block holds all heads: a pass per head would stride across them); then choose per kv head.
  for (uint32_t g = 0; g < n_groups; ++g) sc_.group_ptrs[g] = ls->groups[g]->data();
  const uint32_t n_runs = (n_groups + kScoreRunGroups - 1) / kScoreRunGroups;
  INSTINFER_TRY(for_each_kv_head(*pool_, worker_status_, n_runs, [&](uint32_t, uint32_t run) noexcept -> status {
    page_summary_score_args a;
    a.groups = sc_.group_ptrs.data();
    a.n_groups = n_groups;
    a.group_begin = run * kScoreRunGroups;
    a.group_end = std::min(n_groups, a.group_begin + kScoreRunGroups);
    a.kv_begin = 0;
    a.n_kv = H;
    a.head_dim = d;
    a.group_size = G;
    a.q = it.q;
    a.scores = sc_.scores.data();
    score_kernel_(a);
    return {};
  }));
  INSTINFER_TRY(for_each_head([&](uint32_t w, uint32_t h) noexcept -> status {
    page_summary_select(plan, sc_.scores.data() + size_t{h} * n_groups, sc_.order.data() + size_t{w} * 2 * n_groups,
                        sc_.chosen.data() + size_t{h} * n_sel);
    return {};
  }));
  const bool in_place = !!backend_.host_view();
  bool whole_chunks = false;
  try {
    if (!in_place) {
      auto loaded = load_pages(it, plan);
      if (!loaded.ok()) return loaded.error();
      whole_chunks = loaded.value();
    }
  } catch (const std::bad_alloc&) {
    return {errc::kOutOfMemory, "attend_sparse: page staging"};
  }
  const uint32_t tpp = config_.page.tokens_per_page;
  const uint32_t tail_tokens = it.n_tokens - (n_groups - 1) * tpp;
  const bool chunks = in_place || whole_chunks;
  if (chunks) {
    try {
      for (sparf_workspace& ws : ws_) INSTINFER_TRY(ws.reserve(n_sel * tpp, d, G, cfg_.columns.tokens_per_page));
      sc_.tokens.resize(size_t{H} * n_sel * tpp);
      sc_.ones.assign(G, 1.0f);
      sc_.sequence_chunks.assign(n_groups, nullptr);
      if (in_place) {
        const host_chunk_view resident = backend_.host_view();
        for (uint32_t h = 0; h < H; ++h)
          for (uint32_t j = 0; j < n_sel; ++j) {
            const uint32_t g = sc_.chosen[size_t{h} * n_sel + j];
            sc_.sequence_chunks[g] = resident.chunk(it.chunks[g]);
          }
      } else {
        for (uint32_t h = 0; h < H; ++h)
          for (uint32_t j = 0; j < n_sel; ++j)
            sc_.sequence_chunks[sc_.chosen[size_t{h} * n_sel + j]] = sc_.ptrs[size_t{h} * n_sel + j];
      }
    } catch (const std::bad_alloc&) {
      return {errc::kOutOfMemory, "attend_sparse: host scratch"};
    }
  }
  INSTINFER_TRY(for_each_head([&](uint32_t w, uint32_t h) noexcept -> status {
    const uint32_t* chosen = sc_.chosen.data() + size_t{h} * n_sel;
    const float* q = it.q + size_t{h} * G * d;
    float* out = it.out + size_t{h} * G * d;
    float* lse = it.lse ? it.lse + size_t{h} * G : nullptr;
    if (chunks) {  // every token of the chosen groups, through SparF's exact pass with alpha = 1
      uint32_t* tokens = sc_.tokens.data() + size_t{h} * n_sel * tpp;
      uint32_t m = 0;
      for (uint32_t j = 0; j < n_sel; ++j) {
        const uint32_t end = chosen[j] == n_groups - 1 ? it.n_tokens : (chosen[j] + 1) * tpp;
        for (uint32_t t = chosen[j] * tpp; t < end; ++t) tokens[m++] = t;
      }
      return sparf_exact_head(cfg_, sparf_selection{tokens, m, sc_.ones.data()}, sc_.sequence_chunks.data(), nullptr, q,
                              out, lse, h, ws_[w], exact_counters_[w], exact_kernel_);
    }
    // Per-head pseudo-chunks, fresh in memory from read_pages: the kernel reads them in place.
    const uint32_t last = chosen[n_sel - 1] == n_groups - 1 ? tail_tokens : tpp;
    float* o = sc_.o.data() + size_t{w} * G * d;
    softmax_stats* st = sc_.stats.data() + size_t{w} * G;
    kernel_staged_(per_head_, sc_.ptrs.data() + size_t{h} * n_sel, n_sel, last, 0, q, o, st);
    write_normalized(st, o, G, d, out, lse);
    return {};
  }));
  const uint64_t tokens = uint64_t{H} * (n_sel - 1) * config_.page.tokens_per_page;
  uint64_t selected = tokens;  // each head's last chosen group may be the partial tail
  for (uint32_t h = 0; h < H; ++h)
    selected += sc_.chosen[size_t{h} * n_sel + n_sel - 1] == n_groups - 1 ? tail_tokens : config_.page.tokens_per_page;
  c.selected_tokens += selected;
  c.token_pages_read += 2ull * H * n_sel;
  c.token_bytes_used += 2ull * selected * row;
  return {};
}

// The chosen K and V pages of every kv head as one read_pages batch (the SSD sorts and merges
// it), into per-head pseudo-chunks [K page][V page]; where the backend answers kUnsupported,
// whole chunks, once each (returns true: the pointers are then cache chunks).
result<bool> page_summary_attender::load_pages(const attend_item& it, const page_summary_plan& plan) {
  const chunk_layout lay = config_.layout();
  const uint32_t H = config_.shape.n_kv_heads, n_sel = plan.n_select, tpp = lay.tokens();
  const uint64_t page = lay.page.page_bytes, pair = 2 * page;
  const auto in_chunk = [&](uint32_t g) { return std::min<uint32_t>(tpp, it.n_tokens - g * tpp); };
  if (sc_.staging.size() < size_t{H} * n_sel * pair) sc_.staging.resize(size_t{H} * n_sel * pair);
  sc_.reads.clear();
  sc_.reads.reserve(size_t{2} * H * n_sel);
  for (uint32_t h = 0; h < H; ++h)
    for (uint32_t j = 0; j < n_sel; ++j) {
      const uint32_t g = sc_.chosen[size_t{h} * n_sel + j];
      std::byte* dst = sc_.staging.data() + (size_t{h} * n_sel + j) * pair;
      sc_.ptrs[size_t{h} * n_sel + j] = dst;
      sc_.reads.push_back({it.chunks[g], in_chunk(g), lay.page_index(kv_kind::kKey, h), dst});
      sc_.reads.push_back({it.chunks[g], in_chunk(g), lay.page_index(kv_kind::kValue, h), dst + page});
    }
  status s = backend_.read_pages(sc_.reads);
  if (s.ok()) return false;
  if (s.code() != errc::kUnsupported) return s;
  // Whole chunks: each chosen chunk once, laid out as the cache's; ptrs point at them.
  sc_.chunk_slot.assign(plan.n_groups, UINT32_MAX);
  uint32_t n_needed = 0;
  for (uint32_t x : std::span(sc_.chosen.data(), size_t{H} * n_sel))
    if (sc_.chunk_slot[x] == UINT32_MAX) sc_.chunk_slot[x] = n_needed++;
  if (sc_.staging.size() < size_t{n_needed} * lay.chunk_bytes())
    sc_.staging.resize(size_t{n_needed} * lay.chunk_bytes());
  for (uint32_t g = 0; g < plan.n_groups; ++g)
    if (sc_.chunk_slot[g] != UINT32_MAX)
      INSTINFER_TRY(backend_.read_chunk(it.chunks[g], in_chunk(g),
                                        sc_.staging.data() + size_t{sc_.chunk_slot[g]} * lay.chunk_bytes()));
  for (size_t j = 0; j < size_t{H} * n_sel; ++j)
    sc_.ptrs[j] = sc_.staging.data() + size_t{sc_.chunk_slot[sc_.chosen[j]]} * lay.chunk_bytes();
  return true;
}

}  // namespace instinfer
