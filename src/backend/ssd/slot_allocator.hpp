// Chunk slots of the SSD file: slot i lives at byte i * chunk_bytes. Slots are handed out per
// (sequence, layer) stream from extents, so one layer's chunks of a sequence are contiguous on the
// device and a decode step reads them with few large requests. When no whole extent is left, any
// free slot is used (fragmented placement). Internal to src/backend/ssd.
#pragma once

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "instinfer/backend/backend.hpp"

namespace instinfer::ssd {

class slot_allocator {
 public:
  struct geometry {
    uint64_t capacity_chunks = 0;
    uint64_t chunk_bytes = 0;
    int fd = -1;                // the file whose extents get real blocks (fallocate); -1: never
    bool preallocated = false;  // the whole file already has its blocks
    std::string path;           // for messages
  };
  // (Re)build the maps: every slot free.
  status configure(const geometry& g);

  uint64_t capacity() const noexcept { return capacity_; }
  uint64_t free_count() const noexcept { return free_count_; }
  uint32_t extent_chunks() const noexcept { return extent_chunks_; }
  bool allocated(chunk_id id) const noexcept { return id < capacity_ && allocated_[id]; }

  // A slot for the next chunk of the (seq, layer) stream: the stream's extent when it has room,
  // else a fresh extent (given blocks first), else any free slot.
  result<chunk_id> allocate(seq_id seq, uint32_t layer, chunk_stream kind = chunk_stream::kTokens) noexcept;
  // False when `id` was not allocated (nothing changes).
  bool release(chunk_id id) noexcept;
  // Mark a slot a reopened store's metadata references as allocated (false: out of range or taken).
  bool adopt(chunk_id id) noexcept;
  // The sequence's streams give their extents back.
  void on_sequence_freed(seq_id seq, uint32_t n_layers) noexcept;
  uint64_t memory_bytes() const noexcept;

 private:
  struct stream {
    uint32_t extent = UINT32_MAX;
    uint32_t next = 0;  // next slot index inside the extent
  };
  status reserve_extent(uint32_t extent) noexcept;
  uint32_t extent_size(uint32_t extent) const noexcept;
  chunk_id take(uint64_t slot) noexcept;
  void give_back_extent(uint32_t extent) noexcept;

  geometry geometry_{};
  uint64_t capacity_ = 0;
  uint64_t free_count_ = 0;
  uint32_t extent_chunks_ = 1;
  std::vector<uint8_t> allocated_;        // per slot
  std::vector<uint32_t> extent_used_;     // allocated slots per extent
  std::vector<uint8_t> extent_owned_;     // held by a stream
  std::vector<uint8_t> extent_reserved_;  // blocks allocated (fallocate) in the file
  bool fallocate_ok_ = true;
  std::vector<uint32_t> free_extents_;            // wholly free, not held (stack)
  uint32_t scan_extent_ = 0;                      // where the slot-by-slot fallback resumes
  std::unordered_map<uint64_t, stream> streams_;  // key: stream_key(seq, layer)
};

}  // namespace instinfer::ssd
