#include "instinfer/backend/ssd_backend.hpp"

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <new>

#include <fcntl.h>
#include <liburing.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include "instinfer/attention/state.hpp"
#include "instinfer/io/device_probe.hpp"
#include "io/uring_engine.hpp"

namespace instinfer {

namespace {

// Completion tags (top two bits of user_data).
constexpr uint64_t kTagPage = 0ull << 62;   // | page run of read_pages
constexpr uint64_t kTagRead = 1ull << 62;   // | ring slot
constexpr uint64_t kTagWrite = 2ull << 62;  // | group buffer index
constexpr uint64_t kTagSync = 3ull << 62;   // a synchronous helper read or fsync
constexpr uint64_t kTagMask = 3ull << 62;

constexpr uint8_t kSlotFree = 0, kSlotInFlight = 1, kSlotDone = 2;
constexpr int32_t kShortTransfer = INT32_MIN;  // stored result of a transfer that moved too few bytes

constexpr uint64_t kDefaultMaxCapacity = 64ull << 30;
constexpr uint64_t kExtentBytes = 4ull << 20;    // a stream's contiguous run on the device
constexpr uint64_t kMaxWriteBytes = 4ull << 20;  // largest gathered write

uint64_t stream_key(seq_id seq, uint32_t layer) noexcept {
  return (seq << 12) ^ layer;
}

}  // namespace

// ---- options -------------------------------------------------------------------------------

result<ssd_backend_options> ssd_backend_options::from_uri(const backend_uri& uri) {
  if (uri.scheme != "ssd") return status{errc::kInvalidArgument, "not an ssd URI (scheme '" + uri.scheme + "')"};
  if (uri.path.empty())
    return status{errc::kInvalidArgument, "ssd backend needs a path: ssd:/path/to/file?queue_depth=32"};
  static constexpr std::string_view kKeys[] = {"queue_depth",   "staging",  "request",     "capacity",
                                               "write_batch",   "buffered", "sqpoll",      "iopoll",
                                               "single_issuer", "register", "preallocate", "keep"};
  for (const auto& [key, value] : uri.options) {
    if (std::find(std::begin(kKeys), std::end(kKeys), key) == std::end(kKeys))
      return status{errc::kInvalidArgument, "unknown ssd option '" + key +
                                                "' (known: queue_depth staging request capacity write_batch buffered "
                                                "sqpoll iopoll single_issuer register preallocate keep)"};
  }
  ssd_backend_options o;
  o.path = uri.path;
  auto qd = uri.option_u64("queue_depth", o.queue_depth);
  if (!qd.ok()) return qd.error();
  if (qd.value() == 0 || qd.value() > 4096)
    return status{errc::kInvalidArgument, "queue_depth must be in [1, 4096], got " + std::to_string(qd.value())};
  o.queue_depth = static_cast<uint32_t>(qd.value());
  auto staging = uri.option_u64("staging", o.staging_bytes);
  if (!staging.ok()) return staging.error();
  if (staging.value() == 0 || staging.value() % 4096 != 0 || staging.value() > (1ull << 30))
    return status{errc::kInvalidArgument,
                  "staging must be a non-zero multiple of 4096 bytes up to 1G, got " + std::to_string(staging.value())};
  o.staging_bytes = staging.value();
  auto req = uri.option_u64("request", o.request_bytes);
  if (!req.ok()) return req.error();
  if (req.value() < 4096 || req.value() > (64ull << 20))
    return status{errc::kInvalidArgument, "request must be in [4K, 64M], got " + std::to_string(req.value())};
  o.request_bytes = req.value();
  auto cap = uri.option_u64("capacity", 0);
  if (!cap.ok()) return cap.error();
  o.capacity_bytes = cap.value();
  auto wb = uri.option_u64("write_batch", 0);
  if (!wb.ok()) return wb.error();
  if (wb.value() > 65536)
    return status{errc::kInvalidArgument, "write_batch must be at most 65536, got " + std::to_string(wb.value())};
  o.write_batch = static_cast<uint32_t>(wb.value());
  o.buffered = uri.option_bool("buffered", false);
  o.sqpoll = uri.option_bool("sqpoll", false);
  o.iopoll = uri.option_bool("iopoll", false);
  o.single_issuer = uri.option_bool("single_issuer", true);
  o.register_buffers = uri.option_bool("register", true);
  o.preallocate = uri.option_bool("preallocate", false);
  o.keep_file = uri.option_bool("keep", false);
  return o;
}

result<std::unique_ptr<backend>> make_ssd_backend(const backend_uri& uri) {
  auto o = ssd_backend_options::from_uri(uri);
  if (!o.ok()) return o.error();
  std::unique_ptr<backend> b(new (std::nothrow) ssd_backend(std::move(o.value())));
  if (!b) return status{errc::kOutOfMemory, "ssd backend"};
  return b;
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

ssd_backend::ssd_backend(ssd_backend_options options) : options_(std::move(options)) {}

ssd_backend::~ssd_backend() {
  if (engine_) {
    cancel_prefetch();
    engine_->drain();
    engine_.reset();
  }
  for (auto& b : buffers_) std::free(b.data);
  if (file_ && file_->created && !file_->block_device && !options_.keep_file) ::unlink(file_->path.c_str());
  file_.reset();
}

uint32_t ssd_backend::preferred_page_bytes() const noexcept {
  if (preferred_page_ == 0) {
    preferred_page_ = page_geometry::kDefaultPageBytes;
    try {
      auto p = probe_device(options_.path);
      if (p.ok()) preferred_page_ = p->page_bytes;
    } catch (...) {
    }
  }
  return preferred_page_;
}

status ssd_backend::configure(const backend_config& config) {
  if (configured_) return {errc::kInvalidArgument, "ssd backend: configure called twice"};
  INSTINFER_TRY(config.shape.validate());
  if (page_geometry::check(config.page.page_bytes, config.page.head_dim, config.page.kv_dtype) != errc::kOk ||
      config.page.head_dim != config.shape.head_dim || config.page.kv_dtype != config.shape.kv_dtype)
    return {errc::kInvalidArgument, "ssd backend: page geometry does not match the shape"};
  config_ = config;
  layout_ = config.layout();
  chunk_bytes_ = layout_.chunk_bytes();

  auto f = io::open_storage_file(options_.path, true, options_.buffered);
  if (!f.ok()) return f.error();
  file_ = std::make_unique<io::storage_file>(std::move(f.value()));
  if (chunk_bytes_ % file_->offset_align != 0)
    return {errc::kUnsupported, "ssd backend: a chunk of " + std::to_string(chunk_bytes_) +
                                    " bytes is not a multiple of the device's direct-I/O alignment (" +
                                    std::to_string(file_->offset_align) + " bytes); use larger pages"};

  uint64_t cap = options_.capacity_bytes ? options_.capacity_bytes : config.capacity_bytes;
  if (cap == 0) {
    if (file_->block_device) {
      cap = file_->size_bytes;
    } else {
      struct statvfs vfs {};
      cap = kDefaultMaxCapacity;
      if (::fstatvfs(file_->fd, &vfs) == 0) {
        const uint64_t avail = static_cast<uint64_t>(vfs.f_bavail) * vfs.f_frsize / 10 * 9 + file_->size_bytes;
        cap = std::min(cap, avail);
      }
    }
  }
  if (file_->block_device && cap > file_->size_bytes)
    return {errc::kInvalidArgument, "ssd backend: capacity " + std::to_string(cap) + " exceeds the device (" +
                                        std::to_string(file_->size_bytes) + " bytes)"};
  capacity_chunks_ = std::min<uint64_t>(cap / chunk_bytes_, UINT32_MAX - 1);
  if (capacity_chunks_ == 0)
    return {errc::kInvalidArgument, "ssd backend: capacity " + std::to_string(cap) +
                                        " bytes is smaller than one chunk (" + std::to_string(chunk_bytes_) + ")"};
  const uint64_t file_bytes = capacity_chunks_ * chunk_bytes_;
  if (!file_->block_device) {
    if (options_.preallocate) {
      const int rc = ::posix_fallocate(file_->fd, 0, static_cast<off_t>(file_bytes));
      if (rc != 0) return io::errno_status(rc, "ssd backend: preallocating " + std::to_string(file_bytes) + " bytes");
    } else if (file_->size_bytes < file_bytes) {
      // Sparse: the file has its final size, so appends never extend it (cheaper direct writes).
      if (::ftruncate(file_->fd, static_cast<off_t>(file_bytes)) != 0)
        return io::errno_status(errno, "ssd backend: sizing '" + options_.path + "'");
    }
  }

  // Requests shrink to fit two in the staging ring before the ring grows past what was asked.
  const uint64_t request_cap = std::min(options_.request_bytes, options_.staging_bytes / 2);
  request_chunks_ = static_cast<uint32_t>(std::max<uint64_t>(1, request_cap / chunk_bytes_));
  const uint64_t request = request_chunks_ * chunk_bytes_;
  const uint64_t staging = std::max<uint64_t>(options_.staging_bytes / request, 2) * request;
  n_slots_ = static_cast<uint32_t>(staging / request);
  write_batch_ = options_.write_batch ? options_.write_batch : options_.queue_depth;

  io::engine_options eo;
  eo.queue_depth = options_.queue_depth;
  eo.staging_bytes = staging;
  eo.register_staging = options_.register_buffers;
  eo.single_issuer = options_.single_issuer;
  eo.sqpoll = options_.sqpoll;
  eo.iopoll = options_.iopoll;
  auto e = io::uring_engine::create(eo);
  if (!e.ok()) return e.error();
  engine_ = std::move(e.value());
  auto h = engine_->add_file(file_->fd);
  if (!h.ok()) return h.error();
  file_handle_ = h.value();

  params_.layout = layout_;
  params_.group_size = config.shape.group_size();
  params_.scale = config.scale;
  params_.softcap = config.softcap;
  INSTINFER_TRY(params_.validate());
  auto k = select_decode_kernel(best_cpu_isa(), params_);
  if (!k.ok()) return k.error();
  kernel_ = k.value();

  extent_chunks_ = static_cast<uint32_t>(std::clamp<uint64_t>(kExtentBytes / chunk_bytes_, 1, capacity_chunks_));
  const uint64_t n_extents = (capacity_chunks_ + extent_chunks_ - 1) / extent_chunks_;
  allocated_.assign(capacity_chunks_, 0);
  extent_used_.assign(n_extents, 0);
  extent_owned_.assign(n_extents, 0);
  extent_reserved_.assign(n_extents, options_.preallocate ? 1 : 0);
  fallocate_ok_ = !file_->block_device;
  free_extents_.clear();
  for (uint64_t i = n_extents; i-- > 0;) free_extents_.push_back(static_cast<uint32_t>(i));
  free_count_ = capacity_chunks_;
  slots_.assign(n_slots_, ring_slot{});
  const uint32_t g = params_.group_size, d = config.shape.head_dim;
  tmp_o_.assign(size_t{g} * d, 0.0f);
  tmp_stats_.assign(g, softmax_stats{});
  ptrs_.reserve(64);
  stats_ = {};
  stats_.capacity_chunks = capacity_chunks_;
  configured_ = true;
  return {};
}

std::string ssd_backend::describe() const {
  std::string s = "ssd:" + options_.path;
  if (!configured_) return s + " (not configured)";
  s += file_->direct ? " O_DIRECT" : " buffered";
  s += " chunk=" + std::to_string(chunk_bytes_) + "B request=" + std::to_string(request_bytes()) +
       "B staging=" + std::to_string(uint64_t{n_slots_} * request_bytes()) + "B slots=" + std::to_string(n_slots_) +
       " capacity=" + std::to_string(capacity_chunks_) + " chunks extent=" + std::to_string(extent_chunks_) +
       " chunks write_batch=" + std::to_string(write_batch_) + " io[" + engine_->features().describe() + "]";
  return s;
}

uint64_t ssd_backend::host_memory_bytes() const noexcept {
  uint64_t bytes = uint64_t{n_slots_} * request_bytes() + buffer_bytes_;
  bytes += allocated_.capacity() + extent_used_.capacity() * 4 + extent_owned_.capacity() +
           free_extents_.capacity() * 4 + plan_.capacity() * sizeof(read_request) +
           prefetch_plan_.capacity() * sizeof(read_request) + page_order_.capacity() * 4 +
           page_runs_.capacity() * sizeof(page_run) + buffer_of_.size() * 32 + streams_.size() * 48;
  return bytes;
}

void ssd_backend::inject_fault(const ssd_fault& fault) noexcept {
  if (!engine_) return;
  io::fault_plan p;
  p.op = static_cast<io::io_op>(fault.kind);
  p.nth = fault.nth;
  p.error_errno = fault.error_errno;
  p.short_bytes = fault.short_bytes;
  engine_->set_fault(p);
}

// ---- slot allocation -----------------------------------------------------------------------

result<chunk_id> ssd_backend::allocate_chunk(const chunk_hint& hint) noexcept {
  if (!configured_) return status{errc::kInvalidArgument, "ssd backend is not configured"};
  if (free_count_ == 0)
    return status{errc::kOutOfPages, "ssd backend: all " + std::to_string(capacity_chunks_) + " chunks of '" +
                                         options_.path + "' are in use"};
  const auto extent_size = [&](uint32_t e) {
    return static_cast<uint32_t>(std::min<uint64_t>(extent_chunks_, capacity_chunks_ - uint64_t{e} * extent_chunks_));
  };
  const auto take = [&](uint64_t slot) -> chunk_id {
    allocated_[slot] = 1;
    ++extent_used_[slot / extent_chunks_];
    --free_count_;
    return static_cast<chunk_id>(slot);
  };
  stream* s = nullptr;
  try {
    s = &streams_[stream_key(hint.seq, hint.layer)];
  } catch (...) {
    s = nullptr;  // placement is only a preference
  }
  if (s) {
    if (s->extent != UINT32_MAX) {
      const uint32_t e = s->extent;
      while (s->next < extent_size(e)) {
        const uint64_t slot = uint64_t{e} * extent_chunks_ + s->next++;
        if (!allocated_[slot]) return take(slot);
      }
      extent_owned_[e] = 0;
      if (extent_used_[e] == 0) free_extents_.push_back(e);
      s->extent = UINT32_MAX;
    }
    while (!free_extents_.empty()) {
      const uint32_t e = free_extents_.back();
      free_extents_.pop_back();
      if (extent_used_[e] != 0 || extent_owned_[e]) continue;  // stale entry
      if (status r = reserve_extent(e); !r.ok()) {
        free_extents_.push_back(e);
        return r;
      }
      extent_owned_[e] = 1;
      s->extent = e;
      s->next = 1;
      return take(uint64_t{e} * extent_chunks_);
    }
  }
  // No whole extent left: any free slot (fragmented placement).
  const uint64_t n_extents = extent_used_.size();
  for (uint64_t i = 0; i < n_extents; ++i) {
    const uint32_t e = static_cast<uint32_t>((scan_extent_ + i) % n_extents);
    if (extent_used_[e] >= extent_size(e)) continue;
    for (uint32_t j = 0; j < extent_size(e); ++j) {
      const uint64_t slot = uint64_t{e} * extent_chunks_ + j;
      if (!allocated_[slot]) {
        scan_extent_ = e;
        return take(slot);
      }
    }
  }
  return status{errc::kInternal, "ssd backend: free chunk count and slot map disagree"};
}

status ssd_backend::reserve_extent(uint32_t e) noexcept {
  // Give a fresh extent real blocks before data goes there: direct writes into allocated
  // (unwritten) extents are several times cheaper than into holes, and a full filesystem shows
  // up here, as a clean kNoSpace from allocate_chunk, before any KV is accepted.
  if (!fallocate_ok_ || extent_reserved_[e]) return {};
  const uint64_t off = uint64_t{e} * extent_chunks_ * chunk_bytes_;
  const uint64_t len =
      std::min<uint64_t>(uint64_t{extent_chunks_} * chunk_bytes_, capacity_chunks_ * chunk_bytes_ - off);
  if (::fallocate(file_->fd, 0, static_cast<off_t>(off), static_cast<off_t>(len)) != 0) {
    if (errno == ENOSPC || errno == EDQUOT || errno == EFBIG)
      return io::errno_status(errno,
                              "ssd backend: reserving " + std::to_string(len) + " bytes of '" + options_.path + "'");
    fallocate_ok_ = false;  // not supported here: writes fill holes instead
    return {};
  }
  extent_reserved_[e] = 1;
  return {};
}

void ssd_backend::release_chunk(chunk_id id) noexcept {
  if (!configured_ || id >= capacity_chunks_ || !allocated_[id]) return;
  // A prefetched read of this slot would be stale once it is reused: drop it, or, when another
  // thread owns the ring's reads, make sure it is never adopted.
  if (check_thread().ok())
    cancel_prefetch();
  else
    prefetch_layer_ = -2;
  if (auto it = buffer_of_.find(id); it != buffer_of_.end()) {
    const uint32_t b = it->second;
    sealed_pending_.erase(std::remove(sealed_pending_.begin(), sealed_pending_.end(), b), sealed_pending_.end());
    free_buffer(b);
  }
  allocated_[id] = 0;
  const uint32_t e = id / extent_chunks_;
  --extent_used_[e];
  ++free_count_;
  if (extent_used_[e] == 0 && !extent_owned_[e]) {
    try {
      free_extents_.push_back(e);
    } catch (...) {
      // The slot stays reachable through the slot-by-slot scan.
    }
  }
}

void ssd_backend::on_sequence_freed(seq_id seq) noexcept {
  for (uint32_t l = 0; l < config_.shape.n_layers; ++l) {
    auto it = streams_.find(stream_key(seq, l));
    if (it == streams_.end()) continue;
    const uint32_t e = it->second.extent;
    if (e != UINT32_MAX) {
      extent_owned_[e] = 0;
      if (extent_used_[e] == 0) {
        try {
          free_extents_.push_back(e);
        } catch (...) {
        }
      }
    }
    streams_.erase(it);
  }
}

status ssd_backend::check_thread() const noexcept {
  if (engine_ && !engine_->can_drive())
    return {errc::kBusy,
            "ssd backend: its single-issuer io_uring ring has reads in flight from another thread "
            "(a prefetch); call from that thread, or open the backend with single_issuer=0"};
  return {};
}

status ssd_backend::check_chunk(chunk_id id, const char* what) const noexcept {
  if (!configured_) return {errc::kInvalidArgument, "ssd backend is not configured"};
  if (id >= capacity_chunks_ || !allocated_[id])
    return {errc::kInvalidArgument, std::string(what) + ": chunk " + std::to_string(id) + " is not allocated"};
  return {};
}

// ---- group buffers ---------------------------------------------------------------------------

result<uint32_t> ssd_backend::get_buffer(chunk_id id) noexcept {
  uint32_t index;
  try {
    if (!free_buffers_.empty()) {
      index = free_buffers_.back();
      free_buffers_.pop_back();
    } else {
      void* p = nullptr;
      if (::posix_memalign(&p, std::max<uint32_t>(4096, file_->mem_align), chunk_bytes_) != 0)
        return status{errc::kOutOfMemory, "ssd backend: group buffer of " + std::to_string(chunk_bytes_) + " bytes"};
      if (!dead_buffers_.empty()) {
        index = dead_buffers_.back();
        dead_buffers_.pop_back();
        buffers_[index].data = static_cast<std::byte*>(p);
      } else {
        try {
          buffers_.push_back(group_buffer{static_cast<std::byte*>(p)});
        } catch (...) {
          std::free(p);
          throw;
        }
        index = static_cast<uint32_t>(buffers_.size() - 1);
      }
      buffer_bytes_ += chunk_bytes_;
    }
    buffer_of_[id] = index;
  } catch (...) {
    return status{errc::kOutOfMemory, "ssd backend: group buffer table"};
  }
  auto& b = buffers_[index];
  std::memset(b.data, 0, chunk_bytes_);  // padding of a flushed partial chunk is deterministic
  b.id = id;
  b.n_tokens = 0;
  b.durable_tokens = 0;
  b.sealed = false;
  b.writing = false;
  return index;
}

void ssd_backend::free_buffer(uint32_t index) noexcept {
  auto& b = buffers_[index];
  buffer_of_.erase(b.id);
  b.id = kInvalidChunk;
  // Keep a few for reuse; give the rest back so idle memory stays bounded.
  if (free_buffers_.size() < size_t{write_batch_} + 8) {
    try {
      free_buffers_.push_back(index);
      return;
    } catch (...) {
    }
  }
  try {
    dead_buffers_.reserve(buffers_.size());
  } catch (...) {
    return;  // keep it as a free buffer after all: memory stays bounded by the peak
  }
  std::free(b.data);
  b.data = nullptr;
  buffer_bytes_ -= chunk_bytes_;
  dead_buffers_.push_back(index);  // indices stay stable; the entry is reused by get_buffer
}

// ---- I/O helpers -----------------------------------------------------------------------------

status ssd_backend::queue_io(int op, void* buf, uint32_t len, uint64_t offset, uint64_t user_data) noexcept {
  for (;;) {
    status s = engine_->queue(static_cast<io::io_op>(op), file_handle_, buf, len, offset, user_data);
    if (s.code() != errc::kBusy || engine_->idle()) return s;
    INSTINFER_TRY(reap(1));
  }
}

status ssd_backend::reap(uint32_t min_complete) noexcept {
  io::completion done[64];
  auto r = engine_->wait(done, min_complete);
  if (!r.ok()) return r.error();
  for (uint32_t i = 0; i < r.value(); ++i) {
    const auto& c = done[i];
    const uint64_t tag = c.user_data & kTagMask, index = c.user_data & ~kTagMask;
    const int32_t res = (c.result >= 0 && c.op != io::io_op::kFsync && static_cast<uint32_t>(c.result) < c.requested)
                            ? kShortTransfer
                            : c.result;
    if (tag == kTagRead && index < slots_.size()) {
      slots_[index].result = res;
      slots_[index].state = kSlotDone;
    } else if (tag == kTagWrite && index < write_runs_.size()) {
      // A gathered write succeeds or fails as a whole (a short one is a failure for every chunk).
      const auto& run = write_runs_[index];
      for (uint32_t j = 0; j < run.count; ++j) {
        auto& g = buffers_[write_order_[run.first + j]];
        g.write_result = res;
        g.writing = false;
      }
    } else if (tag == kTagPage && index < page_runs_.size()) {
      auto& run = page_runs_[index];
      if (!run.done && page_pending_ > 0) --page_pending_;
      run.result = res;
      run.done = true;
    } else if (tag == kTagSync) {
      sync_result_ = res;
      sync_done_ = true;
    }
  }
  return {};
}

namespace {
status result_status(int32_t res, const std::string& what) {
  if (res == kShortTransfer) return {errc::kIoError, what + ": short transfer"};
  if (res < 0) return io::errno_status(-res, what);
  return {};
}
}  // namespace

status ssd_backend::read_sync(void* dst, uint32_t len, uint64_t offset) noexcept {
  sync_done_ = false;
  INSTINFER_TRY(queue_io(static_cast<int>(io::io_op::kRead), dst, len, offset, kTagSync));
  while (!sync_done_) INSTINFER_TRY(reap(1));
  return result_status(sync_result_, "ssd backend: read of " + std::to_string(len) + " bytes at offset " +
                                         std::to_string(offset) + " of '" + options_.path + "'");
}

status ssd_backend::write_buffers(std::span<const uint32_t> indices, bool partial) noexcept {
  // Chunks with consecutive slots go out as one gathered write (up to kMaxWriteBytes): the
  // paper's block-sized appends, and far cheaper for the filesystem than many small writes.
  try {
    write_order_.assign(indices.begin(), indices.end());
    iovecs_.resize(indices.size());
    write_runs_.clear();
    write_runs_.reserve(indices.size());
  } catch (...) {
    return {errc::kOutOfMemory, "ssd backend: write batch of " + std::to_string(indices.size()) + " chunks"};
  }
  std::sort(write_order_.begin(), write_order_.end(),
            [&](uint32_t a, uint32_t b) { return buffers_[a].id < buffers_[b].id; });
  const uint32_t max_run = static_cast<uint32_t>(std::max<uint64_t>(1, kMaxWriteBytes / chunk_bytes_));
  for (uint32_t i = 0; i < write_order_.size(); ++i) {
    const uint32_t b = write_order_[i];
    iovecs_[i] = {buffers_[b].data, chunk_bytes_};
    buffers_[b].writing = true;
    buffers_[b].write_result = 0;
    if (!write_runs_.empty()) {
      auto& run = write_runs_.back();
      const uint32_t last = write_order_[run.first + run.count - 1];
      if (run.count < max_run && buffers_[last].id + 1 == buffers_[b].id) {
        ++run.count;
        continue;
      }
    }
    write_runs_.push_back({i, 1});
  }
  status first_error;
  for (uint32_t r = 0; r < write_runs_.size(); ++r) {
    const auto& run = write_runs_[r];
    const uint64_t offset = chunk_offset(buffers_[write_order_[run.first]].id);
    status s;
    for (;;) {
      s = engine_->queue_writev(file_handle_, &iovecs_[run.first], run.count, offset, kTagWrite | r);
      if (s.code() != errc::kBusy || engine_->idle()) break;
      s = reap(1);
      if (!s.ok()) break;
    }
    if (!s.ok()) {
      for (uint32_t j = 0; j < run.count; ++j) {
        buffers_[write_order_[run.first + j]].writing = false;
        buffers_[write_order_[run.first + j]].write_result = -EIO;
      }
      if (first_error.ok()) first_error = s;
    }
  }
  // Wait for every write of the batch (one submission; completions in any order).
  for (;;) {
    bool pending = false;
    for (uint32_t b : indices) pending |= buffers_[b].writing;
    if (!pending) break;
    status s = reap(1);
    if (!s.ok()) {
      engine_->drain();
      for (uint32_t b : indices) buffers_[b].writing = false;
      write_runs_.clear();
      return s;
    }
  }
  write_runs_.clear();
  for (uint32_t b : indices) {
    auto& g = buffers_[b];
    if (g.write_result >= 0) {
      stats_.device_bytes_written += chunk_bytes_;
      g.durable_tokens = g.n_tokens;
    } else if (first_error.ok()) {
      first_error = result_status(g.write_result, std::string("ssd backend: ") +
                                                      (partial ? "flushing the partial" : "writing sealed") +
                                                      " chunk " + std::to_string(g.id) + " to '" + options_.path +
                                                      "' (kept in host memory, retried later)");
    }
  }
  return first_error;
}

status ssd_backend::write_sealed_batch() noexcept {
  if (sealed_pending_.empty()) return {};
  status s = write_buffers(sealed_pending_, false);
  // Written chunks leave host memory; failed ones stay pending, in order.
  size_t keep = 0;
  for (uint32_t b : sealed_pending_) {
    if (buffers_[b].write_result >= 0 && buffers_[b].durable_tokens == buffers_[b].n_tokens)
      free_buffer(b);
    else
      sealed_pending_[keep++] = b;
  }
  sealed_pending_.resize(keep);
  return s;
}

// ---- appends -------------------------------------------------------------------------------

status ssd_backend::write_tokens(chunk_id id, const chunk_hint& /*hint*/, uint32_t first, uint32_t n,
                                 const std::byte* k, const std::byte* v) noexcept {
  INSTINFER_TRY(check_thread());
  INSTINFER_TRY(check_chunk(id, "write_tokens"));
  const uint32_t tpp = layout_.tokens();
  if (n == 0) return {};
  if (!k || !v) return {errc::kInvalidArgument, "write_tokens: null K or V"};
  if (first > tpp || n > tpp - first)
    return {errc::kInvalidArgument, "write_tokens: tokens [" + std::to_string(first) + ", " +
                                        std::to_string(first + n) + ") exceed a chunk of " + std::to_string(tpp)};
  auto it = buffer_of_.find(id);
  if (it == buffer_of_.end() && first != 0)
    return {errc::kInvalidArgument,
            "write_tokens: chunk " + std::to_string(id) + " is sealed or was never started; chunks are append-only"};
  if (it != buffer_of_.end() && (buffers_[it->second].sealed || buffers_[it->second].n_tokens != first))
    return {errc::kInvalidArgument, "write_tokens: chunk " + std::to_string(id) + " holds " +
                                        std::to_string(buffers_[it->second].n_tokens) +
                                        " tokens; appends must start there (first = " + std::to_string(first) + ")"};
  const bool seals = first + n == tpp;
  // Make room in the sealed batch before touching anything: a failed batch write fails this call
  // with nothing changed.
  if (seals && sealed_pending_.size() >= write_batch_) INSTINFER_TRY(write_sealed_batch());
  if (seals) {
    try {
      sealed_pending_.reserve(sealed_pending_.size() + 1);
    } catch (...) {
      return {errc::kOutOfMemory, "write_tokens: sealed batch"};
    }
  }
  uint32_t b;
  if (it == buffer_of_.end()) {
    auto r = get_buffer(id);
    if (!r.ok()) return r.error();
    b = r.value();
  } else {
    b = it->second;
  }
  auto& g = buffers_[b];
  const uint32_t heads = layout_.n_kv_heads, row = layout_.page.row_bytes();
  for (uint32_t t = 0; t < n; ++t) {
    for (uint32_t h = 0; h < heads; ++h) {
      const uint64_t src = (uint64_t{t} * heads + h) * row;
      std::memcpy(g.data + layout_.offset(kv_kind::kKey, h, first + t, 0), k + src, row);
      std::memcpy(g.data + layout_.offset(kv_kind::kValue, h, first + t, 0), v + src, row);
    }
  }
  g.n_tokens = first + n;
  stats_.kv_bytes_appended += uint64_t{n} * 2 * heads * row;
  if (seals) {
    g.sealed = true;
    sealed_pending_.push_back(b);
  }
  return {};
}

status ssd_backend::copy_tokens(chunk_id dst, const chunk_hint& /*dst_hint*/, chunk_id src, uint32_t n) noexcept {
  INSTINFER_TRY(check_thread());
  INSTINFER_TRY(check_chunk(dst, "copy_tokens (destination)"));
  INSTINFER_TRY(check_chunk(src, "copy_tokens (source)"));
  const uint32_t tpp = layout_.tokens();
  if (n == 0 || n > tpp)
    return {errc::kInvalidArgument,
            "copy_tokens: n must be in [1, " + std::to_string(tpp) + "], got " + std::to_string(n)};
  if (dst == src) return {errc::kInvalidArgument, "copy_tokens: source and destination are the same chunk"};
  if (buffer_of_.count(dst)) return {errc::kInvalidArgument, "copy_tokens: destination chunk is not fresh"};
  if (auto it = buffer_of_.find(src); it != buffer_of_.end() && buffers_[it->second].n_tokens < n)
    return {errc::kInvalidArgument,
            "copy_tokens: source chunk holds only " + std::to_string(buffers_[it->second].n_tokens) + " tokens"};
  const bool seals = n == tpp;
  if (seals && sealed_pending_.size() >= write_batch_) INSTINFER_TRY(write_sealed_batch());
  if (seals) {
    try {
      sealed_pending_.reserve(sealed_pending_.size() + 1);
    } catch (...) {
      return {errc::kOutOfMemory, "copy_tokens: sealed batch"};
    }
  }
  auto r = get_buffer(dst);
  if (!r.ok()) return r.error();
  const uint32_t b = r.value();
  const uint32_t row = layout_.page.row_bytes();
  if (auto it = buffer_of_.find(src); it != buffer_of_.end()) {
    const std::byte* s = buffers_[it->second].data;
    for (uint32_t p = 0; p < layout_.pages_per_chunk(); ++p)
      std::memcpy(buffers_[b].data + uint64_t{p} * layout_.page.page_bytes, s + uint64_t{p} * layout_.page.page_bytes,
                  uint64_t{n} * row);
  } else {
    cancel_prefetch();
    status s = read_sync(buffers_[b].data, static_cast<uint32_t>(chunk_bytes_), chunk_offset(src));
    if (!s.ok()) {
      free_buffer(b);
      return s;
    }
    stats_.device_bytes_read += chunk_bytes_;
    for (uint32_t p = 0; p < layout_.pages_per_chunk() && n < tpp; ++p)
      std::memset(buffers_[b].data + uint64_t{p} * layout_.page.page_bytes + uint64_t{n} * row, 0,
                  uint64_t{tpp - n} * row);
  }
  auto& g = buffers_[b];
  g.n_tokens = n;
  if (seals) {
    g.sealed = true;
    sealed_pending_.push_back(b);
  }
  return {};
}

status ssd_backend::read_chunk(chunk_id id, uint32_t n_tokens, std::byte* dst) noexcept {
  INSTINFER_TRY(check_thread());
  INSTINFER_TRY(check_chunk(id, "read_chunk"));
  if (!dst) return {errc::kInvalidArgument, "read_chunk: null destination"};
  if (n_tokens > layout_.tokens())
    return {errc::kInvalidArgument, "read_chunk: " + std::to_string(n_tokens) + " tokens exceed a chunk"};
  if (auto it = buffer_of_.find(id); it != buffer_of_.end()) {
    std::memcpy(dst, buffers_[it->second].data, chunk_bytes_);
    return {};
  }
  cancel_prefetch();
  std::byte* staging = engine_->staging().data();
  INSTINFER_TRY(read_sync(staging, static_cast<uint32_t>(chunk_bytes_), chunk_offset(id)));
  stats_.device_bytes_read += chunk_bytes_;
  std::memcpy(dst, staging, chunk_bytes_);
  return {};
}

status ssd_backend::read_pages(std::span<const page_read> reads) noexcept {
  if (!configured_) return {errc::kInvalidArgument, "ssd backend is not configured"};
  INSTINFER_TRY(check_thread());
  const uint32_t tpp = layout_.tokens(), n_pages = layout_.pages_per_chunk();
  const uint64_t page_bytes = layout_.page.page_bytes;
  // Validate the whole batch first: an invalid request reads nothing.
  if (reads.size() > UINT32_MAX) return {errc::kInvalidArgument, "read_pages: more than 2^32 reads in one batch"};
  const auto bad = [](size_t i, const std::string& why) -> status {
    return {errc::kInvalidArgument, "read_pages: read " + std::to_string(i) + ": " + why};
  };
  size_t on_device = 0;
  for (size_t i = 0; i < reads.size(); ++i) {
    const auto& r = reads[i];
    if (r.chunk >= capacity_chunks_ || !allocated_[r.chunk])
      return bad(i, "chunk " + std::to_string(r.chunk) + " is not allocated");
    if (!r.dst) return bad(i, "null destination");
    if (r.n_tokens > tpp)
      return bad(i, std::to_string(r.n_tokens) + " tokens exceed a chunk of " + std::to_string(tpp));
    if (r.page >= n_pages)
      return bad(
          i, "page " + std::to_string(r.page) + " >= " + std::to_string(n_pages) + " pages per chunk (2 x n_kv_heads)");
    on_device += buffer_of_.count(r.chunk) == 0;
  }
  try {
    page_order_.clear();
    page_order_.reserve(on_device);
    page_runs_.clear();
    page_runs_.reserve(on_device);
  } catch (...) {
    return {errc::kOutOfMemory, "read_pages: plan of " + std::to_string(on_device) + " page reads"};
  }

  // Chunks still in group buffers (tails, unwritten sealed chunks) come from host memory.
  for (uint32_t i = 0; i < reads.size(); ++i) {
    const auto& r = reads[i];
    if (auto it = buffer_of_.find(r.chunk); it != buffer_of_.end())
      std::memcpy(r.dst, buffers_[it->second].data + r.page * page_bytes, page_bytes);
    else
      page_order_.push_back(i);
  }
  if (page_order_.empty()) return {};

  cancel_prefetch();  // the staging ring is ours for this call
  const auto device_offset = [&](uint32_t i) { return chunk_offset(reads[i].chunk) + reads[i].page * page_bytes; };
  std::sort(page_order_.begin(), page_order_.end(),
            [&](uint32_t a, uint32_t b) { return device_offset(a) < device_offset(b); });

  // Runs: pages adjacent on the device (a chunk's K and V pages, or neighbouring chunks) become
  // one read of up to one request. O_DIRECT needs aligned ranges: a page smaller than the
  // device's alignment is read with its neighbours (a chunk is a multiple of it, so a page's
  // aligned range never leaves its chunk).
  const uint64_t align = file_->offset_align;
  const uint64_t max_run = request_bytes();
  for (uint32_t j = 0; j < page_order_.size(); ++j) {
    const uint64_t off = device_offset(page_order_[j]);
    const uint64_t begin = off / align * align, end = (off + page_bytes + align - 1) / align * align;
    if (!page_runs_.empty()) {
      auto& run = page_runs_.back();
      const uint64_t run_end = run.offset + run.bytes;
      if (begin <= run_end && std::max(end, run_end) - run.offset <= max_run) {
        run.bytes = static_cast<uint32_t>(std::max(end, run_end) - run.offset);
        ++run.count;
        continue;
      }
    }
    page_run run;
    run.offset = begin;
    run.bytes = static_cast<uint32_t>(end - begin);
    run.first = j;
    run.count = 1;
    page_runs_.push_back(run);
  }

  // Rounds of as many runs as the queue and the staging pool hold, each submitted at once.
  std::byte* const pool = engine_->staging().data();
  const uint64_t pool_bytes = engine_->staging().size();
  const uint64_t mem_align = std::max<uint64_t>(file_->mem_align, 1);
  const uint32_t depth = std::max<uint32_t>(engine_->queue_depth(), 1);
  const uint32_t n_runs = static_cast<uint32_t>(page_runs_.size());
  uint64_t bytes_read = 0;
  status failure;
  for (uint32_t next = 0; next < n_runs && failure.ok();) {
    uint32_t end = next;
    uint64_t used = 0;
    while (end < n_runs && end - next < depth) {
      const uint64_t at = (used + mem_align - 1) / mem_align * mem_align;
      if (at + page_runs_[end].bytes > pool_bytes) break;  // a run is at most one request: the pool holds two
      page_runs_[end].staging = at;
      page_runs_[end].done = false;
      used = at + page_runs_[end].bytes;
      ++end;
    }
    if (end == next) {
      failure = {errc::kInternal, "read_pages: a read of " + std::to_string(page_runs_[next].bytes) +
                                      " bytes does not fit the staging pool"};
      break;
    }
    page_pending_ = 0;
    for (uint32_t r = next; r < end && failure.ok(); ++r) {
      failure = queue_io(static_cast<int>(io::io_op::kRead), pool + page_runs_[r].staging, page_runs_[r].bytes,
                         page_runs_[r].offset, kTagPage | r);
      if (failure.ok()) ++page_pending_;
    }
    if (failure.ok()) failure = engine_->submit();
    while (failure.ok() && page_pending_ > 0) failure = reap(1);
    if (!failure.ok()) {
      engine_->drain();  // nothing of this round may land in the pool after we return
      break;
    }
    for (uint32_t r = next; r < end; ++r) {
      const auto& run = page_runs_[r];
      if (run.result < 0) {
        if (failure.ok())
          failure = result_status(run.result, "read_pages: reading " + std::to_string(run.bytes) + " bytes at offset " +
                                                  std::to_string(run.offset) + " of '" + options_.path + "'");
        continue;
      }
      bytes_read += run.bytes;
      for (uint32_t j = run.first; j < run.first + run.count; ++j) {
        const uint32_t i = page_order_[j];
        std::memcpy(reads[i].dst, pool + run.staging + (device_offset(i) - run.offset), page_bytes);
      }
    }
    next = end;
  }
  page_runs_.clear();  // stray completions must not match a later call's runs
  page_pending_ = 0;
  stats_.device_bytes_read += bytes_read;
  return failure;
}

status ssd_backend::flush() noexcept {
  if (!configured_) return {};
  INSTINFER_TRY(check_thread());
  INSTINFER_TRY(write_sealed_batch());
  std::vector<uint32_t> tails;
  try {
    for (const auto& [id, b] : buffer_of_)
      if (!buffers_[b].sealed && buffers_[b].n_tokens > buffers_[b].durable_tokens) tails.push_back(b);
  } catch (...) {
    return {errc::kOutOfMemory, "flush"};
  }
  std::sort(tails.begin(), tails.end());
  if (!tails.empty()) INSTINFER_TRY(write_buffers(tails, true));
  if (engine_->features().iopoll) {
    if (::fdatasync(file_->fd) != 0) return io::errno_status(errno, "ssd backend: fdatasync '" + options_.path + "'");
    return {};
  }
  sync_done_ = false;
  INSTINFER_TRY(queue_io(static_cast<int>(io::io_op::kFsync), nullptr, 0, 0, kTagSync));
  while (!sync_done_) INSTINFER_TRY(reap(1));
  return result_status(sync_result_, "ssd backend: fdatasync of '" + options_.path + "'");
}

// ---- decode --------------------------------------------------------------------------------

std::byte* ssd_backend::slot_data(uint32_t slot) const noexcept {
  return engine_->staging().data() + uint64_t{slot} * request_bytes();
}

status ssd_backend::validate_batch(std::span<const attend_item> batch) const noexcept {
  const uint32_t tpp = layout_.tokens();
  for (size_t b = 0; b < batch.size(); ++b) {
    const auto& it = batch[b];
    const uint64_t need = (uint64_t{it.n_tokens} + tpp - 1) / tpp;
    if (it.chunks.size() != need)
      return {errc::kInvalidArgument, "attend: item " + std::to_string(b) + " has " + std::to_string(it.n_tokens) +
                                          " tokens but " + std::to_string(it.chunks.size()) + " chunks"};
    if (!it.q || !it.out) return {errc::kInvalidArgument, "attend: item " + std::to_string(b) + " has a null q or out"};
    for (chunk_id id : it.chunks)
      if (id >= capacity_chunks_ || !allocated_[id])
        return {errc::kInvalidArgument,
                "attend: item " + std::to_string(b) + " names unallocated chunk " + std::to_string(id)};
  }
  return {};
}

status ssd_backend::plan_reads(std::span<const attend_item> batch, std::vector<read_request>& out) noexcept {
  // Runs of contiguous stored slots of one item, at most request_chunks_ long; buffered chunks
  // (tails, unwritten sealed chunks) are not read. Two passes: count, reserve exactly, fill.
  const auto walk = [&](auto&& emit) {
    for (uint32_t b = 0; b < batch.size(); ++b) {
      const auto& it = batch[b];
      read_request cur{};
      for (uint32_t i = 0; i < it.chunks.size(); ++i) {
        const chunk_id id = it.chunks[i];
        const bool buffered = !buffer_of_.empty() && buffer_of_.count(id) != 0;
        if (cur.count && !buffered && id == cur.first + cur.count && cur.count < request_chunks_) {
          ++cur.count;
          continue;
        }
        if (cur.count) emit(cur);
        cur = buffered ? read_request{} : read_request{b, i, 1, id};
      }
      if (cur.count) emit(cur);
    }
  };
  size_t n = 0;
  walk([&](const read_request&) { ++n; });
  out.clear();
  try {
    out.reserve(n);
  } catch (...) {
    return {errc::kOutOfMemory, "attend: read plan of " + std::to_string(n) + " requests"};
  }
  walk([&](const read_request& r) { out.push_back(r); });
  return {};
}

status ssd_backend::issue_reads(std::span<const read_request> plan, uint32_t& next) noexcept {
  // The ring's request r uses slot r % n_slots; r may go out once r - n_slots has been consumed.
  const uint32_t depth = std::min(n_slots_, engine_->queue_depth());
  uint32_t reads_in_flight = 0;
  for (const auto& s : slots_) reads_in_flight += s.state == kSlotInFlight;
  bool queued = false;
  while (next < plan.size() && reads_in_flight < depth) {
    const uint32_t slot = next % n_slots_;
    if (slots_[slot].state != kSlotFree) break;
    const auto& r = plan[next];
    INSTINFER_TRY(queue_io(static_cast<int>(io::io_op::kRead), slot_data(slot),
                           static_cast<uint32_t>(r.count * chunk_bytes_), chunk_offset(r.first), kTagRead | slot));
    slots_[slot].state = kSlotInFlight;
    ++reads_in_flight;
    ++next;
    queued = true;
  }
  if (queued) return engine_->submit();
  return {};
}

void ssd_backend::cancel_prefetch() noexcept {
  bool busy = false;
  for (const auto& s : slots_) busy |= s.state == kSlotInFlight;
  while (busy) {
    if (!reap(1).ok()) {
      engine_->drain();
      break;
    }
    busy = false;
    for (const auto& s : slots_) busy |= s.state == kSlotInFlight;
  }
  for (auto& s : slots_) s.state = kSlotFree;
  prefetch_issued_ = 0;
  prefetch_layer_ = -1;
}

void ssd_backend::prefetch(uint32_t layer, std::span<const attend_item> batch) noexcept {
  if (!configured_ || layer >= config_.shape.n_layers || !check_thread().ok()) return;
  cancel_prefetch();
  if (!validate_batch(batch).ok()) return;
  if (!plan_reads(batch, prefetch_plan_).ok()) return;
  uint32_t next = 0;
  const auto window = std::span<const read_request>(prefetch_plan_)
                          .first(std::min<size_t>(prefetch_plan_.size(), std::min(n_slots_, engine_->queue_depth())));
  if (!issue_reads(window, next).ok()) {
    cancel_prefetch();
    return;
  }
  prefetch_issued_ = next;
  prefetch_layer_ = layer;
}

void ssd_backend::compute(uint32_t item, const attend_item& it, const std::byte* const* ptrs, uint32_t count,
                          uint32_t last_tokens) noexcept {
  const uint32_t g = params_.group_size, d = config_.shape.head_dim, nq = config_.shape.n_q_heads;
  for (uint32_t h = 0; h < layout_.n_kv_heads; ++h) {
    kernel_(params_, ptrs, count, last_tokens, h, it.q + size_t{h} * g * d, tmp_o_.data(), tmp_stats_.data());
    for (uint32_t j = 0; j < g; ++j) {
      const size_t qh = size_t{item} * nq + h * g + j;
      merge_state(acc_stats_[qh], acc_o_.data() + qh * d, tmp_stats_[j], tmp_o_.data() + size_t{j} * d, d);
    }
  }
}

status ssd_backend::attend(uint32_t layer, std::span<const attend_item> batch) noexcept {
  if (!configured_) return {errc::kInvalidArgument, "ssd backend is not configured"};
  INSTINFER_TRY(check_thread());
  if (layer >= config_.shape.n_layers)
    return {errc::kLayerOutOfRange,
            "attend: layer " + std::to_string(layer) + " >= " + std::to_string(config_.shape.n_layers)};
  if (status s = validate_batch(batch); !s.ok()) {
    cancel_prefetch();
    return s;
  }
  const uint32_t tpp = layout_.tokens(), d = config_.shape.head_dim, nq = config_.shape.n_q_heads;
  try {
    acc_o_.resize(batch.size() * nq * size_t{d});
    acc_stats_.resize(batch.size() * nq);
  } catch (...) {
    cancel_prefetch();
    return {errc::kOutOfMemory, "attend: workspace for a batch of " + std::to_string(batch.size())};
  }
  std::fill(acc_o_.begin(), acc_o_.end(), 0.0f);
  std::fill(acc_stats_.begin(), acc_stats_.end(), softmax_stats{});
  if (status s = plan_reads(batch, plan_); !s.ok()) {
    cancel_prefetch();
    return s;
  }

  // Adopt the prefetch when it read exactly the start of this plan.
  uint32_t issued = 0;
  if (prefetch_issued_ > 0) {
    bool match = prefetch_layer_ == static_cast<int64_t>(layer) && prefetch_issued_ <= plan_.size();
    for (uint32_t i = 0; match && i < prefetch_issued_; ++i)
      match = plan_[i].first == prefetch_plan_[i].first && plan_[i].count == prefetch_plan_[i].count;
    if (match) {
      issued = prefetch_issued_;
      prefetch_issued_ = 0;
      prefetch_layer_ = -1;
    } else {
      cancel_prefetch();
    }
  }
  status failure;
  if (status s = issue_reads(plan_, issued); !s.ok()) failure = s;

  // Tails and unwritten sealed chunks come from host memory while the reads fly.
  for (uint32_t b = 0; b < batch.size() && failure.ok(); ++b) {
    const auto& it = batch[b];
    const uint32_t n_chunks = static_cast<uint32_t>(it.chunks.size());
    for (uint32_t i = 0; i < n_chunks; ++i) {
      auto f = buffer_of_.find(it.chunks[i]);
      if (f == buffer_of_.end()) continue;
      const std::byte* p = buffers_[f->second].data;
      const uint32_t last = i + 1 == n_chunks ? it.n_tokens - (n_chunks - 1) * tpp : tpp;
      compute(b, it, &p, 1, last);
    }
  }

  // Stream the stored chunks through the ring, in plan order.
  uint64_t bytes_read = 0;
  for (uint32_t consumed = 0; consumed < plan_.size() && failure.ok(); ++consumed) {
    const uint32_t slot = consumed % n_slots_;
    while (slots_[slot].state == kSlotInFlight) {
      if (status s = reap(1); !s.ok()) {
        failure = s;
        break;
      }
    }
    if (!failure.ok()) break;
    const auto& r = plan_[consumed];
    if (slots_[slot].result < 0) {
      failure =
          result_status(slots_[slot].result, "attend: reading chunks " + std::to_string(r.first) + ".." +
                                                 std::to_string(r.first + r.count - 1) + " of '" + options_.path + "'");
      break;
    }
    const auto& it = batch[r.item];
    const uint32_t n_chunks = static_cast<uint32_t>(it.chunks.size());
    const std::byte* base = slot_data(slot);
    try {
      ptrs_.resize(r.count);
    } catch (...) {
      failure = status{errc::kOutOfMemory, "attend: chunk pointers"};
      break;
    }
    for (uint32_t j = 0; j < r.count; ++j) ptrs_[j] = base + uint64_t{j} * chunk_bytes_;
    const uint32_t last = r.position + r.count == n_chunks ? it.n_tokens - (n_chunks - 1) * tpp : tpp;
    compute(r.item, it, ptrs_.data(), r.count, last);
    bytes_read += r.count * chunk_bytes_;
    slots_[slot].state = kSlotFree;
    if (status s = issue_reads(plan_, issued); !s.ok()) failure = s;
  }
  stats_.device_bytes_read += bytes_read;
  if (!failure.ok()) {
    cancel_prefetch();  // waits for this call's reads too
    return failure;
  }

  for (uint32_t b = 0; b < batch.size(); ++b) {
    const auto& it = batch[b];
    for (uint32_t h = 0; h < nq; ++h) {
      const size_t qh = size_t{b} * nq + h;
      float* o = acc_o_.data() + qh * d;
      normalize_state(acc_stats_[qh], o, d);
      std::memcpy(it.out + size_t{h} * d, o, size_t{d} * sizeof(float));
      if (it.lse) it.lse[h] = state_lse(acc_stats_[qh]);
    }
  }
  return {};
}

backend_stats ssd_backend::stats() const noexcept {
  backend_stats s = stats_;
  s.capacity_chunks = capacity_chunks_;
  s.used_chunks = capacity_chunks_ - free_count_;
  return s;
}

}  // namespace instinfer
