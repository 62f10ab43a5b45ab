// instinfer's io_uring engine (public): one ring, registered files, a registered staging pool,
// batched submissions, per-component completion handlers and a fault-injection seam. It knows
// nothing about KV caches: the SSD backend and the emulated CSD's flash both sit on it, and the
// benchmarks drive it directly.
//
// Usage: create() once, add_file() the files, queue() reads/writes (into the staging pool or any
// suitably aligned buffer), submit() once per batch, then collect completions in one of two ways
// (pick one per engine):
//   - wait(): the caller gets the raw completions (user_data, result) and sorts them out itself;
//   - dispatch(): every component that queues I/O registers a completion_handler once and tags
//     its requests with handler_tag(handler, payload); dispatch() hands each completion to the
//     handler that queued it. Whoever blocks for a completion may so reap another component's
//     I/O, and that component's own bookkeeping still sees it.
// Completions carry the kernel's result (bytes, or -errno); check_completion() turns one into a
// status.
//
// Threading: one engine is driven by one thread at a time; it is not internally locked. With
// SINGLE_ISSUER (the default when the kernel has it) the ring belongs to the thread that set it
// up. When another thread calls in while nothing is in flight, the ring is rebuilt for that
// thread (files and buffers re-registered); with I/O in flight it is an error (kBusy).
// Handlers run on the driving thread, inside dispatch().
//
// Errors: every call that can fail returns a status (hot paths are noexcept); nothing throws.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>

#include <sys/uio.h>

#include "instinfer/core/status.hpp"
#include "instinfer/io/storage_file.hpp"

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

// user_data of a request routed by dispatch(): the handler's id in the top kHandlerBits bits,
// the owner's own payload (a slot, a run index) below. Id 0 names no handler.
inline constexpr unsigned kHandlerBits = 8;
inline constexpr unsigned kPayloadBits = 64 - kHandlerBits;
inline constexpr uint64_t kMaxPayload = (uint64_t{1} << kPayloadBits) - 1;
inline constexpr uint32_t kMaxHandlers = (1u << kHandlerBits) - 1;
constexpr uint64_t handler_tag(uint32_t handler, uint64_t payload) noexcept {
  return (uint64_t{handler} << kPayloadBits) | (payload & kMaxPayload);
}

struct completion {
  uint64_t user_data = 0;
  int32_t result = 0;      // bytes transferred, or -errno
  uint32_t requested = 0;  // bytes asked for (0 for fsync)
  io_op op = io_op::kRead;

  uint32_t handler() const noexcept { return static_cast<uint32_t>(user_data >> kPayloadBits); }
  uint64_t payload() const noexcept { return user_data & kMaxPayload; }
  // The transfer moved fewer bytes than asked (an fsync never is short).
  bool short_transfer() const noexcept {
    return result >= 0 && op != io_op::kFsync && static_cast<uint32_t>(result) < requested;
  }
};
static_assert(handler_tag(3, 5) >> kPayloadBits == 3 && (handler_tag(3, 5) & kMaxPayload) == 5);

// The owner of some of an engine's requests. Registered once (add_handler); must outlive the
// engine's use of it (drain() the engine before a handler dies). on_completion runs on the thread
// that drives the engine, inside dispatch(); it must not call dispatch() or drain() itself.
class completion_handler {
 public:
  virtual void on_completion(const completion& c) noexcept = 0;

 protected:
  completion_handler() = default;
  completion_handler(const completion_handler&) = default;
  completion_handler& operator=(const completion_handler&) = default;
  ~completion_handler() = default;
};

// storage_file, open_storage_file and errno_status: instinfer/io/storage_file.hpp.
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
  // Register a handler for dispatch(); the id goes into handler_tag(). At most kMaxHandlers.
  result<uint32_t> add_handler(completion_handler& handler) noexcept;
  // wait(), then hand each completion to the handler its tag names (a completion whose tag names
  // no registered handler is dropped). Returns how many completions arrived.
  result<uint32_t> dispatch(uint32_t min_complete) noexcept;
  // Wait for and discard everything in flight (error paths, teardown); handlers are not called:
  // the caller resets what it was waiting for.
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
  completion_handler* handlers_[kMaxHandlers + 1] = {};  // by id; [0] stays empty
  uint32_t n_handlers_ = 0;
  fault_plan fault_{};
  uint64_t fault_base_ = 0;
};

}  // namespace instinfer::io
