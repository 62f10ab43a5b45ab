// The csd: backend (host side): drive configuration, chunks, writes and reads, persistence,
// stats. Its attention commands: csd_attend.cpp.
#include "instinfer/backend/csd_backend.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "csd_impl.hpp"
#include "instinfer/attention/sparf.hpp"
#include "instinfer/csd/client.hpp"
#include "instinfer/csd/models.hpp"
#include "instinfer/csd/protocol.hpp"
#include "instinfer/csd/protocol_codec.hpp"
#include "instinfer/csd/seq_layer_key.hpp"

namespace instinfer {

using namespace csd;

csd_backend::csd_backend(std::unique_ptr<impl> p) : impl_(std::move(p)) {}

csd_backend::~csd_backend() {
  if (!impl_) return;
  for (csd_drive_slot& d : impl_->drives) {
    if (!d.conn || d.conn->lost() || d.nsid == 0 || d.conn->started()) continue;
    sq_entry e{};
    e.opcode = static_cast<uint8_t>(opcode::kDeleteNamespace);
    e.nsid = d.nsid;
    (void)d.conn->execute(e);
  }
}

uint32_t csd_backend::preferred_page_bytes() const noexcept {
  return impl_->page_bytes;
}

status csd_backend::configure(const backend_config& config) {
  impl& m = *impl_;
  if (m.configured) return {errc::kInvalidArgument, "csd backend is already configured"};
  INSTINFER_TRY(config.shape.validate());
  if (config.int8_query_dot)
    return {errc::kUnsupported, "csd: int8_query_dot is not run by the drive (host and ssd only)"};
  if (config.page.page_bytes != m.page_bytes)
    return {errc::kInvalidArgument, "csd: page_bytes must be " + std::to_string(m.page_bytes) +
                                        " (the drive's flash page, csd: option page=), got " +
                                        std::to_string(config.page.page_bytes)};
  if (config.capacity_bytes != 0 && config.capacity_bytes < config.layout().chunk_bytes())
    return {errc::kInvalidArgument, "csd: capacity_bytes " + std::to_string(config.capacity_bytes) +
                                        " holds no chunk of " + std::to_string(config.layout().chunk_bytes()) +
                                        " bytes (2 x n_kv_heads pages)"};
  const uint32_t n = static_cast<uint32_t>(m.drives.size());
  const uint32_t h = config.shape.n_kv_heads;
  if (n > h)
    return {errc::kInvalidArgument,
            std::to_string(n) + " drives for " + std::to_string(h) + " kv heads: every drive needs at least one head"};
  m.config = config;
  m.layout = config.layout();
  const uint64_t wanted =
      config.capacity_bytes / m.layout.chunk_bytes();  // 0: the whole drive (at least one chunk: checked above)
  uint64_t cap = UINT32_MAX - 1;
  for (uint32_t d = 0; d < n; ++d) {
    csd_drive_slot& ds = m.drives[d];
    ds.head_begin = h * d / n;
    ds.n_heads = h * (d + 1) / n - ds.head_begin;
    namespace_config c{};
    c.n_layers = config.shape.n_layers;
    c.n_kv_heads = ds.n_heads;
    c.group_size = config.shape.group_size();
    c.head_dim = config.shape.head_dim;
    c.page_bytes = config.page.page_bytes;
    c.kv_dtype = static_cast<uint8_t>(config.shape.kv_dtype);
    c.scale = config.scale;
    c.softcap = config.softcap;
    c.kv_head_begin = ds.head_begin;
    c.capacity_chunks = wanted;
    c.sparf = config.sparf ? 1 : 0;  // the drive keeps the channel-indexed K copy and runs SparF
    c.sparf_channels_per_page = config.sparf_channels_per_page;
    c.page_summaries = config.page_summaries ? 1 : 0;  // the drive keeps them and runs the page policy
    c.persist = m.persist ? 1 : 0;
    std::memcpy(ds.conn->area(), &c, sizeof c);
    sq_entry e{};
    e.opcode = static_cast<uint8_t>(opcode::kConfig);
    e.data_bytes = sizeof c;
    e.result_offset = 4096;
    e.result_bytes = sizeof(namespace_info);
    INSTINFER_TRY(ds.conn->execute(e));
    namespace_info info;
    std::memcpy(&info, ds.conn->area() + 4096, sizeof info);
    if (info.tokens_per_page != config.page.tokens_per_page)
      return {errc::kInternal, "drive and host disagree on tokens per page"};
    ds.nsid = info.nsid;
    ds.chunk_base = info.chunk_base;
    cap = std::min(cap, info.chunk_count);
  }
  m.capacity = cap;
  std::vector<bool> taken(cap, false);
  if (m.persist) {
    INSTINFER_TRY(m.recover_tables());
    for (const persisted_sequence& p : m.found.sequences)
      for (const auto& layer : p.chunks)
        for (chunk_id c : layer) taken[c] = true;  // recover_tables checked c < capacity
  }
  m.free_list.clear();
  m.free_list.reserve(cap);
  for (uint64_t i = cap; i-- > 0;)
    if (!taken[i]) m.free_list.push_back(static_cast<chunk_id>(i));
  m.configured = true;
  return {};
}

// ---- persistence (persist=1) -----------------------------------------------------------------
// The page tables travel to the drive as opaque bytes: u32 n_sequences, then per sequence u64 name
// and per layer u32 n_tokens, u32 n_chunks, u32 chunk ids (host ids).
namespace {

void put_u32(std::vector<std::byte>& out, uint32_t v) {
  const auto* p = reinterpret_cast<const std::byte*>(&v);
  out.insert(out.end(), p, p + 4);
}

}  // namespace

status csd_backend::impl::commit(std::span<const persisted_sequence> sequences) noexcept {
  try {
    INSTINFER_TRY(lost_guard());
    csd_drive_slot& ds = drives.front();  // persist=1 has exactly one drive
    std::vector<std::byte> tables;
    std::vector<uint32_t> ids;
    std::vector<bool> named(capacity, false);
    put_u32(tables, static_cast<uint32_t>(sequences.size()));
    for (const persisted_sequence& p : sequences) {
      const auto* name = reinterpret_cast<const std::byte*>(&p.name);
      tables.insert(tables.end(), name, name + 8);
      for (size_t l = 0; l < p.chunks.size(); ++l) {
        put_u32(tables, p.n_tokens[l]);
        put_u32(tables, static_cast<uint32_t>(p.chunks[l].size()));
        for (chunk_id c : p.chunks[l]) {
          if (c >= capacity) return {errc::kInternal, "commit: chunk id out of range"};
          put_u32(tables, c);
          if (!named[c]) ids.push_back(static_cast<uint32_t>(ds.chunk_base + c));
          named[c] = true;
        }
      }
    }
    const uint64_t bytes = ids.size() * 4 + tables.size();
    if (bytes > ds.conn->area_bytes() || tables.size() > UINT32_MAX)
      return {errc::kNoSpace, "commit: " + std::to_string(bytes) + " bytes of tables exceed the drive's data area of " +
                                  std::to_string(ds.conn->area_bytes()) + " bytes (csd: option data_mb)"};
    return run_all([&](uint32_t, sq_entry& e) -> status {
      std::byte* p = ds.conn->area();
      if (!ids.empty()) std::memcpy(p, ids.data(), ids.size() * 4);
      std::memcpy(p + ids.size() * 4, tables.data(), tables.size());
      e.opcode = static_cast<uint8_t>(opcode::kCommit);
      e.data_bytes = static_cast<uint32_t>(bytes);
      set_args(e, commit_args{static_cast<uint32_t>(ids.size()), static_cast<uint32_t>(tables.size())});
      return {};
    });
  } catch (const std::bad_alloc&) {
    return {errc::kOutOfMemory, "commit: the page tables"};
  }
}

status csd_backend::impl::recover_tables() {
  csd_drive_slot& ds = drives.front();
  std::vector<std::byte> tables;
  uint64_t total = 0;
  do {
    sq_entry e{};
    e.opcode = static_cast<uint8_t>(opcode::kRecover);
    e.nsid = ds.nsid;
    e.result_bytes = static_cast<uint32_t>(std::min<uint64_t>(ds.conn->area_bytes(), UINT32_MAX));
    set_args(e, recover_args{tables.size()});
    INSTINFER_TRY(ds.conn->execute(e));
    const uint64_t got = ds.conn->last().result;
    if (got < 8) return {errc::kInternal, "recover: short reply"};
    std::memcpy(&total, ds.conn->area(), 8);
    tables.insert(tables.end(), ds.conn->area() + 8, ds.conn->area() + got);
    if (got == 8 && tables.size() < total) return {errc::kInternal, "recover: no progress"};
  } while (tables.size() < total);
  found = recovered_state{};
  if (tables.empty()) return {};  // a new store
  // The drive checked the file's checksum; these checks guard the host against a drive bug.
  const status bad{errc::kCorruptData, "csd: the page tables the drive recovered are inconsistent"};
  size_t off = 0;
  const auto get = [&](void* dst, size_t n) {
    if (tables.size() - off < n) return false;
    std::memcpy(dst, tables.data() + off, n);
    off += n;
    return true;
  };
  uint32_t n_seq = 0;
  if (!get(&n_seq, 4)) return bad;
  const uint32_t tpp = config.page.tokens_per_page;
  for (uint32_t i = 0; i < n_seq; ++i) {
    persisted_sequence p;
    if (!get(&p.name, 8) || p.name == 0) return bad;
    for (uint32_t l = 0; l < config.shape.n_layers; ++l) {
      uint32_t n_tokens = 0, n_chunks = 0;
      if (!get(&n_tokens, 4) || !get(&n_chunks, 4)) return bad;
      if (n_chunks != (uint64_t{n_tokens} + tpp - 1) / tpp || uint64_t{n_chunks} * 4 > tables.size() - off) return bad;
      std::vector<chunk_id> chunks(n_chunks);
      if (n_chunks && !get(chunks.data(), uint64_t{n_chunks} * 4)) return bad;
      for (chunk_id c : chunks)
        if (c >= capacity) return bad;
      p.n_tokens.push_back(n_tokens);
      p.chunks.push_back(std::move(chunks));
    }
    found.sequences.push_back(std::move(p));
  }
  if (off != tables.size()) return bad;
  std::vector<uint64_t> names;
  for (const persisted_sequence& p : found.sequences) names.push_back(p.name);
  std::sort(names.begin(), names.end());
  if (std::adjacent_find(names.begin(), names.end()) != names.end()) return bad;
  return {};
}

persistent_store* csd_backend::persistence() noexcept {
  return impl_->persist && impl_->configured ? impl_.get() : nullptr;
}

uint64_t csd_backend::capacity_chunks() const noexcept {
  return impl_->capacity;
}
uint64_t csd_backend::free_chunks() const noexcept {
  return impl_->free_list.size() + impl_->pending_release.size();
}

result<chunk_id> csd_backend::allocate_chunk(const chunk_hint&) noexcept {
  impl& m = *impl_;
  if (!m.configured) return status{errc::kInvalidArgument, "csd backend is not configured"};
  if (m.free_list.empty()) {
    try {
      INSTINFER_TRY(m.flush_releases());
    } catch (...) {
      return status{errc::kOutOfMemory, "reclaim"};
    }
  }
  if (m.free_list.empty())
    return status{errc::kOutOfPages, "all " + std::to_string(m.capacity) + " chunks of the csd namespace are in use"};
  const chunk_id id = m.free_list.back();
  m.free_list.pop_back();
  return id;
}

void csd_backend::release_chunk(chunk_id id) noexcept {
  impl& m = *impl_;
  if (id >= m.capacity) return;
  try {
    m.pending_release.push_back(id);
    if (m.pending_release.size() >= 4096) (void)m.flush_releases();
  } catch (...) {
  }
}

status csd_backend::reclaim() noexcept {
  try {
    INSTINFER_TRY(impl_->flush_releases());
    return impl_->run_all([&](uint32_t, sq_entry& e) -> status {
      e.opcode = static_cast<uint8_t>(opcode::kReclaim);
      reclaim_args a{};
      a.mode = static_cast<uint8_t>(reclaim_mode::kEraseOnly);
      set_args(e, a);
      return {};
    });
  } catch (...) {
    return {errc::kOutOfMemory, "reclaim"};
  }
}

status csd_backend::write_tokens(chunk_id id, const chunk_hint& hint, uint32_t first, uint32_t n, const std::byte* k,
                                 const std::byte* v) noexcept {
  impl& m = *impl_;
  if (!m.configured) return {errc::kInvalidArgument, "csd backend is not configured"};
  if (id >= m.capacity) return {errc::kInvalidArgument, "chunk id " + std::to_string(id) + " out of range"};
  if (!m.layout.fits(first, n))
    return {errc::kInvalidArgument, "write of tokens [" + std::to_string(first) + ", +" + std::to_string(n) +
                                        ") does not fit a chunk of " + std::to_string(m.layout.tokens())};
  if (!k || !v) return {errc::kInvalidArgument, "null K or V"};
  try {
    if (!m.pending_release.empty() &&
        std::find(m.pending_release.begin(), m.pending_release.end(), id) != m.pending_release.end())
      return {errc::kInvalidArgument, "chunk " + std::to_string(id) + " was released"};
    const uint32_t row = m.config.page.row_bytes();
    const uint32_t h_all = m.config.shape.n_kv_heads;
    INSTINFER_TRY(m.run_all([&](uint32_t d, sq_entry& e) -> status {
      const csd_drive_slot& ds = m.drives[d];
      const uint64_t slice = uint64_t{n} * ds.n_heads * row;
      const uint64_t bytes = 4 + 2 * slice;
      if (bytes > ds.conn->area_bytes()) return {errc::kInvalidArgument, "write larger than the data area"};
      std::byte* p = ds.conn->area();
      const uint32_t gid = static_cast<uint32_t>(ds.chunk_base + id);
      std::memcpy(p, &gid, 4);
      std::byte* kd = p + 4;
      std::byte* vd = kd + slice;
      for (uint32_t t = 0; t < n; ++t) {
        const uint64_t src = (uint64_t{t} * h_all + ds.head_begin) * row;
        const uint64_t dst = uint64_t{t} * ds.n_heads * row;
        std::memcpy(kd + dst, k + src, uint64_t{ds.n_heads} * row);
        std::memcpy(vd + dst, v + src, uint64_t{ds.n_heads} * row);
      }
      e.opcode = static_cast<uint8_t>(opcode::kWriteKv);
      e.data_bytes = static_cast<uint32_t>(bytes);
      write_kv_args a{};
      a.seq = hint.seq;
      a.layer = hint.layer;
      a.first_index = hint.index;
      a.first_token = first;
      a.n_tokens = n;
      a.n_chunks = 1;
      set_args(e, a);
      return {};
    }));
    m.note_position(hint.seq, hint.layer, hint.index, id);
    m.kv_bytes_appended += uint64_t{n} * m.config.shape.token_bytes_per_layer();
    return {};
  } catch (...) {
    return {errc::kOutOfMemory, "write_tokens"};
  }
}

status csd_backend::copy_tokens(chunk_id dst, const chunk_hint& hint, chunk_id src, uint32_t n) noexcept {
  impl& m = *impl_;
  if (!m.configured) return {errc::kInvalidArgument, "csd backend is not configured"};
  if (dst >= m.capacity || src >= m.capacity) return {errc::kInvalidArgument, "chunk id out of range"};
  try {
    INSTINFER_TRY(m.run_all([&](uint32_t d, sq_entry& e) -> status {
      e.opcode = static_cast<uint8_t>(opcode::kCopy);
      copy_args a{};
      a.seq = hint.seq;
      a.layer = hint.layer;
      a.index = hint.index;
      a.dst = static_cast<uint32_t>(m.drives[d].chunk_base + dst);
      a.src = static_cast<uint32_t>(m.drives[d].chunk_base + src);
      a.n_tokens = n;
      set_args(e, a);
      return {};
    }));
    m.note_position(hint.seq, hint.layer, hint.index, dst);
    return {};
  } catch (...) {
    return {errc::kOutOfMemory, "copy_tokens"};
  }
}

status csd_backend::read_chunk(chunk_id id, uint32_t n_tokens, std::byte* dst) noexcept {
  impl& m = *impl_;
  if (!m.configured) return {errc::kInvalidArgument, "csd backend is not configured"};
  if (id >= m.capacity) return {errc::kInvalidArgument, "chunk id out of range"};
  INSTINFER_TRY(m.run_all([&](uint32_t d, sq_entry& e) -> status {
    e.opcode = static_cast<uint8_t>(opcode::kRead);
    e.result_bytes = static_cast<uint32_t>(uint64_t{2} * m.drives[d].n_heads * m.page_bytes);
    set_args(e, read_args{static_cast<uint32_t>(m.drives[d].chunk_base + id), n_tokens});
    return {};
  }));
  const uint64_t page = m.page_bytes;
  for (const csd_drive_slot& ds : m.drives)
    for (uint32_t h = 0; h < ds.n_heads; ++h) {
      std::memcpy(dst + m.layout.page_offset(kv_kind::kKey, ds.head_begin + h), ds.conn->area() + h * page, page);
      std::memcpy(dst + m.layout.page_offset(kv_kind::kValue, ds.head_begin + h),
                  ds.conn->area() + (uint64_t{ds.n_heads} + h) * page, page);
    }
  return {};
}

status csd_backend::flush() noexcept {
  try {
    INSTINFER_TRY(impl_->lost_guard());
    std::lock_guard lock(impl_->stats_mutex);
    for (csd_drive_slot& d : impl_->drives) {
      sq_entry e{};
      e.opcode = static_cast<uint8_t>(opcode::kStats);  // control plane: no link bytes, no modelled time
      e.result_bytes = sizeof(device_stats);
      if (status s = d.conn->execute(e); !s.ok()) return {s.code(), "flush: " + s.message()};
    }
    return {};
  } catch (...) {
    return {errc::kOutOfMemory, "flush"};
  }
}

void csd_backend::on_sequence_freed(seq_id seq) noexcept {
  impl& m = *impl_;
  if (!m.configured) return;
  try {
    for (uint32_t l = 0; l < m.config.shape.n_layers; ++l) m.mirror.erase(seq_layer_key{seq, l});
    (void)m.flush_releases();
    (void)m.run_all([&](uint32_t, sq_entry& e) -> status {
      e.opcode = static_cast<uint8_t>(opcode::kReclaim);
      reclaim_args a{};
      a.mode = static_cast<uint8_t>(reclaim_mode::kSequence);
      a.seq = seq;
      set_args(e, a);
      return {};
    });
  } catch (...) {
  }
}

uint32_t csd_backend::n_drives() const noexcept {
  return static_cast<uint32_t>(impl_->drives.size());
}
int32_t csd_backend::device_pid(uint32_t d) const noexcept {
  return d < impl_->drives.size() ? impl_->drives[d].conn->device_pid() : -1;
}

status csd_backend::drive_stats(uint32_t d, device_stats& out) const noexcept {
  if (d >= impl_->drives.size()) return {errc::kInvalidArgument, "no such drive"};
  std::lock_guard lock(impl_->stats_mutex);
  connection& c = *impl_->drives[d].conn;
  sq_entry e{};
  e.opcode = static_cast<uint8_t>(opcode::kStats);
  e.result_bytes = sizeof(device_stats);
  INSTINFER_TRY(c.execute(e));
  std::memcpy(&out, c.area(), sizeof out);
  return {};
}

backend_stats csd_backend::stats() const noexcept {
  const impl& m = *impl_;
  backend_stats s{};
  s.capacity_chunks = m.capacity;
  s.used_chunks = m.capacity - m.free_list.size() - m.pending_release.size();
  s.kv_bytes_appended = m.kv_bytes_appended;
  s.modelled_device_seconds = m.modelled_ns * 1e-9;
  for (uint32_t d = 0; d < m.drives.size(); ++d) {
    s.link_bytes_host_to_device += m.drives[d].conn->link_bytes_in();
    s.link_bytes_device_to_host += m.drives[d].conn->link_bytes_out();
    device_stats ds{};
    if (!drive_stats(d, ds).ok()) continue;
    s.flash_pages_read += ds.flash_pages_read;
    s.flash_pages_programmed += ds.flash_pages_programmed;
    s.flash_pages_erased += ds.flash_pages_erased;
    s.device_bytes_written += ds.flash_pages_programmed * ds.page_bytes;
    s.device_bytes_read += ds.flash_pages_read * ds.page_bytes;
    s.modelled_flash_seconds = std::max(s.modelled_flash_seconds, ds.modelled_flash_ns * 1e-9);
    s.modelled_link_seconds = std::max(s.modelled_link_seconds, ds.modelled_link_ns * 1e-9);
    s.modelled_compute_seconds = std::max(s.modelled_compute_seconds, ds.modelled_compute_ns * 1e-9);
    s.modelled_program_seconds = std::max(s.modelled_program_seconds, ds.modelled_program_ns * 1e-9);
  }
  return s;
}

static_assert(kv_backend<csd_backend>);

}  // namespace instinfer
