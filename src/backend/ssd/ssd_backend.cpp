// The ssd:PATH backend: the `backend` interface over four components that share one device
// context (ssd_io: file, io_uring engine, staging pool):
//   slot_allocator   where chunks live on the device (extents per (sequence, layer) stream);
//   group_buffers    tails and sealed chunks in host memory, batched writes, flush;
//   page_reader      read_pages (SparF's page loads);
//   stream_decode    attend: the staging ring (prefetch), a chunk source of the decode driver.
// Each component completes its own I/O through its engine handler. This file checks the calls
// and routes them; it owns the order of teardown.
#include "instinfer/backend/ssd_backend.hpp"

#include <algorithm>
#include <cstring>

#include <liburing.h>
#include <sys/stat.h>
#include <unistd.h>

#include "group_buffers.hpp"
#include "instinfer/io/device_probe.hpp"
#include "page_reads.hpp"
#include "slot_allocator.hpp"
#include "ssd_io.hpp"
#include "store_meta.hpp"
#include "stream_decode.hpp"

namespace instinfer {

struct ssd_backend::impl final : persistent_store {
  ssd_backend_options options;
  backend_config config{};
  chunk_layout layout{};
  uint64_t chunk_bytes = 0;
  uint32_t request_chunks = 1;
  uint32_t n_slots = 0;
  uint32_t write_batch = 0;
  uint32_t preferred_page = 0;
  bool configured = false;

  // Declared in dependency order: destroyed users first, the device context last.
  ssd::ssd_io io;
  ssd::slot_allocator slots;
  ssd::group_buffers buffers;
  ssd::page_reader pages;
  ssd::stream_decode decode;

  // persist=1 (docs/persistence.md): checksums of the chunks on the device, the committed
  // metadata's generation and chunks, and the slots released since that commit (reused only after
  // the next one: a crash must find what the last commit references unchanged).
  ssd::chunk_sums sums;
  std::string meta_path;
  uint64_t generation = 0;
  std::vector<uint8_t> committed;  // per slot: referenced by the last commit
  std::vector<chunk_id> deferred;  // released, still referenced by the last commit
  recovered_state found;

  explicit impl(ssd_backend_options o) : options(std::move(o)) {}
  ~impl();
  status commit(std::span<const persisted_sequence> sequences) noexcept override;
  const recovered_state& recovered() const noexcept override { return found; }
  void forget_recovered() noexcept override { found = recovered_state{}; }
  ssd::meta_geometry geometry() const noexcept;
  status open_metadata(uint64_t& capacity_bytes, std::vector<std::byte>& meta, ssd::meta_header& header,
                       bool& have_meta);
  status recover(std::span<const std::byte> meta, const ssd::meta_header& header);
  status check_chunk(chunk_id id, const char* what) const noexcept;
  // rows: q and out must be set (attend); a prefetch carries the chunks only.
  status check_batch(const attend_batch& batch, bool rows = true) const noexcept;
  status open_engine(uint64_t staging_bytes);
};

ssd_backend::impl::~impl() {
  if (configured) decode.ring().cancel_prefetch();
  io.close();
  if (!io.has_file()) return;
  // Only a file this backend created is removed (never one that was there before, never a block
  // device), while its descriptor still holds the lock: no other cache can be using it.
  if (!options.keep_file) io.remove_file_if_created();
}

bool ssd_backend::available() noexcept {
  static const bool ok = [] {
    io_uring ring{};
    if (io_uring_queue_init(1, &ring, 0) != 0) return false;
    io_uring_queue_exit(&ring);
    return true;
  }();
  return ok;
}

// ---- lifetime and configuration ------------------------------------------------------------

ssd_backend::ssd_backend(ssd_backend_options options) : impl_(std::make_unique<impl>(std::move(options))) {}

ssd_backend::~ssd_backend() = default;

uint32_t ssd_backend::preferred_page_bytes() const noexcept {
  if (impl_->preferred_page == 0) {
    impl_->preferred_page = page_geometry::kDefaultPageBytes;
    try {
      auto p = probe_device(impl_->options.path);
      if (p.ok()) impl_->preferred_page = p->page_bytes;
    } catch (...) {
    }
  }
  return impl_->preferred_page;
}

status ssd_backend::impl::open_engine(uint64_t staging_bytes) {
  io::engine_options eo;
  eo.queue_depth = options.queue_depth;
  eo.staging_bytes = staging_bytes;
  eo.register_staging = options.register_buffers;
  eo.single_issuer = options.single_issuer;
  eo.sqpoll = options.sqpoll;
  eo.iopoll = options.iopoll;
  return io.open(eo, chunk_bytes);
}

status ssd_backend::configure(const backend_config& config) {
  auto& m = *impl_;
  if (m.configured) return {errc::kInvalidArgument, "ssd backend: configure called twice"};
  INSTINFER_TRY(config.shape.validate());
  if (page_geometry::check(config.page.page_bytes, config.page.head_dim, config.page.kv_dtype) != errc::kOk ||
      config.page.head_dim != config.shape.head_dim || config.page.kv_dtype != config.shape.kv_dtype)
    return {errc::kInvalidArgument, "ssd backend: page geometry does not match the shape"};
  m.config = config;
  m.layout = config.layout();
  m.chunk_bytes = m.layout.chunk_bytes();

  auto f = io::open_storage_file(m.options.path, io::storage_open_options{true, m.options.buffered, true});
  if (!f.ok()) return f.error();
  m.io.adopt(std::move(f.value()));
  const auto& file = m.io.file();
  if (m.chunk_bytes % file.offset_align != 0)
    return {errc::kInvalidArgument, "ssd backend: page_bytes " + std::to_string(config.page.page_bytes) +
                                        " makes a chunk of " + std::to_string(m.chunk_bytes) +
                                        " bytes (2 x n_kv_heads pages), not a multiple of the device's direct-I/O "
                                        "alignment (" +
                                        std::to_string(file.offset_align) + " bytes); use larger pages"};
  uint64_t capacity_bytes = m.options.capacity_bytes ? m.options.capacity_bytes : config.capacity_bytes;
  std::vector<std::byte> meta;
  ssd::meta_header header;
  bool have_meta = false;
  if (m.options.persist) {
    INSTINFER_TRY(m.open_metadata(capacity_bytes, meta, header, have_meta));
  } else if (!file.created && !file.block_device) {
    // Without persist=1 every slot counts as free and would be overwritten under the metadata.
    struct stat st {};
    const std::string meta_path = m.options.path + ".meta";
    if (::lstat(meta_path.c_str(), &st) == 0)
      return {errc::kInvalidArgument, "ssd backend: '" + m.options.path + "' holds a persistent store ('" + meta_path +
                                          "' exists): open it with persist=1, or remove both files to reuse the path"};
  }
  auto capacity = m.io.size_file(capacity_bytes, m.chunk_bytes, m.options.preallocate);
  if (!capacity.ok()) return capacity.error();
  if (have_meta && capacity.value() != header.geometry.capacity_chunks)
    return {errc::kInternal, "ssd store: capacity " + std::to_string(capacity.value()) +
                                 " chunks does not match the metadata's " +
                                 std::to_string(header.geometry.capacity_chunks)};

  // Requests shrink to fit two in the staging ring before the ring grows past what was asked.
  const uint64_t request_cap = std::min(m.options.request_bytes, m.options.staging_bytes / 2);
  m.request_chunks = static_cast<uint32_t>(std::max<uint64_t>(1, request_cap / m.chunk_bytes));
  const uint64_t request = m.request_chunks * m.chunk_bytes;
  const uint64_t staging = std::max<uint64_t>(m.options.staging_bytes / request, 2) * request;
  m.n_slots = static_cast<uint32_t>(staging / request);
  m.write_batch = m.options.write_batch ? m.options.write_batch : m.options.queue_depth;

  INSTINFER_TRY(m.open_engine(staging));
  INSTINFER_TRY(m.slots.configure(
      {capacity.value(), m.chunk_bytes, file.block_device ? -1 : file.fd, m.options.preallocate, m.options.path}));
  m.sums.configure(m.layout);
  ssd::chunk_sums* sums = m.options.persist ? &m.sums : nullptr;
  INSTINFER_TRY(m.buffers.configure(m.io, m.layout, m.write_batch, sums));
  uint64_t read_gap = m.options.read_gap_bytes;
  if (read_gap == ssd_backend_options::kAutoReadGap) {  // from what the probe says the device is
    auto probe = probe_device(m.options.path);
    read_gap = ssd::merge_gap_bytes(ssd::modelled_read_costs(probe.ok() ? &probe.value() : nullptr));
  }
  INSTINFER_TRY(m.pages.configure(m.io, m.slots, m.buffers, sums, m.layout, request_bytes(), read_gap));
  INSTINFER_TRY(m.decode.configure(m.io, m.buffers, sums, config, m.layout, m.request_chunks, m.n_slots));
  if (m.options.persist) {
    try {
      m.committed.assign(m.slots.capacity(), 0);
    } catch (const std::bad_alloc&) {
      return {errc::kOutOfMemory, "ssd store: commit map"};
    }
    if (have_meta) INSTINFER_TRY(m.recover(meta, header));
  }
  m.configured = true;
  return {};
}

// ---- persistence (persist=1) -----------------------------------------------------------------

ssd::meta_geometry ssd_backend::impl::geometry() const noexcept {
  ssd::meta_geometry g;
  g.capacity_chunks = slots.capacity();
  g.chunk_bytes = chunk_bytes;
  g.page_bytes = layout.page.page_bytes;
  g.tokens_per_page = layout.tokens();
  g.n_layers = config.shape.n_layers;
  g.n_kv_heads = config.shape.n_kv_heads;
  g.head_dim = config.shape.head_dim;
  g.dtype = static_cast<uint32_t>(config.shape.kv_dtype);
  return g;
}

// Reads PATH.meta of a store this open did not create; its capacity replaces the asked one (a
// default capacity depends on the free space of the day).
status ssd_backend::impl::open_metadata(uint64_t& capacity_bytes, std::vector<std::byte>& meta,
                                        ssd::meta_header& header, bool& have_meta) {
  const auto& file = io.file();
  if (file.block_device)
    return {errc::kUnsupported, "ssd backend: persist=1 needs a regular file ('" + options.path +
                                    "' is a block device: there is no place for its metadata beside it)"};
  meta_path = options.path + ".meta";
  if (file.created) return ssd::remove_meta_file(meta_path);  // metadata of a store whose data is gone
  INSTINFER_TRY(ssd::read_meta_file(meta_path, meta, have_meta));
  if (!have_meta) return {};
  auto h = ssd::decode_meta_header(meta);
  if (!h.ok()) {
    const status& e = h.error();
    return {e.code(), e.message() + " ('" + meta_path + "'; remove it and '" + options.path + "' to start over)"};
  }
  header = h.value();
  ssd::meta_geometry want = geometry();
  want.capacity_chunks = header.geometry.capacity_chunks;
  const ssd::meta_geometry& got = header.geometry;
  if (got.chunk_bytes != want.chunk_bytes || got.page_bytes != want.page_bytes ||
      got.tokens_per_page != want.tokens_per_page || got.n_layers != want.n_layers ||
      got.n_kv_heads != want.n_kv_heads || got.head_dim != want.head_dim || got.dtype != want.dtype)
    return {errc::kInvalidArgument, "ssd store '" + options.path + "' was made for " + std::to_string(got.n_layers) +
                                        " layers, " + std::to_string(got.n_kv_heads) + " kv heads, head_dim " +
                                        std::to_string(got.head_dim) + ", dtype " + std::to_string(got.dtype) + ", " +
                                        std::to_string(got.page_bytes) + "-byte pages; this cache asks for " +
                                        std::to_string(want.n_layers) + ", " + std::to_string(want.n_kv_heads) + ", " +
                                        std::to_string(want.head_dim) + ", " + std::to_string(want.dtype) + ", " +
                                        std::to_string(want.page_bytes)};
  if (got.capacity_chunks == 0 || got.capacity_chunks > UINT32_MAX - 1)
    return {errc::kCorruptData, "ssd store metadata: capacity of " + std::to_string(got.capacity_chunks) + " chunks"};
  capacity_bytes = got.capacity_chunks * chunk_bytes;
  return {};
}

status ssd_backend::impl::recover(std::span<const std::byte> meta, const ssd::meta_header& header) {
  INSTINFER_TRY(ssd::decode_meta_records(meta, header, sums, found));
  // Exactly the chunks the intact records reference are allocated: nothing leaks, nothing a
  // damaged record alone referenced stays taken.
  for (const auto& s : found.sequences)
    for (const auto& layer : s.chunks)
      for (chunk_id id : layer) {
        slots.adopt(id);  // false for a chunk another record shares: already taken
        committed[id] = 1;
      }
  generation = header.generation;
  return {};
}

status ssd_backend::impl::commit(std::span<const persisted_sequence> sequences) noexcept {
  if (!configured) return {errc::kInvalidArgument, "ssd backend is not configured"};
  INSTINFER_TRY(io.check_thread());
  for (const auto& s : sequences)
    for (const auto& layer : s.chunks)
      for (chunk_id id : layer)
        if (!slots.allocated(id))
          return {errc::kInvalidArgument, "ssd store: commit names unallocated chunk " + std::to_string(id)};
  // Data (and its checksums) first: no committed record ever points at unwritten data.
  INSTINFER_TRY(buffers.flush());
  std::vector<std::byte> bytes;
  INSTINFER_TRY(ssd::encode_meta(generation + 1, geometry(), sequences, sums, bytes));
  INSTINFER_TRY(ssd::write_meta_file(meta_path, bytes));
  ++generation;
  // The new commit is the one a crash finds: slots only the old one referenced are free now.
  std::fill(committed.begin(), committed.end(), 0);
  for (const auto& s : sequences)
    for (const auto& layer : s.chunks)
      for (chunk_id id : layer) committed[id] = 1;
  for (chunk_id id : deferred) {
    slots.release(id);
    sums.erase(id);
  }
  deferred.clear();
  return {};
}

persistent_store* ssd_backend::persistence() noexcept {
  return impl_->options.persist && impl_->configured ? impl_.get() : nullptr;
}

std::string ssd_backend::describe() const {
  const auto& m = *impl_;
  std::string s = "ssd:" + m.options.path;
  if (!m.configured) return s + " (not configured)";
  s += m.io.file().direct ? " O_DIRECT" : " buffered";
  s += " chunk=" + std::to_string(m.chunk_bytes) + "B request=" + std::to_string(request_bytes()) +
       "B staging=" + std::to_string(uint64_t{m.n_slots} * request_bytes()) + "B slots=" + std::to_string(m.n_slots) +
       " capacity=" + std::to_string(m.slots.capacity()) + " chunks extent=" + std::to_string(m.slots.extent_chunks()) +
       " chunks write_batch=" + std::to_string(m.write_batch) + " io[" + m.io.engine().features().describe() + "]";
  return s;
}

uint64_t ssd_backend::host_memory_bytes() const noexcept {
  const auto& m = *impl_;
  return m.decode.ring().memory_bytes() + m.buffers.memory_bytes() + m.slots.memory_bytes() + m.pages.memory_bytes() +
         m.sums.memory_bytes() + m.committed.capacity() + m.deferred.capacity() * sizeof(chunk_id);
}

void ssd_backend::inject_fault(const ssd_fault& fault) noexcept {
  if (!impl_->io.is_open()) return;
  io::fault_plan p;
  p.op = static_cast<io::io_op>(fault.kind);
  p.nth = fault.nth;
  p.error_errno = fault.error_errno;
  p.short_bytes = fault.short_bytes;
  impl_->io.engine().set_fault(p);
}

uint64_t ssd_backend::capacity_chunks() const noexcept {
  return impl_->slots.capacity();
}
uint64_t ssd_backend::free_chunks() const noexcept {
  return impl_->slots.free_count();
}
uint32_t ssd_backend::buffered_chunks() const noexcept {
  return impl_->buffers.count();
}
uint64_t ssd_backend::chunk_offset(chunk_id id) const noexcept {
  return uint64_t{id} * impl_->chunk_bytes;
}
uint64_t ssd_backend::request_bytes() const noexcept {
  return impl_->request_chunks * impl_->chunk_bytes;
}
uint32_t ssd_backend::queue_depth() const noexcept {
  return impl_->options.queue_depth;
}
const std::string& ssd_backend::path() const noexcept {
  return impl_->options.path;
}

backend_stats ssd_backend::stats() const noexcept {
  const auto& m = *impl_;
  backend_stats s;
  s.capacity_chunks = m.slots.capacity();
  s.used_chunks = m.slots.capacity() - m.slots.free_count();
  s.kv_bytes_appended = m.buffers.kv_bytes_appended();
  s.device_bytes_written = m.io.bytes_written;
  s.device_bytes_read = m.io.bytes_read;
  s.device_read_requests = m.io.read_requests;
  s.device_reads_prefetched = m.io.prefetched_requests;
  return s;
}

// ---- checks ----------------------------------------------------------------------------------

status ssd_backend::impl::check_chunk(chunk_id id, const char* what) const noexcept {
  if (!configured) return {errc::kInvalidArgument, "ssd backend is not configured"};
  if (!slots.allocated(id))
    return {errc::kInvalidArgument, std::string(what) + ": chunk " + std::to_string(id) + " is not allocated"};
  return {};
}

status ssd_backend::impl::check_batch(const attend_batch& batch, bool rows) const noexcept {
  const uint32_t tpp = layout.tokens();
  for (size_t b = 0; b < batch.size(); ++b) {
    const auto& it = batch[b];
    const uint64_t need = (uint64_t{it.n_tokens} + tpp - 1) / tpp;
    if (it.chunks.size() != need)
      return {errc::kInvalidArgument, "attend: item " + std::to_string(b) + " has " + std::to_string(it.n_tokens) +
                                          " tokens but " + std::to_string(it.chunks.size()) + " chunks"};
    if (rows && (!it.q || !it.out))
      return {errc::kInvalidArgument, "attend: item " + std::to_string(b) + " has a null q or out"};
    for (chunk_id id : it.chunks)
      if (!slots.allocated(id))
        return {errc::kInvalidArgument,
                "attend: item " + std::to_string(b) + " names unallocated chunk " + std::to_string(id)};
  }
  return {};
}

// ---- slots -----------------------------------------------------------------------------------

result<chunk_id> ssd_backend::allocate_chunk(const chunk_hint& hint) noexcept {
  if (!impl_->configured) return status{errc::kInvalidArgument, "ssd backend is not configured"};
  return impl_->slots.allocate(hint.seq, hint.layer, hint.stream);
}

void ssd_backend::release_chunk(chunk_id id) noexcept {
  auto& m = *impl_;
  if (!m.configured || !m.slots.allocated(id)) return;
  // A prefetched read of this slot would be stale once it is reused: drop it, or, when another
  // thread owns the ring's reads, make sure it is never adopted.
  if (m.io.check_thread().ok())
    m.decode.ring().cancel_prefetch();
  else
    m.decode.ring().poison_prefetch();
  m.buffers.drop(id);
  if (m.options.persist && m.committed[id]) {
    // The last commit still references it: free only after the next commit.
    try {
      m.deferred.push_back(id);
      m.committed[id] = 0;  // pushed once
    } catch (...) {
      // Stays allocated until the store is reopened (space, never data, is what is lost).
    }
    return;
  }
  m.sums.erase(id);
  m.slots.release(id);
}

void ssd_backend::on_sequence_freed(seq_id seq) noexcept {
  impl_->slots.on_sequence_freed(seq, impl_->config.shape.n_layers);
}

// ---- KV in and out ---------------------------------------------------------------------------

status ssd_backend::write_tokens(chunk_id id, const chunk_hint& /*hint*/, uint32_t first, uint32_t n,
                                 const std::byte* k, const std::byte* v) noexcept {
  auto& m = *impl_;
  INSTINFER_TRY(m.io.check_thread());
  INSTINFER_TRY(m.check_chunk(id, "write_tokens"));
  if (n == 0) return {};
  if (!k || !v) return {errc::kInvalidArgument, "write_tokens: null K or V"};
  if (!m.layout.fits(first, n))
    return {errc::kInvalidArgument, "write_tokens: tokens [" + std::to_string(first) + ", " +
                                        std::to_string(uint64_t{first} + n) + ") exceed a chunk of " +
                                        std::to_string(m.layout.tokens())};
  return m.buffers.append(id, first, n, k, v);
}

status ssd_backend::write_chunk(chunk_id id, const chunk_hint& /*hint*/, const std::byte* chunk) noexcept {
  auto& m = *impl_;
  INSTINFER_TRY(m.io.check_thread());
  INSTINFER_TRY(m.check_chunk(id, "write_chunk"));
  if (!chunk) return {errc::kInvalidArgument, "write_chunk: null source"};
  return m.buffers.write_whole(id, chunk);
}

status ssd_backend::copy_tokens(chunk_id dst, const chunk_hint& /*dst_hint*/, chunk_id src, uint32_t n) noexcept {
  auto& m = *impl_;
  INSTINFER_TRY(m.io.check_thread());
  INSTINFER_TRY(m.check_chunk(dst, "copy_tokens (destination)"));
  INSTINFER_TRY(m.check_chunk(src, "copy_tokens (source)"));
  if (!m.layout.fits(0, n))
    return {errc::kInvalidArgument,
            "copy_tokens: n must be in [1, " + std::to_string(m.layout.tokens()) + "], got " + std::to_string(n)};
  if (dst == src) return {errc::kInvalidArgument, "copy_tokens: source and destination are the same chunk"};
  return m.buffers.copy(dst, src, n);
}

status ssd_backend::read_chunk(chunk_id id, uint32_t n_tokens, std::byte* dst) noexcept {
  auto& m = *impl_;
  INSTINFER_TRY(m.io.check_thread());
  INSTINFER_TRY(m.check_chunk(id, "read_chunk"));
  if (!dst) return {errc::kInvalidArgument, "read_chunk: null destination"};
  if (n_tokens > m.layout.tokens())
    return {errc::kInvalidArgument, "read_chunk: " + std::to_string(n_tokens) + " tokens exceed a chunk"};
  if (const std::byte* buffered = m.buffers.find(id)) {
    std::memcpy(dst, buffered, m.chunk_bytes);
    return {};
  }
  m.io.claim_staging();
  std::byte* staging = m.io.staging();
  INSTINFER_TRY(m.io.read_sync(staging, static_cast<uint32_t>(m.chunk_bytes), m.io.chunk_offset(id)));
  m.io.bytes_read += m.chunk_bytes;
  if (m.options.persist) INSTINFER_TRY(m.sums.verify_chunk(id, staging, m.options.path));
  std::memcpy(dst, staging, m.chunk_bytes);
  return {};
}

status ssd_backend::read_pages(std::span<const page_read> reads) noexcept {
  if (!impl_->configured) return {errc::kInvalidArgument, "ssd backend is not configured"};
  INSTINFER_TRY(impl_->io.check_thread());
  return impl_->pages.read(reads);
}

status ssd_backend::flush() noexcept {
  if (!impl_->configured) return {};
  INSTINFER_TRY(impl_->io.check_thread());
  return impl_->buffers.flush();
}

// ---- decode ----------------------------------------------------------------------------------

void ssd_backend::prefetch(uint32_t layer, const attend_batch& batch) noexcept {
  auto& m = *impl_;
  if (!m.configured || layer >= m.config.shape.n_layers || !m.io.check_thread().ok()) return;
  m.decode.ring().cancel_prefetch();
  if (!m.check_batch(batch, /*rows=*/false).ok()) return;
  m.decode.ring().prefetch(layer, batch);
}

status ssd_backend::attend(uint32_t layer, const attend_batch& batch) noexcept {
  auto& m = *impl_;
  if (!m.configured) return {errc::kInvalidArgument, "ssd backend is not configured"};
  INSTINFER_TRY(m.io.check_thread());
  if (layer >= m.config.shape.n_layers)
    return {errc::kLayerOutOfRange,
            "attend: layer " + std::to_string(layer) + " >= " + std::to_string(m.config.shape.n_layers)};
  if (status s = m.check_batch(batch); !s.ok()) {
    m.decode.ring().cancel_prefetch();
    return s;
  }
  return m.decode.attend(layer, batch);
}

}  // namespace instinfer
