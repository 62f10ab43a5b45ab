// The SSD backend's device context, shared by its components (slot allocator, group buffers,
// page reads, stream decode): the storage file, the io_uring engine, and the two things more than
// one component needs, synchronous helper I/O and the staging pool. Internal to src/backend/ssd;
// it depends on nothing else of the backend.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "instinfer/backend/backend.hpp"
#include "instinfer/io/uring_engine.hpp"

namespace instinfer::ssd {

// The stored result of a transfer that moved fewer bytes than asked.
inline constexpr int32_t kShortTransfer = INT32_MIN;
// A completion's result with short transfers marked kShortTransfer.
int32_t transfer_result(const io::completion& c) noexcept;
// A stored result -> status (errno mapping, or "short transfer"); ok for results >= 0.
status result_status(int32_t result, const std::string& what);

// Whoever has reads landing in the staging pool outside a call (the decode ring's prefetch).
// claim_staging() asks it to finish or drop them before another user writes into the pool.
class staging_holder {
 public:
  virtual void release_staging() noexcept = 0;

 protected:
  ~staging_holder() = default;
};

class ssd_io final : private io::completion_handler {
 public:
  ssd_io() = default;
  ssd_io(const ssd_io&) = delete;
  ssd_io& operator=(const ssd_io&) = delete;
  ~ssd_io();

  // Takes an opened file (first, so that teardown can remove a file this backend created even
  // when configuration fails later).
  void adopt(io::storage_file file);
  bool has_file() const noexcept { return file_ != nullptr; }
  // Unlink the file if the open created it (io::storage_file::remove_if_created); the descriptor
  // and its lock stay until this object goes.
  void remove_file_if_created() noexcept {
    if (file_) file_->remove_if_created();
  }
  // Capacity in chunks of the adopted file for `capacity_bytes` (0: a block device's size, else
  // min(64 GiB, 90% of free space)); the file gets its final size (sparse) or, with
  // `preallocate`, all its blocks now.
  result<uint64_t> size_file(uint64_t capacity_bytes, uint64_t chunk_bytes, bool preallocate);
  // Builds the engine on the adopted file and registers the file.
  status open(const io::engine_options& options, uint64_t chunk_bytes);
  bool is_open() const noexcept { return engine_ != nullptr; }
  // Wait for and discard everything in flight; the engine is gone afterwards (teardown).
  void close() noexcept;

  io::uring_engine& engine() noexcept { return *engine_; }
  const io::uring_engine& engine() const noexcept { return *engine_; }
  const io::storage_file& file() const noexcept { return *file_; }
  const std::string& path() const noexcept { return file_->path; }
  uint64_t chunk_bytes() const noexcept { return chunk_bytes_; }
  uint64_t chunk_offset(chunk_id id) const noexcept { return uint64_t{id} * chunk_bytes_; }
  std::byte* staging() noexcept { return engine_->staging().data(); }
  uint64_t staging_bytes() noexcept { return engine_->staging().size(); }

  // kBusy unless the calling thread may drive the ring now.
  status check_thread() const noexcept;
  // Register a component's completion handler; its requests carry tag(id, payload).
  result<uint32_t> add_handler(io::completion_handler& handler) noexcept { return engine_->add_handler(handler); }
  static uint64_t tag(uint32_t handler, uint64_t payload) noexcept { return io::handler_tag(handler, payload); }

  // Queue on the file; when the queue is full, reap (every owner's completions reach their
  // handlers) until there is room.
  status queue(io::io_op op, void* buf, uint32_t len, uint64_t offset, uint64_t user_data) noexcept;
  status queue_writev(const iovec* iov, uint32_t n_iov, uint64_t offset, uint64_t user_data) noexcept;
  // Block for at least one completion and dispatch what arrived.
  status reap() noexcept;

  // One read / fdatasync, waited for (other owners' completions are dispatched meanwhile).
  status read_sync(void* dst, uint32_t len, uint64_t offset) noexcept;
  status fsync() noexcept;

  void set_staging_holder(staging_holder* holder) noexcept { holder_ = holder; }
  // Make the staging pool the caller's until it returns: in-flight prefetches finish or drop.
  void claim_staging() noexcept {
    if (holder_) holder_->release_staging();
  }

  // Device traffic, for backend_stats.
  uint64_t bytes_read = 0;
  uint64_t bytes_written = 0;
  uint64_t read_requests = 0;        // reads queued
  uint64_t prefetched_requests = 0;  // of those, issued by a prefetch and used by the attend after it

 private:
  void on_completion(const io::completion& c) noexcept override;
  status wait_sync() noexcept;

  std::unique_ptr<io::storage_file> file_;
  std::unique_ptr<io::uring_engine> engine_;
  uint32_t file_handle_ = 0;
  uint32_t handler_ = 0;  // for the synchronous helpers
  uint64_t chunk_bytes_ = 0;
  staging_holder* holder_ = nullptr;
  int32_t sync_result_ = 0;
  bool sync_done_ = false;
};

}  // namespace instinfer::ssd
