// Host-memory group buffers of the SSD backend (the paper's flash-aware KV management): a chunk
// that is still filling (the tail) lives in a buffer and reaches storage only when it is sealed
// (full), in batches of up to `write_batch` chunks, or on flush(). A sealed chunk is never written
// again. A chunk whose write failed stays in its buffer (readable, retried by the next batch):
// nothing is lost. Writes complete through this component's own completion handler. Internal to
// src/backend/ssd; depends only on ssd_io.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <unordered_map>
#include <vector>

#include <sys/uio.h>

#include "instinfer/layout/chunk_layout.hpp"
#include "ssd_io.hpp"
#include "store_meta.hpp"

namespace instinfer::ssd {

class group_buffers final : private io::completion_handler {
 public:
  group_buffers() = default;
  group_buffers(const group_buffers&) = delete;
  group_buffers& operator=(const group_buffers&) = delete;
  ~group_buffers();

  // `io` must be open and outlive this; registers the write handler. With `sums` (a persistent
  // store), every chunk written gets its checksums recorded and every chunk read back is checked.
  status configure(ssd_io& io, const chunk_layout& layout, uint32_t write_batch, chunk_sums* sums = nullptr);

  // The chunk's bytes while it is buffered (a tail, or sealed and not yet written), else null.
  const std::byte* find(chunk_id id) const noexcept {
    if (buffer_of_.empty()) return nullptr;
    auto it = buffer_of_.find(id);
    return it == buffer_of_.end() ? nullptr : buffers_[it->second].data;
  }
  bool empty() const noexcept { return buffer_of_.empty(); }
  uint32_t count() const noexcept { return static_cast<uint32_t>(buffer_of_.size()); }

  // Append tokens [first, first + n) (rows [n][n_kv_heads][head_dim]) to the chunk: first == 0
  // starts a buffer, else it continues the tail exactly where it ends. Filling the chunk seals it;
  // a full sealed batch is written first (when that fails, nothing changes). The caller checks
  // that `id` is allocated and that layout.fits(first, n).
  status append(chunk_id id, uint32_t first, uint32_t n, const std::byte* k, const std::byte* v) noexcept;
  // A fresh chunk `dst` starts with the first n tokens of `src` (buffered, or read from the device).
  status copy(chunk_id dst, chunk_id src, uint32_t n) noexcept;
  // A fresh chunk's bytes whole, sealed at once (kv_store::write_chunk).
  status write_whole(chunk_id id, const std::byte* chunk) noexcept;
  // The chunk's buffer is dropped (its slot was released).
  void drop(chunk_id id) noexcept;
  // Write the sealed batch and every partial tail, then fdatasync.
  status flush() noexcept;

  uint64_t memory_bytes() const noexcept { return buffer_bytes_ + buffer_of_.size() * 32; }
  uint64_t kv_bytes_appended() const noexcept { return kv_bytes_appended_; }

 private:
  struct group_buffer {
    std::byte* data = nullptr;
    chunk_id id = kInvalidChunk;
    uint32_t n_tokens = 0;
    uint32_t durable_tokens = 0;  // tokens already on the device (flush of a partial tail)
    bool sealed = false;
    int32_t write_result = 0;  // completion of the batched write in flight
    bool writing = false;
  };
  struct write_run {     // one gathered write: chunks of consecutive slots
    uint32_t first = 0;  // index into write_order_ / iovecs_
    uint32_t count = 0;
  };

  void on_completion(const io::completion& c) noexcept override;
  result<uint32_t> get_buffer(chunk_id id) noexcept;
  void free_buffer(uint32_t index) noexcept;
  status make_room_to_seal(const char* what) noexcept;
  void seal(uint32_t index) noexcept;
  status write_sealed_batch() noexcept;
  status write_buffers(std::span<const uint32_t> indices, bool partial) noexcept;
  status plan_write_runs(std::span<const uint32_t> indices) noexcept;
  status wait_for_writes(std::span<const uint32_t> indices) noexcept;

  ssd_io* io_ = nullptr;
  chunk_layout layout_{};
  uint64_t chunk_bytes_ = 0;
  uint32_t write_batch_ = 0;
  uint32_t handler_ = 0;
  chunk_sums* sums_ = nullptr;
  std::vector<group_buffer> buffers_;
  std::vector<uint32_t> free_buffers_;  // allocated, unused
  std::vector<uint32_t> dead_buffers_;  // entries whose memory was given back
  std::unordered_map<chunk_id, uint32_t> buffer_of_;
  std::vector<uint32_t> sealed_pending_;  // buffer indices, in sealing order
  uint64_t buffer_bytes_ = 0;
  std::vector<uint32_t> write_order_;  // the batch being written, by slot
  std::vector<iovec> iovecs_;
  std::vector<write_run> write_runs_;  // completions name a run
  uint64_t kv_bytes_appended_ = 0;
};

}  // namespace instinfer::ssd
