// The drive's command front end: validates every command against the queue pair's data area and
// the namespace it names, routes it to the component that executes it, and charges the modelled
// link and flash time. Namespace lifetime (config, delete, a queue pair changing hands) and the
// small FTL commands (write, map, reclaim, copy, read) are composed here from the components.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <new>
#include <string>
#include <system_error>
#include <unordered_map>
#include <vector>

#include "attend_engine.hpp"
#include "column_ftl.hpp"
#include "drive.hpp"
#include "drive_context.hpp"
#include "group_buffer.hpp"
#include "instinfer/layout/kv_shape.hpp"
#include "kv_namespace.hpp"
#include "namespace_meta.hpp"
#include "page_summaries.hpp"
#include "token_ftl.hpp"

namespace instinfer::csd {

status drive_options::validate() const {
  INSTINFER_TRY(flash.validate());
  INSTINFER_TRY(link.validate());
  INSTINFER_TRY(compute.validate());
  if (n_cores == 0 || n_cores > 256) return {errc::kInvalidArgument, "drive cores must be in [1, 256]"};
  if (max_namespaces == 0 || max_namespaces > 1024)
    return {errc::kInvalidArgument, "max namespaces must be in [1, 1024]"};
  if (pages_per_batch == 0 || pages_per_batch > 1024)
    return {errc::kInvalidArgument, "pages per batch must be in [1, 1024]"};
  if (buffer_bytes < flash.page_bytes) return {errc::kInvalidArgument, "group buffer smaller than one page"};
  return {};
}

namespace {

// The u32 chunk ids a command carries as its payload.
std::vector<uint32_t> chunk_ids(const std::byte* data, uint32_t n) {
  std::vector<uint32_t> ids(n);
  if (n != 0) std::memcpy(ids.data(), data, ids.size() * 4);  // an empty map: data() may be null
  return ids;
}

// A fixed-size result (identify, stats).
template <class T>
status reply(const T& value, const sq_entry& e, std::byte* res, command_outcome& out) {
  if (e.result_bytes < sizeof(T)) return {errc::kInvalidArgument, "result buffer too small"};
  std::memcpy(res, &value, sizeof value);
  out.result_bytes = sizeof value;
  return {};
}

class drive_impl final : public drive {
 public:
  drive_impl(const drive_options& o, std::unique_ptr<flash_store> store)
      : ctx_(o, std::move(store)), ftl_(ctx_), buffer_(ctx_, ftl_), columns_(ctx_, ftl_), engine_(ctx_, columns_) {}

  identify_data identify() const noexcept override;
  device_stats stats() const noexcept override;
  void drop_queue_pair(uint32_t qp) noexcept override;
  command_outcome execute(uint32_t qp, const sq_entry& e, std::byte* area, uint64_t area_bytes) noexcept override;

 private:
  status dispatch(uint32_t qp, const sq_entry& e, std::byte* area, uint64_t area_bytes, command_outcome& out);
  status do_config(uint32_t qp, const sq_entry& e, const std::byte* data, std::byte* res, command_outcome& out);
  status configure_sparf(kv_namespace& ns, const kv_shape& shape) const;
  status do_write(kv_namespace& ns, const sq_entry& e, const std::byte* data);
  status check_write_chunks(const kv_namespace& ns, const write_kv_args& a, const std::vector<uint32_t>& ids) const;
  status do_map(kv_namespace& ns, const sq_entry& e, const std::byte* data);
  status do_reclaim(kv_namespace& ns, const sq_entry& e, const std::byte* data);
  status do_copy(kv_namespace& ns, const sq_entry& e);
  status do_read(kv_namespace& ns, const sq_entry& e, std::byte* res, command_outcome& out);
  status configure_persist(kv_namespace& ns);
  status do_commit(kv_namespace& ns, const sq_entry& e, const std::byte* data);
  status do_recover(kv_namespace& ns, const sq_entry& e, std::byte* res, command_outcome& out);
  void reset_chunk(kv_namespace& ns, uint64_t chunk) noexcept;
  void free_namespace(kv_namespace& ns) noexcept;

  drive_context ctx_;
  token_ftl ftl_;
  group_buffer buffer_;
  column_ftl columns_;
  attend_engine engine_;
  std::unordered_map<uint32_t, std::unique_ptr<kv_namespace>> spaces_;
  uint32_t next_nsid_ = 1;
  uint64_t next_base_ = 0;
  // The persistent namespace (at most one a drive): the generation of its last commit and the
  // host's tables found at configure (kRecover hands them over).
  uint64_t generation_ = 0;
  std::vector<std::byte> recovered_tables_;
};

identify_data drive_impl::identify() const noexcept {
  const drive_options& o = ctx_.o;
  identify_data d{};
  d.page_bytes = o.flash.page_bytes;
  d.channels = o.flash.channels;
  d.dies_per_channel = o.flash.dies_per_channel;
  d.pages_per_block = o.flash.pages_per_block;
  d.blocks_per_channel = o.flash.blocks_per_die * o.flash.dies_per_channel;
  d.n_cores = o.n_cores;
  d.max_namespaces = o.max_namespaces;
  d.capacity_bytes = o.flash.capacity_bytes();
  d.buffer_bytes = o.buffer_bytes;
  d.direct_io = ctx_.store->direct_io() ? 1 : 0;
  d.ram_flash = ctx_.store->ram() ? 1 : 0;
  d.isa = static_cast<uint8_t>(best_cpu_isa());
#if defined(__aarch64__)
  std::strncpy(d.arch, "aarch64", sizeof d.arch - 1);
#elif defined(__x86_64__)
  std::strncpy(d.arch, "x86_64", sizeof d.arch - 1);
#else
  std::strncpy(d.arch, "unknown", sizeof d.arch - 1);
#endif
  return d;
}

device_stats drive_impl::stats() const noexcept {
  device_stats s = ctx_.stats;
  s.free_blocks = ctx_.blocks.free_blocks();
  s.total_blocks = ctx_.blocks.total_blocks();
  s.valid_pages = ctx_.blocks.valid_pages();
  s.page_bytes = ctx_.o.flash.page_bytes;
  return s;
}

void drive_impl::drop_queue_pair(uint32_t qp) noexcept {
  for (auto it = spaces_.begin(); it != spaces_.end();) {
    if (it->second->owner_qp == qp) {
      free_namespace(*it->second);
      it = spaces_.erase(it);
    } else {
      ++it;
    }
  }
}

command_outcome drive_impl::execute(uint32_t qp, const sq_entry& e, std::byte* area, uint64_t area_bytes) noexcept {
  command_outcome out;
  out.cqe.cid = e.cid;
  const double t_start = ctx_.now_ns;
  ctx_.flash_end = 0.0;
  ctx_.work = {};
  status s;
  try {
    s = dispatch(qp, e, area, area_bytes, out);
  } catch (const std::bad_alloc&) {
    s = {errc::kOutOfMemory, "drive out of memory"};
  } catch (...) {
    s = {errc::kInternal, "unexpected exception in the drive"};
  }
  device_stats& st = ctx_.stats;
  if (!s.ok()) {
    out.cqe.status = static_cast<int16_t>(s.code());
    out.error = std::string(opcode_name(static_cast<opcode>(e.opcode))) + ": " + s.message();
    out.result_bytes = 0;
    ++st.commands_failed;
  }
  ++st.commands;
  // The model (models.hpp): link, flash and the cores' compute overlap; the command takes the longest.
  const uint64_t in = link_bytes_in(e.data_bytes);
  const uint64_t back = link_bytes_out(out.result_bytes);
  st.link_bytes_host_to_device += in;
  st.link_bytes_device_to_host += back;
  command_time ct;
  ct.link_ns = ctx_.o.link.command_ns(in, back);
  ct.flash_ns = ctx_.flash_end > t_start ? ctx_.flash_end - t_start : 0.0;
  const double flops = ctx_.work.flops();
  ct.compute_ns = ctx_.o.compute.ns(flops);
  const double total = ct.total_ns();
  ctx_.now_ns = t_start + total;
  st.modelled_link_ns += static_cast<uint64_t>(ct.link_ns);
  st.modelled_flash_ns += static_cast<uint64_t>(ct.flash_ns);
  st.modelled_compute_ns += static_cast<uint64_t>(ct.compute_ns);
  st.attend_flops += static_cast<uint64_t>(flops);
  st.modelled_ns += static_cast<uint64_t>(total);
  out.cqe.result = out.result_bytes;
  out.cqe.modelled_ns = total >= 4294967295.0 ? UINT32_MAX : static_cast<uint32_t>(total);
  return out;
}

status drive_impl::dispatch(uint32_t qp, const sq_entry& e, std::byte* area, uint64_t area_bytes,
                            command_outcome& out) {
  if (e.data_offset > area_bytes || e.data_bytes > area_bytes - e.data_offset)
    return {errc::kInvalidArgument, "data range [" + std::to_string(e.data_offset) + ", +" +
                                        std::to_string(e.data_bytes) + ") is outside the queue pair's data area"};
  if (e.result_offset > area_bytes || e.result_bytes > area_bytes - e.result_offset)
    return {errc::kInvalidArgument, "result range is outside the queue pair's data area"};
  if (e.data_offset % 8 != 0 || e.result_offset % 8 != 0)  // like NVMe PRPs: aligned buffers only
    return {errc::kInvalidArgument, "data and result offsets must be 8-byte aligned"};
  const std::byte* data = area + e.data_offset;
  std::byte* res = area + e.result_offset;
  const auto op = static_cast<opcode>(e.opcode);
  switch (op) {
    case opcode::kIdentify: return reply(identify(), e, res, out);
    case opcode::kStats: return reply(stats(), e, res, out);
    case opcode::kConfig: return do_config(qp, e, data, res, out);
    case opcode::kShutdown: out.shutdown = true; return {};
    default: break;
  }
  auto it = spaces_.find(e.nsid);
  if (it == spaces_.end()) return {errc::kInvalidArgument, "namespace " + std::to_string(e.nsid) + " does not exist"};
  kv_namespace& ns = *it->second;
  if (ns.owner_qp != qp)
    return {errc::kInvalidArgument, "namespace " + std::to_string(e.nsid) + " belongs to another queue pair"};
  switch (op) {
    case opcode::kDeleteNamespace:
      free_namespace(ns);
      spaces_.erase(it);
      return {};
    case opcode::kWriteKv: return do_write(ns, e, data);
    case opcode::kAttend: return engine_.attend(ns, e, data, res, out.result_bytes);
    case opcode::kAttendSparse: return engine_.attend_sparse(ns, e, data, res, out.result_bytes);
    case opcode::kAttendChunk: return engine_.attend_chunk(ns, e, data, res, out.result_bytes);
    case opcode::kReclaim: return do_reclaim(ns, e, data);
    case opcode::kMap: return do_map(ns, e, data);
    case opcode::kCopy: return do_copy(ns, e);
    case opcode::kRead: return do_read(ns, e, res, out);
    case opcode::kCommit: return do_commit(ns, e, data);
    case opcode::kRecover: return do_recover(ns, e, res, out);
    default: return {errc::kInvalidArgument, "unknown opcode " + std::to_string(e.opcode)};
  }
}

// ---- config / namespace lifetime ----------------------------------------------------------------
status drive_impl::do_config(uint32_t qp, const sq_entry& e, const std::byte* data, std::byte* res,
                             command_outcome& out) {
  if (e.data_bytes != sizeof(namespace_config))
    return {errc::kInvalidArgument, "config payload must be " + std::to_string(sizeof(namespace_config)) + " bytes"};
  if (e.result_bytes < sizeof(namespace_info)) return {errc::kInvalidArgument, "result buffer too small"};
  if (spaces_.size() >= ctx_.o.max_namespaces) return {errc::kNoSpace, "the drive has no free namespace"};
  namespace_config c;
  std::memcpy(&c, data, sizeof c);
  kv_shape shape{c.n_layers, c.n_kv_heads * c.group_size, c.n_kv_heads, c.head_dim, static_cast<dtype>(c.kv_dtype)};
  if (c.group_size == 0 || c.group_size > kv_shape::kMaxHeads) return {errc::kInvalidArgument, "bad group size"};
  if (!is_valid_dtype(static_cast<dtype>(c.kv_dtype)))
    return {errc::kInvalidArgument, "unknown KV dtype " + std::to_string(c.kv_dtype)};
  INSTINFER_TRY(shape.validate());
  if (c.page_bytes != ctx_.o.flash.page_bytes)
    return {errc::kInvalidArgument, "page size " + std::to_string(c.page_bytes) + " differs from the flash page (" +
                                        std::to_string(ctx_.o.flash.page_bytes) + ")"};
  auto geo = page_geometry::make(c.page_bytes, c.head_dim, shape.kv_dtype);
  if (!geo.ok()) return geo.error();
  if (!std::isfinite(c.scale) || !std::isfinite(c.softcap) || c.scale < 0.0f)
    return {errc::kInvalidArgument, "scale and softcap must be finite (scale >= 0)"};
  if (c.sparf > 1) return {errc::kInvalidArgument, "sparf flag must be 0 or 1"};
  if (c.persist > 1) return {errc::kInvalidArgument, "persist flag must be 0 or 1"};
  if (c.page_summaries > 1) return {errc::kInvalidArgument, "page_summaries flag must be 0 or 1"};
  if (c.persist) {
    if (c.sparf || c.page_summaries)
      return {errc::kUnsupported,
              "a persistent namespace keeps no sparse policy's data (SparF's channel-indexed copy, page summaries): "
              "sparf = page_summaries = 0"};
    if (ctx_.store->ram() || ctx_.o.flash_path.empty())
      return {errc::kUnsupported,
              "a persistent namespace needs file flash (--flash PATH): RAM flash dies with the "
              "drive"};
    // Its metadata names physical pages: no other namespace may have programmed any before it.
    if (!spaces_.empty() || ctx_.program_stamp != 0)
      return {errc::kBusy, "a persistent namespace must be the drive's first and only namespace"};
  }
  auto ns = std::make_unique<kv_namespace>();
  ns->cfg = c;
  ns->geo = *geo;
  ns->layout = chunk_layout::make(*geo, c.n_kv_heads);
  ns->pages_per_chunk = 2 * c.n_kv_heads;
  ns->chunk_bytes = uint64_t{c.page_bytes} * ns->pages_per_chunk;
  if (c.sparf) INSTINFER_TRY(configure_sparf(*ns, shape));
  if (c.page_summaries) INSTINFER_TRY(summary_configure(*ns));
  // With SparF every chunk also costs n_kv_heads column pages (the K copy: 1.5x the KV).
  const uint64_t fit = ctx_.o.flash.total_pages() / (ns->pages_per_chunk + (c.sparf ? c.n_kv_heads : 0));
  ns->count = c.capacity_chunks == 0 ? fit : c.capacity_chunks;
  if (ns->count == 0 || ns->count > (uint64_t{1} << 26))
    return {errc::kInvalidArgument, "namespace capacity must be in [1, 2^26] chunks, got " + std::to_string(ns->count)};
  // Its tables (chunk entries, token L2P, generations) are allocated and filled now. Up to what the
  // flash holds they are the drive's own size; a capacity beyond it (overcommitted logical chunks)
  // may take at most the namespace's DRAM budget, the group buffer's size: a host must not make the
  // drive commit gigabytes it cannot use.
  // (Page summaries: a pointer per chunk here; the summaries themselves, 2 x n_kv_heads x head_dim
  // floats per written chunk, are counted in device_stats::summary_bytes as they are made.)
  const uint64_t table_bytes = ns->count * (sizeof(chunk_entry) + 4ull * ns->pages_per_chunk + (c.sparf ? 4 : 0) +
                                            (c.page_summaries ? sizeof(void*) : 0));
  if (ns->count > fit && table_bytes > ctx_.o.buffer_bytes)
    return {errc::kNoSpace, "namespace of " + std::to_string(ns->count) + " chunks (the flash holds " +
                                std::to_string(fit) + ") needs " + std::to_string(table_bytes) +
                                " bytes of tables, over the drive's DRAM budget of " +
                                std::to_string(ctx_.o.buffer_bytes)};
  if (next_base_ + ns->count >= kNoChunk) return {errc::kNoSpace, "chunk id space exhausted"};
  ns->params.layout = ns->layout;  // decode_driver's view; its chunk source stages one head per chunk
  ns->params.group_size = c.group_size;
  ns->params.scale = c.scale;
  ns->params.softcap = c.softcap;
  auto kernel = select_decode_heads_kernel(best_cpu_isa(), ns->params);
  if (!kernel.ok()) return kernel.error();
  ns->kernel = *kernel;
  auto rows = select_decode_rows_kernel(best_cpu_isa(), ns->params);  // none: attend-chunk says kUnsupported
  ns->rows_kernel = rows.ok() ? *rows : nullptr;
  ns->chunks.assign(ns->count, chunk_entry{});
  ns->l2p.assign(ns->count * ns->pages_per_chunk, kNoPage);
  if (ns->sparf) ns->gen.assign(ns->count, 0);
  if (ns->page_summaries) ns->summaries.resize(ns->count);
  ns->max_slots = std::max<uint64_t>(1, ctx_.o.buffer_bytes / ns->chunk_bytes);
  ns->base = next_base_;
  if (c.persist) INSTINFER_TRY(configure_persist(*ns));  // the last commit's chunks and capacity
  next_base_ += ns->count;
  ns->nsid = next_nsid_++;
  ns->owner_qp = qp;
  const namespace_info info{ns->nsid, geo->tokens_per_page, ns->base, ns->count};
  std::memcpy(res, &info, sizeof info);
  out.result_bytes = sizeof info;
  spaces_.emplace(ns->nsid, std::move(ns));
  return {};
}

status drive_impl::configure_sparf(kv_namespace& ns, const kv_shape& shape) const {
  const namespace_config& c = ns.cfg;
  auto cols = channel_layout::make(c.page_bytes, c.head_dim, shape.kv_dtype, c.sparf_channels_per_page, c.n_kv_heads);
  if (!cols.ok()) return cols.error();
  auto one =
      sparf_config::make(chunk_layout::make(ns.geo, 1), cols->channels_per_page, c.group_size, c.scale, c.softcap);
  if (!one.ok()) return one.error();
  ns.sparf = true;
  ns.columns = *cols;
  ns.sparf_one_head = *one;
  return {};
}

void drive_impl::reset_chunk(kv_namespace& ns, uint64_t chunk) noexcept {
  if (ns.sparf) columns_.chunk_reset(ns, static_cast<uint32_t>(chunk));
  summary_drop(ctx_, ns, chunk);
  ftl_.drop_pages(ns, chunk);
  buffer_.release(ns, chunk);
  ns.entry(chunk) = chunk_entry{};
}

void drive_impl::free_namespace(kv_namespace& ns) noexcept {
  for (uint64_t c = ns.base; c < ns.base + ns.count; ++c) reset_chunk(ns, c);
  (void)ftl_.erase_dead(0);
}

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
        return {errc::kCorruptData, "'" + namespace_meta_path(ctx_.o.flash_path) +
                                        "' maps a chunk or a flash page twice: the store is damaged"};
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

}  // namespace

result<std::unique_ptr<drive>> drive::create(const drive_options& options) {
  INSTINFER_TRY(options.validate());
  std::unique_ptr<flash_store> store;
  if (options.flash_path.empty()) {
    store = make_ram_flash(options.flash);
  } else {
    auto f =
        make_file_flash(options.flash, flash_file_options{options.flash_path, options.flash_fd, options.flash_lock_fd,
                                                          options.allow_buffered, options.keep_flash});
    if (!f.ok()) return f.error();
    store = std::move(*f);
  }
  if (options.fault.op != flash_fault::kind::kNone) store = make_faulty_flash(std::move(store), options.fault);
  try {
    return std::unique_ptr<drive>(new drive_impl(options, std::move(store)));
  } catch (const std::system_error& e) {
    return status{errc::kInternal, std::string("cannot start the drive's cores: ") + e.what()};
  }
}

}  // namespace instinfer::csd
