// The drive's command front end: validates every command against the queue pair's data area and
// the namespace it names, routes it to the component that executes it, and charges the modelled
// link and flash time. Namespace lifetime (config, delete, a queue pair changing hands) and the
// small FTL commands (ftl_commands.cpp) are composed from the components (drive_impl.hpp).
#include <algorithm>
#include <cstring>
#include <memory>
#include <new>
#include <string>

#include "drive_impl.hpp"

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
