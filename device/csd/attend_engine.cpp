#include "attend_engine.hpp"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <new>
#include <string>
#include <system_error>
#include <thread>

#include "page_source.hpp"

namespace instinfer::csd {

namespace {

bool same_decode(const decode_params& a, const decode_params& b) noexcept {
  const page_geometry &x = a.layout.page, &y = b.layout.page;
  return x.page_bytes == y.page_bytes && x.head_dim == y.head_dim && x.kv_dtype == y.kv_dtype &&
         x.tokens_per_page == y.tokens_per_page && a.layout.n_kv_heads == b.layout.n_kv_heads &&
         a.group_size == b.group_size && a.scale == b.scale && a.softcap == b.softcap;
}

}  // namespace

attend_engine::attend_engine(drive_context& ctx, column_ftl& columns)
    : ctx_(ctx), columns_(columns), pool_(ctx.o.n_cores), workers_(pool_.size()) {}

attend_engine::~attend_engine() = default;

status attend_engine::decode_command(const kv_namespace& ns, const sq_entry& e, bool sparse, const std::byte* data,
                                     std::byte* res, command& c) const {
  const char* what = sparse ? "attend-sparse" : "attend";
  c.args = get_args<attend_args>(e);
  INSTINFER_TRY(ns.check_layer(c.args.layer));
  if (c.args.n_items == 0 || c.args.n_items > kMaxAttendItems)
    return {errc::kInvalidArgument, "attend batch must hold 1..65536 items"};
  // attend-sparse: the parameters' size (a protocol-5 host sends sparf_wire_params alone, args 0)
  uint32_t params_bytes = 0;
  if (sparse) {
    const auto sa = get_args<attend_sparse_args>(e);
    params_bytes = sa.params_bytes == 0 ? uint32_t{sizeof(sparf_wire_params)} : sa.params_bytes;
    if (params_bytes != sizeof(sparf_wire_params) && params_bytes != kSparfParamsBytesV6 &&
        params_bytes != kSparfParamsBytes)
      return {errc::kInvalidArgument, "attend-sparse parameters must be " + std::to_string(sizeof(sparf_wire_params)) +
                                          " (protocol 5), " + std::to_string(kSparfParamsBytesV6) +
                                          " (protocol 6) or " + std::to_string(kSparfParamsBytes) + " bytes, got " +
                                          std::to_string(sa.params_bytes)};
    if (sa.reserved != 0) return {errc::kInvalidArgument, "attend-sparse arguments: reserved field must be 0"};
  }
  c.wire = attend_wire_layout::make(c.args.n_items, ns.q_heads(), ns.cfg.head_dim, sparse, params_bytes);
  if (e.data_bytes != c.wire.data_bytes) return {errc::kInvalidArgument, std::string(what) + " payload size mismatch"};
  if (e.result_bytes < c.wire.result_bytes)
    return {errc::kInvalidArgument, std::string(what) + " result buffer too small"};
  if (sparse) {
    sparf_wire_params wp;
    std::memcpy(&wp, data, sizeof wp);
    if (!decode_sparf_params(wp, c.sparf)) return {errc::kInvalidArgument, "unknown SparF mode"};
    if (params_bytes >= kSparfParamsBytesV6) {
      sparf_wire_ext ext;
      std::memcpy(&ext, data + sizeof wp, sizeof ext);
      if (!decode_sparf_ext(ext, c.sparf))
        return {errc::kInvalidArgument, "attend-sparse parameters: reserved bytes of the extension must be 0"};
    }
    if (params_bytes >= kSparfParamsBytes) {
      sparf_wire_ext2 ext2;
      std::memcpy(&ext2, data + kSparfParamsBytesV6, sizeof ext2);
      if (!decode_sparf_ext2(ext2, c.sparf))
        return {errc::kInvalidArgument, "attend-sparse parameters: reserved bytes of the second extension must be 0"};
    }
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
// decode_driver with per_kv_head_policy: items of (sequence, kv head, chunk range), each streamed
// double-buffered through its worker's page reader (page_source.hpp) into the head-range decode
// kernel; split rows merge in token order in the driver. Modelled flash time: every page the
// engine reads, queued at command start.

status attend_engine::attend(kv_namespace& ns, const sq_entry& e, const std::byte* data, std::byte* res,
                             uint64_t& result_bytes) {
  const int64_t wall0 = wall_ns();
  command c;
  INSTINFER_TRY(decode_command(ns, e, false, data, res, c));
  if (ctx_.o.debug_attend_delay_ms)
    std::this_thread::sleep_for(std::chrono::milliseconds(ctx_.o.debug_attend_delay_ms));
  model_dense_reads(ns, c);
  // Compute model: every item's K and V through the kernel, one exact softmax per (token, kv head).
  for (uint32_t i = 0; i < c.n_items(); ++i) {
    const double tokens = static_cast<double>(c.items[i].n_tokens) * ns.cfg.n_kv_heads;
    ctx_.work.kv_elements += 2.0 * tokens * ns.cfg.head_dim;
    ctx_.work.scored_tokens += tokens;
  }
  ctx_.work.group = ns.cfg.group_size;
  ctx_.work.kv_dtype = ns.geo.kv_dtype;
  INSTINFER_TRY(run_dense(ns, c));
  result_bytes = c.wire.result_bytes;
  ctx_.stats.attend_wall_ns += static_cast<uint64_t>(wall_ns() - wall0);
  return {};
}

// ==== attend chunk (causal rows) =================================================================
// The dense path with query rows: each item's pages are read once per kv head for all its rows
// (the driver's rows kernel), so a prefill chunk costs one pass over the KV, not one per row.

status attend_engine::decode_chunk_command(const kv_namespace& ns, const sq_entry& e, const std::byte* data,
                                           std::byte* res, command& c) const {
  const auto a = get_args<attend_chunk_args>(e);
  c.args = attend_args{a.layer, a.n_items};
  INSTINFER_TRY(ns.check_layer(a.layer));
  if (a.n_items == 0 || a.n_items > kMaxAttendItems)
    return {errc::kInvalidArgument, "attend-chunk batch must hold 1..65536 items"};
  if (a.n_rows == 0 || a.n_rows > kMaxAttendChunkRows)
    return {errc::kInvalidArgument, "attend-chunk must carry 1.." + std::to_string(kMaxAttendChunkRows) +
                                        " query rows, got " + std::to_string(a.n_rows)};
  c.wire = attend_wire_layout::make_chunk(a.n_items, a.n_rows, ns.q_heads(), ns.cfg.head_dim);
  if (e.data_bytes != c.wire.data_bytes) return {errc::kInvalidArgument, "attend-chunk payload size mismatch"};
  if (e.result_bytes < c.wire.result_bytes) return {errc::kInvalidArgument, "attend-chunk result buffer too small"};
  std::vector<attend_chunk_entry> entries(a.n_items);
  std::memcpy(entries.data(), data, entries.size() * sizeof(attend_chunk_entry));
  c.items.resize(a.n_items);
  c.n_rows.resize(a.n_items);
  c.first_pos.resize(a.n_items);
  c.row_begin.resize(a.n_items);
  uint64_t rows = 0;
  for (uint32_t i = 0; i < a.n_items; ++i) {
    const attend_chunk_entry& x = entries[i];
    if (x.n_rows == 0 || uint64_t{x.first_pos} + x.n_rows > x.n_tokens)
      return {errc::kInvalidArgument, "attend-chunk item " + std::to_string(i) + " (sequence " + std::to_string(x.seq) +
                                          "): " + std::to_string(x.n_rows) + " query rows at position " +
                                          std::to_string(x.first_pos) + " over " + std::to_string(x.n_tokens) +
                                          " tokens (need 1 <= rows, first + rows <= tokens)"};
    c.items[i] = attend_entry{x.seq, x.n_tokens, 0};
    c.n_rows[i] = x.n_rows;
    c.first_pos[i] = x.first_pos;
    c.row_begin[i] = static_cast<uint32_t>(rows);
    rows += x.n_rows;
  }
  if (rows != a.n_rows)
    return {errc::kInvalidArgument, "attend-chunk items hold " + std::to_string(rows) +
                                        " query rows, the command says " + std::to_string(a.n_rows)};
  c.q = reinterpret_cast<const float*>(data + c.wire.q_offset);
  c.out = reinterpret_cast<float*>(res);
  c.lse = reinterpret_cast<float*>(res + c.wire.lse_offset);
  c.tabs.assign(a.n_items, nullptr);
  return check_items(ns, c);
}

status attend_engine::attend_chunk(kv_namespace& ns, const sq_entry& e, const std::byte* data, std::byte* res,
                                   uint64_t& result_bytes) {
  const int64_t wall0 = wall_ns();
  if (ns.rows_kernel == nullptr)
    return {errc::kUnsupported, "the drive has no causal-rows kernel for this namespace's KV type"};
  command c;
  INSTINFER_TRY(decode_chunk_command(ns, e, data, res, c));
  model_dense_reads(ns, c);
  // Compute model: every row's visible K and V through the kernel, one exact softmax per (row,
  // token, kv head); the pages themselves are read once (model_dense_reads).
  for (uint32_t i = 0; i < c.n_items(); ++i) {
    const double rows = c.n_rows[i];
    const double visible = rows * c.first_pos[i] + rows * (rows + 1) / 2;  // sum of first_pos + r + 1
    const double tokens = visible * ns.cfg.n_kv_heads;
    ctx_.work.kv_elements += 2.0 * tokens * ns.cfg.head_dim;
    ctx_.work.scored_tokens += tokens;
  }
  ctx_.work.group = ns.cfg.group_size;
  ctx_.work.kv_dtype = ns.geo.kv_dtype;
  INSTINFER_TRY(run_dense(ns, c));
  result_bytes = c.wire.result_bytes;
  ctx_.stats.attend_wall_ns += static_cast<uint64_t>(wall_ns() - wall0);
  return {};
}

result<decode_driver*> attend_engine::driver_for(const kv_namespace& ns) {
  if (driver_ && same_decode(driver_->params(), ns.params)) return driver_.get();
  driver_.reset();  // its threads go before the next driver's start
  decode_driver_options o;
  o.n_threads = static_cast<uint32_t>(workers_.size());
  const decode_plan_options policy = per_kv_head_policy(ns.geo.tokens_per_page, ns.cfg.n_kv_heads, o.n_threads);
  o.items_per_worker = policy.items_per_worker;
  o.min_item_tokens = policy.min_item_tokens;
  o.kv_heads_per_item = policy.kv_heads_per_item;
  auto made = decode_driver::create(ns.params, ns.kernel, o);
  if (!made.ok()) return made.error();
  driver_ = std::move(*made);
  driver_->set_rows_kernel(ns.rows_kernel);
  return driver_.get();
}

// Every flash page the run will read (chunks in the DRAM group buffer are not read), in the
// plan's order: item, kv head, chunk.
void attend_engine::model_dense_reads(const kv_namespace& ns, const command& c) {
  const uint32_t heads = ns.cfg.n_kv_heads;
  read_ppns_.clear();
  for (uint32_t i = 0; i < c.n_items(); ++i)
    for (uint32_t h = 0; h < heads; ++h)
      for (uint32_t ci = 0; ci < ns.chunks_for(c.items[i].n_tokens); ++ci) {
        const uint32_t id = (*c.tabs[i])[ci];
        if (ns.entry(id).slot != kNoSlot) continue;
        const uint32_t* pages = ns.pages(id);
        read_ppns_.push_back(pages[h]);
        read_ppns_.push_back(pages[heads + h]);
      }
  ctx_.stats.flash_pages_read += read_ppns_.size();
  ctx_.flash_done_at(ctx_.timeline.read_batch(read_ppns_.data(), read_ppns_.size(), ctx_.now_ns));
}

status attend_engine::run_dense(const kv_namespace& ns, const command& c) {
  auto driver = driver_for(ns);
  if (!driver.ok()) return driver.error();
  const uint32_t hq = ns.q_heads(), d = ns.cfg.head_dim;
  dense_batch_.resize(c.n_items());
  for (uint32_t i = 0; i < c.n_items(); ++i) {
    decode_sequence& s = dense_batch_[i];
    s.n_tokens = c.items[i].n_tokens;
    s.n_chunks = ns.chunks_for(s.n_tokens);
    const uint64_t row = c.n_rows.empty() ? i : c.row_begin[i];  // attend: one row per item
    s.q = c.q + row * hq * d;
    s.out = c.out + row * hq * d;
    s.lse = c.lse + row * hq;
    s.n_rows = c.n_rows.empty() ? 0 : c.n_rows[i];
    s.first_pos = c.n_rows.empty() ? 0 : c.first_pos[i];
  }
  page_chunk_source source(ns, c.tabs, workers_, *ctx_.store, ctx_.o.pages_per_batch);
  const status s = (*driver)->run(dense_batch_, source);
  ctx_.stats.cpu_ns += source.cpu_ns();
  return s;
}

}  // namespace instinfer::csd
