#include "slot_allocator.hpp"

#include <algorithm>
#include <cerrno>

#include <fcntl.h>

#include "instinfer/io/uring_engine.hpp"

namespace instinfer::ssd {

namespace {

constexpr uint64_t kExtentBytes = 4ull << 20;  // a stream's contiguous run on the device

// One placement stream per (seq, layer, chunk_stream): token chunks and SparF's column chunks of a
// layer each fill their own extents, so a dense pass reads token chunks contiguously.
uint64_t stream_key(seq_id seq, uint32_t layer, chunk_stream kind) noexcept {
  return (seq << 13) ^ (uint64_t{layer} << 1) ^ static_cast<uint64_t>(kind);
}

}  // namespace

status slot_allocator::configure(const geometry& g) {
  if (g.capacity_chunks == 0 || g.chunk_bytes == 0)
    return {errc::kInvalidArgument, "ssd slot allocator: empty capacity or chunk"};
  geometry_ = g;
  capacity_ = g.capacity_chunks;
  extent_chunks_ = static_cast<uint32_t>(std::clamp<uint64_t>(kExtentBytes / g.chunk_bytes, 1, capacity_));
  const uint64_t n_extents = (capacity_ + extent_chunks_ - 1) / extent_chunks_;
  allocated_.assign(capacity_, 0);
  extent_used_.assign(n_extents, 0);
  extent_owned_.assign(n_extents, 0);
  extent_reserved_.assign(n_extents, g.preallocated ? 1 : 0);
  fallocate_ok_ = g.fd >= 0;
  free_extents_.clear();
  free_extents_.reserve(n_extents);
  for (uint64_t i = n_extents; i-- > 0;) free_extents_.push_back(static_cast<uint32_t>(i));
  scan_extent_ = 0;
  streams_.clear();
  free_count_ = capacity_;
  return {};
}

uint32_t slot_allocator::extent_size(uint32_t e) const noexcept {
  return static_cast<uint32_t>(std::min<uint64_t>(extent_chunks_, capacity_ - uint64_t{e} * extent_chunks_));
}

chunk_id slot_allocator::take(uint64_t slot) noexcept {
  allocated_[slot] = 1;
  ++extent_used_[slot / extent_chunks_];
  --free_count_;
  return static_cast<chunk_id>(slot);
}

result<chunk_id> slot_allocator::allocate(seq_id seq, uint32_t layer, chunk_stream kind) noexcept {
  if (free_count_ == 0)
    return status{errc::kOutOfPages,
                  "ssd backend: all " + std::to_string(capacity_) + " chunks of '" + geometry_.path + "' are in use"};
  stream* s = nullptr;
  try {
    s = &streams_[stream_key(seq, layer, kind)];
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

status slot_allocator::reserve_extent(uint32_t e) noexcept {
  // Give a fresh extent real blocks before data goes there: direct writes into allocated
  // (unwritten) extents are several times cheaper than into holes, and a full filesystem shows
  // up here, as a clean kNoSpace from allocate_chunk, before any KV is accepted.
  if (!fallocate_ok_ || extent_reserved_[e]) return {};
  const uint64_t chunk_bytes = geometry_.chunk_bytes;
  const uint64_t off = uint64_t{e} * extent_chunks_ * chunk_bytes;
  const uint64_t len = std::min<uint64_t>(uint64_t{extent_chunks_} * chunk_bytes, capacity_ * chunk_bytes - off);
  if (::fallocate(geometry_.fd, 0, static_cast<off_t>(off), static_cast<off_t>(len)) != 0) {
    if (errno == ENOSPC || errno == EDQUOT || errno == EFBIG)
      return io::errno_status(errno,
                              "ssd backend: reserving " + std::to_string(len) + " bytes of '" + geometry_.path + "'");
    fallocate_ok_ = false;  // not supported here: writes fill holes instead
    return {};
  }
  extent_reserved_[e] = 1;
  return {};
}

void slot_allocator::give_back_extent(uint32_t e) noexcept {
  try {
    free_extents_.push_back(e);
  } catch (...) {
    // Its slots stay reachable through the slot-by-slot scan.
  }
}

bool slot_allocator::release(chunk_id id) noexcept {
  if (!allocated(id)) return false;
  allocated_[id] = 0;
  const uint32_t e = id / extent_chunks_;
  --extent_used_[e];
  ++free_count_;
  if (extent_used_[e] == 0 && !extent_owned_[e]) give_back_extent(e);
  return true;
}

bool slot_allocator::adopt(chunk_id id) noexcept {
  if (id >= capacity_ || allocated_[id]) return false;
  take(id);  // its extent's entry in free_extents_ is skipped as stale from now on
  return true;
}

void slot_allocator::on_sequence_freed(seq_id seq, uint32_t n_layers) noexcept {
  for (uint32_t l = 0; l < n_layers; ++l)
    for (const chunk_stream kind : {chunk_stream::kTokens, chunk_stream::kColumns}) {
      auto it = streams_.find(stream_key(seq, l, kind));
      if (it == streams_.end()) continue;
      const uint32_t e = it->second.extent;
      if (e != UINT32_MAX) {
        extent_owned_[e] = 0;
        if (extent_used_[e] == 0) give_back_extent(e);
      }
      streams_.erase(it);
    }
}

uint64_t slot_allocator::memory_bytes() const noexcept {
  return allocated_.capacity() + extent_used_.capacity() * 4 + extent_owned_.capacity() + free_extents_.capacity() * 4 +
         streams_.size() * 48;
}

}  // namespace instinfer::ssd
