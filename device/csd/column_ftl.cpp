#include "column_ftl.hpp"

#include <algorithm>
#include <cstring>
#include <string>

#include "instinfer/core/dtype.hpp"

namespace instinfer::csd {

void column_ftl::drop_block(kv_namespace& ns, uint32_t b) noexcept {
  kv_namespace::column_block& cb = ns.cblocks[b];
  if (!cb.live) return;
  for (uint32_t p : cb.pages) ctx_.blocks.invalidate(p);
  for (uint32_t c : cb.chunks) {
    auto it = ns.cblocks_of_chunk.find(c);
    if (it == ns.cblocks_of_chunk.end()) continue;
    std::vector<uint32_t>& v = it->second;
    v.erase(std::remove(v.begin(), v.end(), b), v.end());
    if (v.empty()) ns.cblocks_of_chunk.erase(it);
  }
  cb.live = false;
  ns.free_cblocks.push_back(b);  // capacity reserved when the block was created: cannot throw
  --ctx_.stats.column_blocks;
}

void column_ftl::chunk_reset(kv_namespace& ns, uint32_t chunk) noexcept {
  ++ns.gen[chunk - ns.base];
  for (auto it = ns.cblocks_of_chunk.find(chunk); it != ns.cblocks_of_chunk.end(); it = ns.cblocks_of_chunk.find(chunk))
    drop_block(ns, it->second.back());
}

void column_ftl::forget_tail(kv_namespace& ns, uint64_t seq, uint32_t layer) noexcept {
  if (auto it = ns.tails.find(seq_layer_key{seq, layer}); it != ns.tails.end()) it->second.valid = false;
}

void column_ftl::drop_sequence(kv_namespace& ns, uint64_t seq) noexcept {
  for (uint32_t l = 0; l < ns.cfg.n_layers; ++l)
    if (auto t = ns.tails.find(seq_layer_key{seq, l}); t != ns.tails.end()) {
      if (t->second.k) ns.tail_bytes -= ns.columns.block_bytes();
      ns.tails.erase(t);
    }
}

column_ftl::chunk_run column_ftl::run_of(const kv_namespace& ns, uint64_t first, uint32_t n) noexcept {
  const uint32_t tpp = ns.geo.tokens_per_page;
  chunk_run r;
  r.first_index = static_cast<uint32_t>(first / tpp);
  r.offset = static_cast<uint32_t>(first % tpp);
  r.count = static_cast<uint32_t>((uint64_t{r.offset} + n + tpp - 1) / tpp);
  return r;
}

// The live column block built from exactly this run of chunks (current generations, same first
// row), or UINT32_MAX.
uint32_t column_ftl::find_block(const kv_namespace& ns, const uint32_t* chunks, const chunk_run& run) noexcept {
  auto it = ns.cblocks_of_chunk.find(chunks[0]);
  if (it == ns.cblocks_of_chunk.end()) return UINT32_MAX;
  for (uint32_t b : it->second) {
    const kv_namespace::column_block& cb = ns.cblocks[b];
    bool same = cb.live && cb.offset == run.offset && cb.chunks.size() == run.count;
    for (uint32_t j = 0; same && j < run.count; ++j)
      same = cb.chunks[j] == chunks[j] && cb.gens[j] == gen_of(ns, chunks[j]);
    if (same) return b;
  }
  return UINT32_MAX;
}

// Program one column block (`src`: channel_layout order) built from `chunks` and register it. Its
// pages of one head go to consecutive lanes, so a SparF read of a few of them runs in parallel.
result<uint32_t> column_ftl::add_block(kv_namespace& ns, const uint32_t* chunks, const chunk_run& run,
                                       const std::byte* src, const std::vector<double>& v_sum, uint64_t lane0) {
  uint32_t b;
  if (!ns.free_cblocks.empty()) {
    b = ns.free_cblocks.back();
    ns.free_cblocks.pop_back();
  } else {
    b = static_cast<uint32_t>(ns.cblocks.size());
    ns.cblocks.emplace_back();
    ns.free_cblocks.reserve(ns.cblocks.size());
  }
  kv_namespace::column_block& cb = ns.cblocks[b];
  const uint32_t C = run.count;
  try {
    cb.pages.assign(ns.columns.pages_per_block(), kNoPage);
    cb.offset = run.offset;
    cb.chunks.assign(chunks, chunks + C);
    cb.gens.resize(C);
    for (uint32_t j = 0; j < C; ++j) cb.gens[j] = gen_of(ns, chunks[j]);
    cb.v_sum = v_sum;
    for (uint32_t j = 0; j < C; ++j) ns.cblocks_of_chunk[chunks[j]].reserve(4);
  } catch (...) {
    ns.free_cblocks.push_back(b);
    throw;
  }
  const uint32_t n_pages = ns.columns.pages_per_block();
  if (status s = ftl_.program_striped(src, ns.geo.page_bytes, n_pages, lane0, cb.pages.data()); !s.ok()) {
    ns.free_cblocks.push_back(b);
    return s;
  }
  ctx_.stats.column_pages_programmed += n_pages;
  cb.live = true;
  for (uint32_t j = 0; j < C; ++j) ns.cblocks_of_chunk[chunks[j]].push_back(b);
  ++ctx_.stats.column_blocks;
  return b;
}

// Column data (channel_layout order) and V sums of n tokens of a run of token chunks, from row
// `offset` of the first, read from the group buffer or flash: how a column block or tail is rebuilt.
status column_ftl::build_columns(kv_namespace& ns, const uint32_t* chunks, uint32_t offset, uint32_t n, std::byte* dst,
                                 std::vector<double>& v_sum) {
  const uint32_t tpp = ns.geo.tokens_per_page, H = ns.cfg.n_kv_heads;
  const uint64_t page = ns.geo.page_bytes, row = ns.geo.row_bytes();
  std::fill(v_sum.begin(), v_sum.end(), 0.0);
  aligned_bytes tmp;
  for (uint32_t j = 0, done = 0; done < n; ++j) {
    const uint32_t id = chunks[j];
    const uint32_t from = j == 0 ? offset : 0;
    const uint32_t count = std::min(tpp - from, n - done);
    if (ns.entry(id).n_tokens < from + count)
      return {errc::kInvalidArgument, "chunk " + std::to_string(id) + " holds too few tokens"};
    const std::byte* src = ns.resident(id);
    if (!src) {
      if (!tmp) tmp = alloc_aligned(ns.chunk_bytes);
      if (!tmp) return {errc::kOutOfMemory, "column rebuild buffer"};
      const uint32_t* pages = ns.pages(id);
      for (uint32_t h = 0; h < H; ++h) {  // K and V pages of every head (V for the running mean)
        for (uint32_t p : {h, H + h}) {
          INSTINFER_TRY(ctx_.store->read(pages[p], tmp.get() + uint64_t{p} * page));
          ctx_.note_read(pages[p]);
          ++ctx_.stats.column_rebuild_pages_read;
        }
      }
      src = tmp.get();
    }
    ns.columns.transpose_rows(dst, done, count, src + from * row, src + uint64_t{H} * page + from * row, row, page,
                              v_sum.data());
    done += count;
  }
  return {};
}

// DRAM for a column tail. Over the budget (the group buffer's size), the write path first drops
// the least recently used other tails (they are rebuilt from token pages if attended again); the
// attend path (may_evict false) never drops a tail another item of the same command holds.
status column_ftl::ensure_tail_memory(kv_namespace& ns, column_tail& tl, bool may_evict) {
  tl.use = ++ctx_.use_clock;
  if (!tl.k) {
    const uint64_t bytes = ns.columns.block_bytes();
    while (may_evict && ns.tail_bytes + bytes > ctx_.o.buffer_bytes) {
      column_tail* victim = nullptr;
      for (auto& [key, other] : ns.tails)
        if (other.k && &other != &tl && (!victim || other.use < victim->use)) victim = &other;
      if (!victim) break;
      victim->k.reset();
      victim->valid = false;
      ns.tail_bytes -= bytes;
      ++ctx_.stats.column_tail_evictions;
    }
    tl.k = alloc_aligned(bytes);
    if (!tl.k) return {errc::kOutOfMemory, "SparF column tail buffer"};
    ns.tail_bytes += bytes;
  }
  tl.v_sum.assign(uint64_t{ns.cfg.n_kv_heads} * ns.cfg.head_dim, 0.0);
  return {};
}

void column_ftl::append(kv_namespace& ns, uint64_t seq, uint32_t layer, uint32_t first_index, uint32_t first_token,
                        const uint32_t* ids, const std::byte* k, const std::byte* v, uint32_t n) {
  const uint32_t tpp = ns.geo.tokens_per_page, ctp = ns.columns.tokens_per_page;
  const uint64_t p0 = uint64_t{first_index} * tpp + first_token;
  column_tail& tl = ns.tails[seq_layer_key{seq, layer}];
  if (p0 % ctp == 0) {  // a block boundary: start fresh whatever came before
    if (!ensure_tail_memory(ns, tl, true).ok()) return void(tl.valid = false);
    tl.valid = true;
    tl.block = static_cast<uint32_t>(p0 / ctp);
    tl.n = 0;
    tl.chunks.clear();
    tl.gens.clear();
  } else if (!(tl.valid && uint64_t{tl.block} * ctp + tl.n == p0 &&
               (first_token == 0 ||
                (!tl.chunks.empty() && tl.chunks.back() == ids[0] && tl.gens.back() == gen_of(ns, ids[0]))))) {
    tl.valid = false;  // the tail does not end where these tokens start (fork, truncation)
    return;
  }
  tl.use = ++ctx_.use_clock;
  const uint64_t token_bytes = uint64_t{ns.cfg.n_kv_heads} * ns.geo.row_bytes();  // rows [n][n_kv_heads]
  for (uint32_t i = 0; i < n;) {  // up to the end of the tail's column block at a time
    const uint32_t m = std::min(n - i, ctp - tl.n);
    for (uint32_t t = i; t < i + m; ++t)
      if ((p0 + t) % tpp == 0 || tl.n + (t - i) == 0) {  // the token starts a chunk or the block
        const uint32_t id = ids[(first_token + t) / tpp];
        tl.chunks.push_back(id);
        tl.gens.push_back(gen_of(ns, id));
      }
    ns.columns.transpose_rows(tl.k.get(), tl.n, m, k + i * token_bytes, v + i * token_bytes, tl.v_sum.data());
    i += m;
    tl.n += m;
    if (tl.n == ctp) {  // sealed: program the block, continue with a fresh tail
      const chunk_run run = run_of(ns, uint64_t{tl.block} * ctp, ctp);
      auto b =
          add_block(ns, tl.chunks.data(), run, tl.k.get(), tl.v_sum, token_ftl::stripe(seq, layer) + tl.block * 7ull);
      if (!b.ok()) return void(tl.valid = false);  // rebuilt from the token pages when attended
      ++tl.block;
      tl.n = 0;
      tl.chunks.clear();
      tl.gens.clear();
      std::fill(tl.v_sum.begin(), tl.v_sum.end(), 0.0);
    }
  }
}

status column_ftl::ensure(kv_namespace& ns, uint64_t seq, uint32_t layer, const page_table& tab, uint32_t n,
                          std::vector<uint32_t>& blocks_out, const column_tail*& tail_out) {
  const uint32_t ctp = ns.columns.tokens_per_page;
  const uint32_t sealed = n / ctp, n_tail = n % ctp;
  blocks_out.clear();
  aligned_bytes tmp;
  std::vector<double> vs;
  for (uint32_t b = 0; b < sealed; ++b) {
    const chunk_run run = run_of(ns, uint64_t{b} * ctp, ctp);
    const uint32_t* ids = tab.data() + run.first_index;
    uint32_t idx = find_block(ns, ids, run);
    if (idx == UINT32_MAX) {
      if (!tmp) tmp = alloc_aligned(ns.columns.block_bytes());
      if (!tmp) return {errc::kOutOfMemory, "column rebuild buffer"};
      vs.assign(uint64_t{ns.cfg.n_kv_heads} * ns.cfg.head_dim, 0.0);
      INSTINFER_TRY(build_columns(ns, ids, run.offset, ctp, tmp.get(), vs));
      auto added = add_block(ns, ids, run, tmp.get(), vs, token_ftl::stripe(seq, layer) + b * 7ull);
      if (!added.ok()) return added.error();
      idx = *added;
    }
    blocks_out.push_back(idx);
  }
  tail_out = nullptr;
  if (n_tail == 0) return {};
  column_tail& tl = ns.tails[seq_layer_key{seq, layer}];
  const chunk_run run = run_of(ns, uint64_t{sealed} * ctp, n_tail);
  const uint32_t* ids = tab.data() + run.first_index;
  bool ok = tl.valid && tl.block == sealed && tl.n == n_tail && tl.chunks.size() == run.count;
  for (uint32_t j = 0; ok && j < run.count; ++j) ok = tl.chunks[j] == ids[j] && tl.gens[j] == gen_of(ns, ids[j]);
  if (!ok) {
    tl.valid = false;
    INSTINFER_TRY(ensure_tail_memory(ns, tl, false));
    INSTINFER_TRY(build_columns(ns, ids, run.offset, n_tail, tl.k.get(), tl.v_sum));
    tl.chunks.assign(ids, ids + run.count);
    tl.gens.resize(run.count);
    for (uint32_t j = 0; j < run.count; ++j) tl.gens[j] = gen_of(ns, ids[j]);
    tl.block = sealed;
    tl.n = n_tail;
    tl.valid = true;
  }
  tl.use = ++ctx_.use_clock;
  tail_out = &tl;
  return {};
}

}  // namespace instinfer::csd
