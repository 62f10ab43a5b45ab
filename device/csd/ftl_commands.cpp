// The drive's FTL commands (write, map, reclaim, copy, read) and its persistent namespaces (load,
// commit, recover), members of drive_impl (drive_impl.hpp); dispatch.cpp routes to them.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <new>
#include <string>
#include <system_error>
#include <vector>

#include "drive_impl.hpp"

namespace instinfer::csd {

// ---- write KV -----------------------------------------------------------------------------------
status drive_impl::check_write_chunks(const kv_namespace& ns, const write_kv_args& a,
                                      const std::vector<uint32_t>& ids) const {
  for (uint32_t i = 0; i < a.n_chunks; ++i) {
    INSTINFER_TRY(ns.check_chunk(ids[i]));
    for (uint32_t j = 0; j < i; ++j)
      if (ids[j] == ids[i]) return {errc::kInvalidArgument, "chunk " + std::to_string(ids[i]) + " named twice"};
    const uint32_t have = ns.entry(ids[i]).n_tokens;
    const uint32_t want = i == 0 ? a.first_token : 0;
    if (have != want)
      return {errc::kInvalidArgument, "chunk " + std::to_string(ids[i]) + " holds " + std::to_string(have) +
                                          " tokens; appends must start at " + std::to_string(want) + " (append-only)"};
  }
  return {};
}

status drive_impl::do_write(kv_namespace& ns, const sq_entry& e, const std::byte* data) {
  const auto a = get_args<write_kv_args>(e);
  INSTINFER_TRY(ns.check_layer(a.layer));
  const uint32_t tpp = ns.geo.tokens_per_page;
  if (a.n_tokens == 0) return {errc::kInvalidArgument, "write of zero tokens"};
  if (!ns.layout.fits(a.first_token, 1))
    return {errc::kInvalidArgument,
            "first token " + std::to_string(a.first_token) + " >= tokens per page " + std::to_string(tpp)};
  const uint64_t need_chunks = (uint64_t{a.first_token} + a.n_tokens + tpp - 1) / tpp;
  if (a.n_chunks != need_chunks)
    return {errc::kInvalidArgument, std::to_string(a.n_tokens) + " tokens from offset " +
                                        std::to_string(a.first_token) + " need " + std::to_string(need_chunks) +
                                        " chunks, command names " + std::to_string(a.n_chunks)};
  // The mirrored page table grows to the highest position written: a table cannot hold more chunks
  // than the namespace has, and a larger position would make the drive allocate up to gigabytes.
  if (uint64_t{a.first_index} + a.n_chunks > ns.count)
    return {errc::kInvalidArgument, "page-table positions up to " +
                                        std::to_string(uint64_t{a.first_index} + a.n_chunks) +
                                        " exceed the namespace's " + std::to_string(ns.count) + " chunks"};
  const uint64_t row = ns.geo.row_bytes();
  const uint64_t kv_bytes = uint64_t{a.n_tokens} * ns.cfg.n_kv_heads * row;
  const uint64_t expect = uint64_t{a.n_chunks} * 4 + 2 * kv_bytes;
  if (e.data_bytes != expect)
    return {errc::kInvalidArgument,
            "write payload is " + std::to_string(e.data_bytes) + " bytes, expected " + std::to_string(expect)};
  const std::vector<uint32_t> ids = chunk_ids(data, a.n_chunks);
  INSTINFER_TRY(check_write_chunks(ns, a, ids));
  const std::byte* k = data + uint64_t{a.n_chunks} * 4;
  const std::byte* v = k + kv_bytes;
  const uint64_t token_row = uint64_t{ns.cfg.n_kv_heads} * row;  // one token of every head
  uint32_t t = 0;
  for (uint32_t i = 0; i < a.n_chunks; ++i) {
    const uint64_t chunk = ids[i];
    const uint32_t first = i == 0 ? a.first_token : 0;
    const uint32_t n = std::min(tpp - first, a.n_tokens - t);
    auto buf = buffer_.buffered(ns, chunk);
    if (!buf.ok()) return buf.error();
    ns.layout.scatter_rows(*buf, first, n, k + t * token_row, v + t * token_row);  // fits(first, n) by construction
    ns.entry(chunk).n_tokens = first + n;
    summary_fold_rows(ctx_, ns, chunk, first, k + t * token_row, n);
    token_ftl::set_position(ns, a.seq, a.layer, a.first_index + i, static_cast<uint32_t>(chunk));
    if (first + n == tpp)  // the group is full: one block-packed append of all its pages
      INSTINFER_TRY(buffer_.seal(ns, chunk, token_ftl::stripe(a.seq, a.layer) + a.first_index + i));
    t += n;
  }
  ctx_.stats.kv_bytes_appended += 2 * kv_bytes;
  if (ns.sparf) {
    try {
      columns_.append(ns, a.seq, a.layer, a.first_index, a.first_token, ids.data(), k, v, a.n_tokens);
    } catch (const std::bad_alloc&) {
      column_ftl::forget_tail(ns, a.seq, a.layer);  // rebuilt when attended
    }
  }
  return {};
}

// ---- map / reclaim / copy / read ----------------------------------------------------------------
status drive_impl::do_map(kv_namespace& ns, const sq_entry& e, const std::byte* data) {
  const auto a = get_args<map_args>(e);
  INSTINFER_TRY(ns.check_layer(a.layer));
  if (e.data_bytes != uint64_t{a.n_chunks} * 4) return {errc::kInvalidArgument, "map payload size mismatch"};
  std::vector<uint32_t> ids = chunk_ids(data, a.n_chunks);
  for (uint32_t id : ids) INSTINFER_TRY(ns.check_chunk(id));
  if (ids.empty())
    ns.tables.erase(seq_layer_key{a.seq, a.layer});
  else
    token_ftl::table(ns, a.seq, a.layer) = std::move(ids);
  return {};
}

status drive_impl::do_reclaim(kv_namespace& ns, const sq_entry& e, const std::byte* data) {
  const auto a = get_args<reclaim_args>(e);
  switch (static_cast<reclaim_mode>(a.mode)) {
    case reclaim_mode::kChunks: {
      if (e.data_bytes != uint64_t{a.n_chunks} * 4) return {errc::kInvalidArgument, "reclaim payload size mismatch"};
      const std::vector<uint32_t> ids = chunk_ids(data, a.n_chunks);
      for (uint32_t id : ids) INSTINFER_TRY(ns.check_chunk(id));
      for (uint32_t id : ids) reset_chunk(ns, id);
      break;
    }
    case reclaim_mode::kSequence:
      for (uint32_t l = 0; l < ns.cfg.n_layers; ++l) ns.tables.erase(seq_layer_key{a.seq, l});
      column_ftl::drop_sequence(ns, a.seq);
      break;
    case reclaim_mode::kRange: {
      INSTINFER_TRY(ns.check_layer(a.layer));
      auto it = ns.tables.find(seq_layer_key{a.seq, a.layer});
      if (it == ns.tables.end()) return {errc::kUnknownSequence, "no page table for sequence " + std::to_string(a.seq)};
      page_table& t = it->second;
      if (a.begin > a.end || a.end > t.size()) return {errc::kInvalidArgument, "reclaim range outside the page table"};
      t.erase(t.begin() + a.begin, t.begin() + a.end);
      break;
    }
    case reclaim_mode::kEraseOnly: break;
    default: return {errc::kInvalidArgument, "unknown reclaim mode " + std::to_string(a.mode)};
  }
  ftl_.erase_dead(a.erase_target_blocks);
  return {};
}

status drive_impl::do_copy(kv_namespace& ns, const sq_entry& e) {
  const auto a = get_args<copy_args>(e);
  INSTINFER_TRY(ns.check_layer(a.layer));
  INSTINFER_TRY(ns.check_chunk(a.dst));
  INSTINFER_TRY(ns.check_chunk(a.src));
  if (a.dst == a.src) return {errc::kInvalidArgument, "copy onto itself"};
  if (a.index >= ns.count)  // as for writes: the position bounds the mirrored page table's size
    return {errc::kInvalidArgument, "page-table position " + std::to_string(a.index) + " exceeds the namespace's " +
                                        std::to_string(ns.count) + " chunks"};
  if (!ns.layout.fits(0, a.n_tokens))
    return {errc::kInvalidArgument, "copy of " + std::to_string(a.n_tokens) + " tokens"};
  if (ns.entry(a.dst).n_tokens != 0) return {errc::kInvalidArgument, "copy destination is not empty"};
  if (ns.entry(a.src).n_tokens < a.n_tokens) return {errc::kInvalidArgument, "copy source holds fewer tokens"};
  auto src = buffer_.buffered(ns, a.src);
  if (!src.ok()) return src.error();
  const std::byte* s = *src;
  auto dst = buffer_.buffered(ns, a.dst);
  if (!dst.ok()) return dst.error();
  // Taking a slot for dst may have evicted src's: fetch it again (read back from flash).
  if (ns.entry(a.src).slot == kNoSlot) {
    auto again = buffer_.buffered(ns, a.src);
    if (!again.ok()) return again.error();
    s = *again;
  }
  ns.layout.copy_prefix(*dst, s, a.n_tokens);
  ns.entry(a.dst).n_tokens = a.n_tokens;
  if (ns.page_summaries)  // the copy's own summary, of the rows it holds (the source may hold more)
    if (float* sum = summary_fresh(ctx_, ns, a.dst)) summary_of_pages(ns, sum, *dst, a.n_tokens);
  token_ftl::set_position(ns, a.seq, a.layer, a.index, a.dst);
  if (a.n_tokens == ns.geo.tokens_per_page)
    INSTINFER_TRY(buffer_.seal(ns, a.dst, token_ftl::stripe(a.seq, a.layer) + a.index));
  return {};
}

status drive_impl::do_read(kv_namespace& ns, const sq_entry& e, std::byte* res, command_outcome& out) {
  const auto a = get_args<read_args>(e);
  INSTINFER_TRY(ns.check_chunk(a.chunk));
  if (a.n_tokens > ns.entry(a.chunk).n_tokens) return {errc::kInvalidArgument, "read beyond the tokens written"};
  if (e.result_bytes < ns.chunk_bytes) return {errc::kInvalidArgument, "result buffer smaller than a chunk"};
  if (const std::byte* buffered = ns.resident(a.chunk))
    std::memcpy(res, buffered, ns.chunk_bytes);
  else if (ns.entry(a.chunk).on_flash)
    INSTINFER_TRY(ftl_.read_chunk(ns, a.chunk, res));
  else
    std::memset(res, 0, ns.chunk_bytes);
  out.result_bytes = ns.chunk_bytes;
  return {};
}

// ---- persistent namespaces: load, commit, recover (docs/persistence.md) ------------------------
status drive_impl::configure_persist(kv_namespace& ns) {
  auto r = read_namespace_meta(ctx_.o.flash_path, ns.cfg, ctx_.o.flash, ns.geo.tokens_per_page);
  if (!r.ok()) return r.error();
  namespace_meta& m = r->meta;
  const uint64_t ppc = ns.pages_per_chunk;
  if (r->found) {
    // The stored capacity wins (the chunk ids in the host's tables are below it).
    if (m.count != ns.count) {
      ns.count = m.count;
      ns.chunks.assign(ns.count, chunk_entry{});
      ns.l2p.assign(ns.count * ppc, kNoPage);
    }
    // Checked before anything is adopted: a chunk or a page named twice means damage.
    for (const std::vector<uint32_t>* v : {&m.ids, &m.pages}) {
      std::vector<uint32_t> sorted = *v;
      std::sort(sorted.begin(), sorted.end());
      if (std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end())
        // append, not "'" + string: GCC 12's -Wrestrict misfires on that insert at the front
        return {errc::kCorruptData, std::string("'")
                                        .append(namespace_meta_path(ctx_.o.flash_path))
                                        .append("' maps a chunk or a flash page twice: the store is damaged")};
    }
  }
  ns.persist = true;
  ns.stored_tokens.assign(ns.count, 0);
  ns.page_sums.assign(ns.count * ppc, 0);
  generation_ = m.generation;
  recovered_tables_ = std::move(m.tables);
  for (uint64_t i = 0; i < m.ids.size(); ++i) {
    const uint64_t chunk = ns.base + m.ids[i];
    chunk_entry& ce = ns.entry(chunk);
    ce.n_tokens = m.tokens[i];
    ce.on_flash = true;
    ns.stored_tokens[m.ids[i]] = m.tokens[i];
    for (uint64_t p = 0; p < ppc; ++p) {
      ns.pages(chunk)[p] = m.pages[i * ppc + p];
      ns.page_sums[m.ids[i] * ppc + p] = m.sums[i * ppc + p];
      ctx_.blocks.adopt(m.pages[i * ppc + p]);  // distinct, below total_pages: checked above
    }
  }
  ctx_.blocks.set_pins(m.pages);
  return {};
}

status drive_impl::do_commit(kv_namespace& ns, const sq_entry& e, const std::byte* data) {
  if (!ns.persist) return {errc::kInvalidArgument, "namespace " + std::to_string(ns.nsid) + " is not persistent"};
  const auto a = get_args<commit_args>(e);
  if (e.data_bytes != uint64_t{a.n_chunks} * 4 + a.table_bytes)
    return {errc::kInvalidArgument, "commit payload size mismatch"};
  const std::vector<uint32_t> ids = chunk_ids(data, a.n_chunks);
  for (uint32_t id : ids) {
    INSTINFER_TRY(ns.check_chunk(id));
    if (ns.entry(id).n_tokens == 0)
      return {errc::kInvalidArgument, "commit names chunk " + std::to_string(id) + ", which holds no tokens"};
  }
  {
    std::vector<uint32_t> sorted = ids;
    std::sort(sorted.begin(), sorted.end());
    if (std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end())
      return {errc::kInvalidArgument, "commit names a chunk twice"};
  }
  // 1. The data: buffered chunks whose flash copy is missing or shorter are programmed (the slot
  // stays authoritative), then the flash file is synced. Data is durable before metadata names it.
  const uint64_t ppc = ns.pages_per_chunk;
  for (uint32_t id : ids) {
    const chunk_entry& ce = ns.entry(id);
    if (ce.slot != kNoSlot) {
      if (!ce.on_flash || ns.stored_tokens[id - ns.base] != ce.n_tokens)
        INSTINFER_TRY(ftl_.program_chunk(ns, id, id, ns.slot_mem[ce.slot].get()));
    } else if (!ce.on_flash) {
      return {errc::kInternal, "chunk " + std::to_string(id) + " holds tokens but no data"};
    }
  }
  INSTINFER_TRY(ctx_.store->sync());
  // 2. The metadata, replaced atomically.
  namespace_meta m;
  m.generation = generation_ + 1;
  m.count = ns.count;
  m.pages_per_chunk = static_cast<uint32_t>(ppc);
  m.ids.reserve(ids.size());
  m.tokens.reserve(ids.size());
  m.pages.reserve(ids.size() * ppc);
  m.sums.reserve(ids.size() * ppc);
  for (uint32_t id : ids) {
    const uint64_t rel = id - ns.base;
    m.ids.push_back(static_cast<uint32_t>(rel));
    m.tokens.push_back(ns.stored_tokens[rel]);
    m.pages.insert(m.pages.end(), ns.pages(id), ns.pages(id) + ppc);
    m.sums.insert(m.sums.end(), ns.page_sums.begin() + static_cast<ptrdiff_t>(rel * ppc),
                  ns.page_sums.begin() + static_cast<ptrdiff_t>((rel + 1) * ppc));
  }
  const std::byte* tables = data + uint64_t{a.n_chunks} * 4;
  m.tables.assign(tables, tables + a.table_bytes);
  INSTINFER_TRY(write_namespace_meta(ctx_.o.flash_path, ns.cfg, ctx_.o.flash, m));
  generation_ = m.generation;
  // 3. Only now may the pages of the previous commit (and no others) be erased.
  ctx_.blocks.set_pins(m.pages);
  return {};
}

status drive_impl::do_recover(kv_namespace& ns, const sq_entry& e, std::byte* res, command_outcome& out) {
  if (!ns.persist) return {errc::kInvalidArgument, "namespace " + std::to_string(ns.nsid) + " is not persistent"};
  const auto a = get_args<recover_args>(e);
  const uint64_t total = recovered_tables_.size();
  if (e.result_bytes < 8) return {errc::kInvalidArgument, "result buffer too small"};
  if (a.offset > total) return {errc::kInvalidArgument, "recover offset beyond the tables"};
  const uint64_t n = std::min<uint64_t>(total - a.offset, e.result_bytes - 8);
  std::memcpy(res, &total, 8);
  if (n != 0) std::memcpy(res + 8, recovered_tables_.data() + a.offset, n);
  out.result_bytes = 8 + n;
  return {};
}

}  // namespace instinfer::csd
