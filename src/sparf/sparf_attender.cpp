#include "sparf/sparf_attender.hpp"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <new>
#include <string>
#include <thread>
#include <utility>

#include "instinfer/attention/sparf/exact.hpp"

namespace instinfer {

sparf_attender::sparf_attender(backend& b, const backend_config& config, const sparf_config& sparf)
    : backend_(b),
      config_(config),
      cfg_(sparf),
      store_columns_(!b.host_view()),
      pool_(config.pool ? config.pool
                        : std::make_shared<thread_pool>(std::min<uint32_t>(
                              config.n_threads ? config.n_threads : std::max(1u, std::thread::hardware_concurrency()),
                              std::max(1u, config.shape.n_kv_heads)))),
      ws_(attender_workers(*pool_, config.shape.n_kv_heads)),
      worker_counters_(ws_.size()),
      worker_status_(ws_.size()) {}

sparf_attender::~sparf_attender() {
  for (auto& [seq, staged] : staged_)
    for (staged_layer& s : staged) release(s.state.column_chunks);
  for (auto& [seq, layers] : seqs_)
    for (layer_state& ls : layers) release(ls.column_chunks);
}

// ---- column chunk references --------------------------------------------------------------------

status sparf_attender::track(chunk_id id) noexcept {
  if (id == kInvalidChunk) return {errc::kInternal, "backend returned an invalid chunk id"};
  if (column_refs_.size() > id) return {};
  try {
    column_refs_.resize(std::max<size_t>(size_t{id} + 1, column_refs_.size() * 2), 0);
  } catch (const std::bad_alloc&) {
    return {errc::kOutOfMemory, "SparF column chunk references"};
  }
  return {};
}

void sparf_attender::retain(const std::vector<chunk_id>& ids) noexcept {
  for (chunk_id id : ids) ++column_refs_[id];
}

void sparf_attender::release(std::vector<chunk_id>& ids) noexcept {
  for (chunk_id id : ids)
    if (--column_refs_[id] == 0) backend_.release_chunk(id);
  ids.clear();
}

uint32_t sparf_attender::column_store_chunks() const noexcept {
  const uint32_t per_chunk = config_.layout().pages_per_chunk();
  return (cfg_.columns.pages_per_block() + per_chunk - 1) / per_chunk;
}

// ---- observer calls -----------------------------------------------------------------------------

status sparf_attender::append_rows(seq_id seq, uint32_t layer, layer_state& ls, uint32_t n, const std::byte* k,
                                   const std::byte* v) noexcept {
  if (!ls.live) {
    auto index = channel_index::create(cfg_.columns);
    if (!index.ok()) return index.error();
    ls.index = std::move(index).value();
    ls.live = true;
  }
  INSTINFER_TRY(ls.index.append(n, k, v));
  store_sealed_columns(seq, layer, ls);
  return {};
}

status sparf_attender::on_append(seq_id seq, uint32_t layer, uint32_t first, uint32_t n, const std::byte* k,
                                 const std::byte* v) noexcept {
  try {
    std::vector<layer_state>& layers = seqs_[seq];
    if (layers.empty()) layers.resize(config_.shape.n_layers);
    layer_state& ls = layers[layer];
    if ((ls.live ? ls.index.n_tokens() : 0) != first)
      return {errc::kInternal, "SparF index of sequence " + std::to_string(seq) + " is out of step with its pages"};
    return append_rows(seq, layer, ls, n, k, v);
  } catch (const std::bad_alloc&) {
    return {errc::kOutOfMemory, "SparF index"};
  }
}

status sparf_attender::on_fork(seq_id src, seq_id dst) noexcept {
  auto it = seqs_.find(src);
  if (it == seqs_.end()) return {};
  try {
    std::vector<layer_state> copy = it->second;  // sealed stored blocks stay shared
    for (layer_state& ls : copy) {
      retain(ls.column_chunks);
      ls.reuse = reuse_cache{};
    }
    seqs_.emplace(dst, std::move(copy));
  } catch (const std::bad_alloc&) {
    return {errc::kOutOfMemory, "SparF index copy"};
  }
  return {};
}

status sparf_attender::on_truncate(seq_id seq, uint32_t layer, uint32_t keep, const stored_rows_reader& old_rows,
                                   uint32_t n_suffix, const std::byte* suffix_k, const std::byte* suffix_v) noexcept {
  auto it = seqs_.find(seq);
  if (it == seqs_.end() || !it->second[layer].live) return {};
  const layer_state& from = it->second[layer];
  const uint32_t block = cfg_.columns.tokens_per_page;
  try {
    staged_layer staged{layer, from};
    layer_state& to = staged.state;
    to.reuse = reuse_cache{};
    to.column_chunks.clear();  // only the blocks wholly before `keep` stay shared
    // The index keeps the first `keep` tokens; its new tail block needs the rows it holds.
    std::vector<std::byte> tail_k, tail_v;
    if (keep % block != 0) INSTINFER_TRY(old_rows(keep - keep % block, keep, tail_k, tail_v));
    INSTINFER_TRY(
        to.index.truncate(keep, keep % block ? tail_v.data() : nullptr, keep % block ? tail_k.data() : nullptr));
    const size_t keep_blocks = std::min<size_t>(keep / block, from.column_chunks.size() / column_store_chunks());
    to.column_chunks.assign(from.column_chunks.begin(),
                            from.column_chunks.begin() + static_cast<ptrdiff_t>(keep_blocks * column_store_chunks()));
    retain(to.column_chunks);
    std::vector<staged_layer>& list = staged_[seq];
    list.reserve(list.size() + 1);
    if (n_suffix > 0) {
      if (status s = append_rows(seq, layer, to, n_suffix, suffix_k, suffix_v); !s.ok()) {
        release(to.column_chunks);
        return s;
      }
    }
    list.push_back(std::move(staged));
  } catch (const std::bad_alloc&) {
    return {errc::kOutOfMemory, "SparF index truncation"};
  }
  return {};
}

void sparf_attender::on_truncate_end(seq_id seq, bool commit) noexcept {
  auto it = staged_.find(seq);
  if (it == staged_.end()) return;
  auto live = seqs_.find(seq);
  for (staged_layer& s : it->second) {
    if (commit && live != seqs_.end()) {
      layer_state& ls = live->second[s.layer];
      release(ls.column_chunks);
      ls = std::move(s.state);
    } else {
      release(s.state.column_chunks);
    }
  }
  staged_.erase(it);
}

void sparf_attender::on_free(seq_id seq) noexcept {
  on_truncate_end(seq, false);
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return;
  for (layer_state& ls : it->second) release(ls.column_chunks);
  seqs_.erase(it);
}

// SparF on a storage backend: sealed column blocks go to the device as whole chunks (the column
// pages packed into chunk pages), the index keeps the tail block and the V sums. Best effort: a
// block that cannot be stored now stays in memory and is tried again on the next append.
void sparf_attender::store_sealed_columns(seq_id seq, uint32_t layer, layer_state& ls) noexcept {
  if (!store_columns_ || !ls.live) return;
  const channel_layout& cl = cfg_.columns;
  const chunk_layout lay = config_.layout();
  const uint32_t per_block = column_store_chunks();
  const uint32_t tpp = lay.tokens(), H = config_.shape.n_kv_heads;
  const uint64_t row = lay.page.row_bytes(), page = lay.page.page_bytes;
  // A store that takes whole chunks gets the column pages as they are; otherwise they go as token
  // rows, which fill a page only for the dense dtypes (make_sparf_attender refuses the rest).
  const bool whole = backend_.writes_whole_chunks();
  try {
    std::vector<std::byte> k(whole ? lay.chunk_bytes() : uint64_t{tpp} * H * row), v(whole ? 0 : k.size());
    for (uint32_t b = static_cast<uint32_t>(ls.column_chunks.size() / per_block); b < ls.index.sealed_blocks(); ++b) {
      const std::byte* blk = ls.index.block(b);
      if (blk == nullptr) break;
      std::vector<chunk_id> ids;
      status s;
      for (uint32_t j = 0; j < per_block && s.ok(); ++j) {
        // Chunk page P holds column page j * 2H + P: as token rows, K page h = rows of head h.
        std::fill(k.begin(), k.end(), std::byte{0});
        std::fill(v.begin(), v.end(), std::byte{0});
        for (uint32_t p = 0; p < 2 * H; ++p) {
          const uint64_t cp = uint64_t{j} * 2 * H + p;
          if (cp >= cl.pages_per_block()) break;
          if (whole) {
            std::memcpy(k.data() + uint64_t{p} * page, blk + cp * page, page);
            continue;
          }
          std::byte* dst = p < H ? k.data() : v.data();
          for (uint32_t r = 0; r < tpp; ++r)
            std::memcpy(dst + (uint64_t{r} * H + p % H) * row, blk + cp * page + uint64_t{r} * row, row);
        }
        const chunk_hint hint{seq, layer, static_cast<uint32_t>(ls.column_chunks.size() + j), chunk_stream::kColumns};
        auto id = backend_.allocate_chunk(hint);
        if (!id.ok()) break;
        s = track(id.value());
        if (s.ok())
          s = whole ? backend_.write_chunk(id.value(), hint, k.data())
                    : backend_.write_tokens(id.value(), hint, 0, tpp, k.data(), v.data());
        if (!s.ok()) {
          backend_.release_chunk(id.value());
          break;
        }
        ids.push_back(id.value());
      }
      if (ids.size() != per_block) {
        for (chunk_id id : ids) backend_.release_chunk(id);
        return;
      }
      for (chunk_id id : ids) {
        column_refs_[id] = 1;
        ls.column_chunks.push_back(id);
      }
      ls.index.drop_block_memory(b);
    }
  } catch (const std::bad_alloc&) {
  }
}

uint64_t sparf_attender::resident_bytes() const noexcept {
  uint64_t bytes = 0;
  for (const auto& [seq, layers] : seqs_)
    for (const layer_state& ls : layers) bytes += ls.index.resident_bytes();
  return bytes;
}

// ---- attend -------------------------------------------------------------------------------------

status sparf_attender::attend_sparse(uint32_t layer, const attend_batch& batch, const sparf_params& params,
                                     sparf_counters* counters) noexcept {
  try {
    for (const attend_item& it : batch)  // every plan first: nothing is written on a bad one
      if (auto plan = sparf_resolve(params, config_.shape.head_dim, it.n_tokens); !plan.ok())
        return {plan.error().code(), "sequence " + std::to_string(it.seq) + ": " + plan.error().message()};
  } catch (const std::bad_alloc&) {
    return {errc::kOutOfMemory, "attend_sparse"};
  }
  auto kernel = ws_[0].kernel(sparf_exact_params(cfg_));
  if (!kernel.ok()) return kernel.error();
  for (sparf_counters& c : worker_counters_) c = sparf_counters{};
  for (const attend_item& it : batch) {
    auto found = seqs_.find(it.seq);
    layer_state* ls = found != seqs_.end() && found->second[layer].live ? &found->second[layer] : nullptr;
    const sparf_plan plan = sparf_resolve(params, config_.shape.head_dim, it.n_tokens).value();
    INSTINFER_TRY(attend_one(it, ls, plan, params, kernel.value()));
  }
  if (counters)
    for (const sparf_counters& c : worker_counters_) counters->add(c);
  return {};
}

template <class F>
status sparf_attender::for_each_head(F&& fn) noexcept {
  return for_each_kv_head(*pool_, worker_status_, config_.shape.n_kv_heads, std::forward<F>(fn));
}

// ---- selection reuse (sparf_params::reuse_min_cosine) -------------------------------------------

bool sparf_attender::reusable(const layer_state& ls, const attend_item& it, const sparf_params& params) const noexcept {
  const reuse_cache& rc = ls.reuse;
  if (!rc.valid || rc.uses >= params.reuse_max_steps || it.n_tokens < rc.n_at || !params.same_selection(rc.params))
    return false;
  const size_t group = size_t{config_.shape.group_size()} * config_.shape.head_dim;
  for (uint32_t h = 0; h < config_.shape.n_kv_heads; ++h) {  // every kv head's query group
    const float* a = it.q + h * group;
    const float* b = rc.q.data() + h * group;
    double ab = 0.0, aa = 0.0, bb = 0.0;
    for (size_t i = 0; i < group; ++i) {
      ab += double{a[i]} * b[i];
      aa += double{a[i]} * a[i];
      bb += double{b[i]} * b[i];
    }
    // NaN (a zero or non-finite query) compares false: a fresh selection.
    if (!(ab >= params.reuse_min_cosine * std::sqrt(aa * bb)) || aa == 0.0) return false;
  }
  return true;
}

// The kept tokens of every kv head, then the ones appended since (all of them, exactly), with the
// kept alphas. Counted like a selection that read no column pages.
void sparf_attender::reuse_selections(layer_state& ls, const attend_item& it) {
  reuse_cache& rc = ls.reuse;
  const uint32_t H = config_.shape.n_kv_heads, G = config_.shape.group_size(), n = it.n_tokens;
  const uint32_t fresh = n - rc.n_at;
  sc_.reused.resize(rc.tokens.size() + size_t{H} * fresh);
  sparf_counters& c = worker_counters_[0];
  uint32_t* out = sc_.reused.data();
  for (uint32_t h = 0; h < H; ++h) {
    const uint32_t kept = rc.first[h + 1] - rc.first[h];
    std::copy(rc.tokens.begin() + rc.first[h], rc.tokens.begin() + rc.first[h + 1], out);
    for (uint32_t t = 0; t < fresh; ++t) out[kept + t] = rc.n_at + t;
    sc_.selections[h] = sparf_selection{out, kept + fresh, rc.alpha.data() + size_t{h} * G};
    out += kept + fresh;
    ++c.items;
    c.dense_pages += 2ull * it.chunks.size();
    c.dense_bytes += 2ull * n * cfg_.tokens.page.row_bytes();
    c.selected_tokens += kept + fresh;
  }
  ++rc.uses;
  ++reused_;
}

void sparf_attender::keep_selections(layer_state& ls, const attend_item& it, const sparf_params& params) {
  reuse_cache& rc = ls.reuse;
  const kv_shape& shape = config_.shape;
  const uint32_t H = shape.n_kv_heads, G = shape.group_size();
  rc.valid = false;
  rc.q.assign(it.q, it.q + size_t{shape.n_q_heads} * shape.head_dim);
  rc.first.assign(size_t{H} + 1, 0);
  rc.tokens.clear();
  rc.alpha.resize(shape.n_q_heads);
  for (uint32_t h = 0; h < H; ++h) {
    const sparf_selection& sel = sc_.selections[h];
    rc.tokens.insert(rc.tokens.end(), sel.tokens, sel.tokens + sel.n);
    rc.first[h + 1] = static_cast<uint32_t>(rc.tokens.size());
    std::copy(sel.alpha, sel.alpha + G, rc.alpha.begin() + size_t{h} * G);
  }
  rc.params = params;
  rc.n_at = it.n_tokens;
  rc.uses = 0;
  rc.valid = true;
}

// One sequence: select per kv head (or reuse the kept selection), fetch just the pages holding
// selected tokens, exact pass. Both compute steps run a kv head per work item on the pool.
status sparf_attender::attend_one(const attend_item& it, layer_state* ls, const sparf_plan& plan,
                                  const sparf_params& params, decode_chunks_fn kernel) noexcept {
  const kv_shape& shape = config_.shape;
  const uint32_t H = shape.n_kv_heads, G = shape.group_size(), d = shape.head_dim;
  const uint32_t n = it.n_tokens, n_chunks = static_cast<uint32_t>(it.chunks.size());
  try {
    const uint32_t k_stride = std::max<uint32_t>(plan.k, 1);
    sc_.selected.resize(size_t{H} * k_stride);
    sc_.alpha.resize(shape.n_q_heads);
    sc_.selections.assign(H, sparf_selection{});
    if (ls == nullptr) sc_.zero_mean.assign(size_t{H} * d, 0.0f);  // an empty layer
    const float* v_mean = ls ? ls->index.v_mean() : sc_.zero_mean.data();
    for (sparf_workspace& ws : ws_) INSTINFER_TRY(ws.reserve(n, d, G, cfg_.columns.tokens_per_page));
    const host_chunk_view resident = backend_.host_view();
    const bool reuse = n > 0 && params.reuses() && ls != nullptr;
    if (ls != nullptr && !params.reuses()) ls->reuse.valid = false;  // a call without reuse ends it
    if (reuse && reusable(*ls, it, params)) {                        // steps 1-3 skipped: the kept selection
      reuse_selections(*ls, it);
    } else if (n > 0 && resident && ls->column_chunks.empty()) {
      // Everything in memory: each kv head's selection and exact pass as one work item (one pool
      // run per sequence, no barrier between the steps); the pages are read in place.
      sc_.ptrs.resize(n_chunks);
      for (uint32_t c = 0; c < n_chunks; ++c) sc_.ptrs[c] = resident.chunk(it.chunks[c]);
      const sparf_columns cols{ls->index.block_pointers(), nullptr, ls->index.n_blocks()};
      status s = for_each_head([&](uint32_t w, uint32_t h) noexcept -> status {
        const sparf_selection sel = sparf_select_head(
            cfg_, plan, params, cols, n, n_chunks, it.q + size_t{h} * G * d, h, ws_[w], worker_counters_[w],
            sc_.selected.data() + size_t{h} * k_stride, sc_.alpha.data() + size_t{h} * G);
        if (sel.n == 0) return {errc::kInternal, "SparF: no score kernel for this column dtype and ISA"};
        sc_.selections[h] = sel;  // kept for reuse
        return sparf_exact_head(cfg_, sel, sc_.ptrs.data(), v_mean + size_t{h} * d, it.q + size_t{h} * G * d,
                                it.out + size_t{h} * G * d, it.lse ? it.lse + size_t{h} * G : nullptr, h, ws_[w],
                                worker_counters_[w], kernel);
      });
      if (s.ok() && reuse) keep_selections(*ls, it, params);
      return s;
    } else if (n > 0) {  // steps 1-3, per kv head
      sparf_columns cols{ls->index.block_pointers(), nullptr, ls->index.n_blocks()};
      if (!ls->column_chunks.empty()) {
        INSTINFER_TRY(fetch_column_pages(*ls, plan, params, it.q));
        cols = sparf_columns{nullptr, sc_.column_pages.data(), ls->index.n_blocks()};
      }
      INSTINFER_TRY(for_each_head([&](uint32_t w, uint32_t h) noexcept -> status {
        sc_.selections[h] = sparf_select_head(cfg_, plan, params, cols, n, n_chunks, it.q + size_t{h} * G * d, h,
                                              ws_[w], worker_counters_[w], sc_.selected.data() + size_t{h} * k_stride,
                                              sc_.alpha.data() + size_t{h} * G);
        if (sc_.selections[h].n == 0 && n > 0)
          return {errc::kInternal, "SparF: no score kernel for this column dtype and ISA"};
        return {};
      }));
      if (reuse) keep_selections(*ls, it, params);
    }
    INSTINFER_TRY(load_token_pages(it));
    INSTINFER_TRY(for_each_head([&](uint32_t w, uint32_t h) noexcept -> status {  // step 4
      return sparf_exact_head(cfg_, sc_.selections[h], sc_.ptrs.data(), v_mean + size_t{h} * d,
                              it.q + size_t{h} * G * d, it.out + size_t{h} * G * d,
                              it.lse ? it.lse + size_t{h} * G : nullptr, h, ws_[w], worker_counters_[w], kernel);
    }));
  } catch (const std::bad_alloc&) {
    return {errc::kOutOfMemory, "attend_sparse: host scratch"};
  }
  return {};
}

// Dual-step loading, step two: the K and V pages of the kv heads whose selected tokens lie in a
// chunk; in place on host-addressable backends, else staged. sc_.ptrs := one pointer per chunk.
status sparf_attender::load_token_pages(const attend_item& it) {
  const chunk_layout lay = config_.layout();
  const uint32_t H = config_.shape.n_kv_heads;
  const size_t n_chunks = it.chunks.size();
  sc_.ptrs.assign(n_chunks, nullptr);
  sc_.head_needs.assign(n_chunks * H, 0);
  sc_.slot.assign(n_chunks, UINT32_MAX);  // staging slot of a needed chunk
  uint32_t n_needed = 0;
  for (uint32_t h = 0; h < H; ++h) {
    const sparf_selection& sel = sc_.selections[h];
    for (uint32_t j = 0; j < sel.n; ++j) {
      const uint32_t c = sel.tokens[j] / lay.tokens();
      if (c >= n_chunks) continue;
      sc_.head_needs[size_t{c} * H + h] = 1;
      if (sc_.slot[c] == UINT32_MAX) sc_.slot[c] = n_needed++;
    }
  }
  if (const host_chunk_view resident = backend_.host_view()) {
    for (size_t c = 0; c < n_chunks; ++c)
      if (sc_.slot[c] != UINT32_MAX) sc_.ptrs[c] = resident.chunk(it.chunks[c]);
    return {};
  }
  if (n_needed == 0) return {};
  if (sc_.token_staging.size() < n_needed * lay.chunk_bytes()) sc_.token_staging.resize(n_needed * lay.chunk_bytes());
  const auto in_chunk = [&](size_t c) {
    return std::min<uint32_t>(lay.tokens(), it.n_tokens - static_cast<uint32_t>(c) * lay.tokens());
  };
  sc_.reads.clear();
  for (size_t c = 0; c < n_chunks; ++c) {
    if (sc_.slot[c] == UINT32_MAX) continue;
    std::byte* dst = sc_.token_staging.data() + size_t{sc_.slot[c]} * lay.chunk_bytes();
    sc_.ptrs[c] = dst;
    for (uint32_t h = 0; h < H; ++h)
      if (sc_.head_needs[c * H + h])
        for (kv_kind kind : {kv_kind::kKey, kv_kind::kValue})
          sc_.reads.push_back({it.chunks[c], in_chunk(c), lay.page_index(kind, h), dst + lay.page_offset(kind, h)});
  }
  status s = backend_.read_pages(sc_.reads);
  if (s.code() != errc::kUnsupported) return s;
  for (size_t c = 0; c < n_chunks; ++c)  // whole chunks, then
    if (sc_.slot[c] != UINT32_MAX)
      INSTINFER_TRY(backend_.read_chunk(it.chunks[c], in_chunk(c),
                                        sc_.token_staging.data() + size_t{sc_.slot[c]} * lay.chunk_bytes()));
  return {};
}

// Dual-step loading, step one, for column blocks stored on the device: per kv head, only the
// column pages of the channels SparF will choose (sparf_choose_channels, the selection's own step
// one), read as one batch; resident blocks (the tail, blocks not stored yet) are used in place.
// sc_.column_pages := one pointer per column page of every block. Keep-all plans read nothing.
status sparf_attender::fetch_column_pages(const layer_state& ls, const sparf_plan& plan, const sparf_params& params,
                                          const float* q) {
  const channel_layout& cl = cfg_.columns;
  const chunk_layout lay = config_.layout();
  const uint32_t ppb = cl.pages_per_block(), per_block = column_store_chunks(), per_chunk = lay.pages_per_chunk();
  const uint32_t H = config_.shape.n_kv_heads, d = config_.shape.head_dim, G = config_.shape.group_size();
  const uint64_t page = lay.page.page_bytes;
  const uint32_t n_blocks = ls.index.n_blocks();
  const uint32_t stored = static_cast<uint32_t>(ls.column_chunks.size() / per_block);
  std::vector<const std::byte*>& pages = sc_.column_pages;
  std::vector<page_read>& reads = sc_.column_reads;
  reads.clear();
  sc_.channels.resize(d);
  sc_.weight.resize(d);
  sc_.channel_scratch.resize(d);
  pages.assign(size_t{n_blocks} * ppb, nullptr);
  for (uint32_t b = 0; b < n_blocks; ++b)
    if (const std::byte* blk = ls.index.block(b))
      for (uint32_t p = 0; p < ppb; ++p) pages[size_t{b} * ppb + p] = blk + p * page;
  if (plan.k >= plan.n_tokens || stored == 0) return {};
  std::vector<uint32_t>& chosen = sc_.chosen;  // column page indices inside a block
  chosen.clear();
  for (uint32_t h = 0; h < H; ++h) {
    const sparf_channel_choice c =
        sparf_choose_channels(cfg_, plan, params.whole_pages, q + size_t{h} * G * d, sc_.channels.data(),
                              sc_.weight.data(), sc_.channel_scratch.data());
    for (uint32_t j = 0; j < c.n_channels; ++j)
      if (j == 0 || cl.group_of(sc_.channels[j]) != cl.group_of(sc_.channels[j - 1]))
        chosen.push_back(cl.page_index(h, cl.group_of(sc_.channels[j])));
  }
  const size_t need = size_t{stored} * chosen.size() * page;
  if (sc_.column_staging.size() < need) sc_.column_staging.resize(need);
  std::byte* dst = sc_.column_staging.data();
  for (uint32_t b = 0; b < stored; ++b)
    for (uint32_t p : chosen) {
      const chunk_id id = ls.column_chunks[size_t{b} * per_block + p / per_chunk];
      reads.push_back({id, lay.tokens(), p % per_chunk, dst});
      pages[size_t{b} * ppb + p] = dst;
      dst += page;
    }
  status s = backend_.read_pages(reads);
  if (s.code() != errc::kUnsupported) return s;
  // Whole chunks, then: each stored chunk read once, its chosen pages copied out.
  if (sc_.token_staging.size() < lay.chunk_bytes()) sc_.token_staging.resize(lay.chunk_bytes());
  chunk_id loaded = kInvalidChunk;
  for (const page_read& r : reads) {  // grouped by chunk: built block by block, page by page
    if (r.chunk != loaded) {
      INSTINFER_TRY(backend_.read_chunk(r.chunk, r.n_tokens, sc_.token_staging.data()));
      loaded = r.chunk;
    }
    std::memcpy(r.dst, sc_.token_staging.data() + uint64_t{r.page} * page, page);
  }
  return {};
}

}  // namespace instinfer
