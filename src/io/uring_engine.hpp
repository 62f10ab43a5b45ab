// A small io_uring engine: one ring, registered files, a registered staging pool, batched
// submissions and a fault-injection seam. It knows nothing about KV caches: the SSD backend and
// the emulated CSD's flash both sit on it.
//
// Usage: create() once, add_file() the files, queue() reads/writes (into the staging pool or any
// suitably aligned buffer), submit() once per batch, wait() for completions. Completions carry
// the caller's user_data and the kernel's result (bytes, or -errno); callers turn them into a
// status with check_completion().
//
// Threading: with SINGLE_ISSUER (the default when the kernel has it) only one thread may drive
// the ring. When another thread calls in while nothing is in flight, the ring is rebuilt for that
// thread (files and buffers re-registered); with I/O in flight it is an error (kBusy).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>

#include <sys/uio.h>

#include "instinfer/core/status.hpp"

namespace instinfer::io {

enum class io_op : uint8_t { kRead = 0, kWrite = 1, kFsync = 2 };
std::string_view io_op_name(io_op op) noexcept;

struct engine_options {
  uint32_t queue_depth = 32;            // SQ entries = most requests in flight (1..4096)
  uint64_t staging_bytes = 8ull << 20;  // the staging pool; 0: none (callers bring buffers)
  bool register_staging = true;         // register the pool (falls back to plain on ENOMEM)
  bool register_files = true;           // registered file table
  bool single_issuer = true;            // SINGLE_ISSUER | DEFER_TASKRUN when the kernel has them
  bool sqpoll = false;                  // kernel submission thread (SINGLE_ISSUER, no DEFER_TASKRUN)
  uint32_t sqpoll_idle_ms = 100;
  bool iopoll = false;  // polled completions; probed at the first file, falls back
  // Test seam: pretend the kernel refused to register the staging pool with this errno.
  int simulate_register_error = 0;
};

// What the engine actually got from the kernel (options may have been refused).
struct engine_features {
  bool single_issuer = false;
  bool defer_taskrun = false;
  bool sqpoll = false;
  bool iopoll = false;            // polled completions in use
  bool iopoll_fell_back = false;  // asked for, failed at the first I/O, running without
  bool registered_staging = false;
  bool registered_files = false;
  int staging_register_errno = 0;  // why the pool is not registered (0: it is, or none asked)
  uint32_t queue_depth = 0;
  std::string describe() const;
};

// Fault injection: the `nth` op of kind `op` queued from now on (1-based) completes with
// -error_errno without reaching the device, or, when error_errno == 0, reaches the device and
// reports only `short_bytes` bytes. One-shot; nth == 0 disarms.
struct fault_plan {
  io_op op = io_op::kRead;
  uint64_t nth = 0;
  int error_errno = 0;
  uint32_t short_bytes = 0;
};

struct completion {
  uint64_t user_data = 0;
  int32_t result = 0;      // bytes transferred, or -errno
  uint32_t requested = 0;  // bytes asked for (0 for fsync)
  io_op op = io_op::kRead;
};

// A file opened for the engine. Owns the descriptor.
struct storage_file {
  int fd = -1;
  bool direct = false;  // O_DIRECT in effect
  bool block_device = false;
  bool created = false;          // the open created it
  uint32_t mem_align = 4096;     // buffer alignment O_DIRECT needs (statx DIOALIGN, else 4096)
  uint32_t offset_align = 4096;  // offset/length alignment
  uint64_t size_bytes = 0;       // file size / device capacity at open
  std::string path;

  storage_file() = default;
  storage_file(storage_file&& o) noexcept;
  storage_file& operator=(storage_file&& o) noexcept;
  storage_file(const storage_file&) = delete;
  storage_file& operator=(const storage_file&) = delete;
  ~storage_file();
};

// Open (and create, if `create` and missing) a regular file or block device for direct I/O.
// When the filesystem refuses O_DIRECT the result is kUnsupported with an explanation, unless
// `allow_buffered` (an explicit opt-in), which opens it through the page cache instead.
result<storage_file> open_storage_file(const std::string& path, bool create, bool allow_buffered);

// errno -> status: ENOSPC/EDQUOT/EFBIG -> kNoSpace, ENOMEM -> kOutOfMemory, others -> kIoError.
status errno_status(int err, std::string_view what);
// A completion -> status: an error result maps through errno_status, a short transfer is kIoError.
status check_completion(const completion& c, std::string_view what);

class uring_engine {
 public:
  static result<std::unique_ptr<uring_engine>> create(const engine_options& options);
  ~uring_engine();
  uring_engine(const uring_engine&) = delete;
  uring_engine& operator=(const uring_engine&) = delete;

  // Register an open descriptor (not owned); the handle names it in queue(). With iopoll asked
  // for, the first file is probed with one polled read and the ring falls back if that fails.
  result<uint32_t> add_file(int fd);

  // The staging pool: staging_bytes bytes aligned to 4096 (empty when none was asked for).
  std::span<std::byte> staging() noexcept { return {staging_, staging_bytes_}; }

  // Queue one op (not yet submitted). buf/len/offset must satisfy the file's direct-I/O
  // alignment; buf inside the staging pool uses the fixed-buffer opcode when it is registered.
  // kBusy when queue_depth requests are already queued or in flight: wait() first.
  status queue(io_op op, uint32_t file, void* buf, uint32_t len, uint64_t offset, uint64_t user_data) noexcept;
  // Queue a gathered write of `n_iov` buffers to [offset, offset + total) (counted as a kWrite).
  // The iovec array must stay valid until the completion is reaped.
  status queue_writev(uint32_t file, const iovec* iov, uint32_t n_iov, uint64_t offset, uint64_t user_data) noexcept;
  // Hand everything queued to the kernel in one call.
  status submit() noexcept;
  // Submit what is queued, then collect completions into `out`, blocking until at least
  // min(min_complete, in_flight) have arrived. Returns how many were written.
  result<uint32_t> wait(std::span<completion> out, uint32_t min_complete) noexcept;
  // Wait for and discard everything in flight (error paths, teardown).
  void drain() noexcept;

  // Convenience: one synchronous op (queue, submit, wait), checked: short transfers are errors.
  status sync_io(io_op op, uint32_t file, void* buf, uint32_t len, uint64_t offset) noexcept;

  uint32_t queue_depth() const noexcept { return features_.queue_depth; }
  uint32_t queued() const noexcept { return queued_; }
  uint32_t in_flight() const noexcept { return in_flight_; }
  bool idle() const noexcept { return queued_ == 0 && in_flight_ == 0 && synthetic_count_ == 0; }
  const engine_features& features() const noexcept { return features_; }
  // Whether the calling thread may drive the ring now (single issuer: the owner, or anyone when idle).
  bool can_drive() const noexcept;
  void set_fault(const fault_plan& plan) noexcept;
  // Ops queued so far of each kind (what the fault seam counts).
  uint64_t ops_queued(io_op op) const noexcept { return op_counts_[static_cast<int>(op)]; }

 private:
  struct impl;
  explicit uring_engine(const engine_options& options);
  status setup_ring(bool with_iopoll);
  status register_all();
  status ensure_owner_thread() noexcept;
  status probe_iopoll(int fd);
  status queue_impl(io_op op, uint32_t file, void* buf, const iovec* iov, uint32_t len_or_iovs, uint64_t offset,
                    uint64_t user_data) noexcept;

  engine_options options_;
  engine_features features_{};
  std::unique_ptr<impl> impl_;
  std::byte* staging_ = nullptr;
  uint64_t staging_bytes_ = 0;
  uint32_t queued_ = 0;
  uint32_t in_flight_ = 0;        // submitted to the kernel, completion not yet reaped
  uint32_t synthetic_count_ = 0;  // injected failures waiting to be reported
  uint64_t op_counts_[3] = {0, 0, 0};
  fault_plan fault_{};
  uint64_t fault_base_ = 0;
};

}  // namespace instinfer::io
