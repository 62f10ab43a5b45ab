// The shared-memory region between host and drive: a header, then queue pairs.
//
//   [region_header                       4 KiB]
//   per queue pair q (qp_stride bytes each):
//     [qp_control                        4 KiB]   indices, owner, doorbell words
//     [sq_entry  sq[depth]]                       host writes, drive reads
//     [cq_entry  cq[depth]]                       drive writes, host reads
//     [error_record errors[depth]]                message of a failed command, slot cid % depth
//     [data area  data_bytes]                     payloads named by sq_entry offsets
//
// Doorbells: the host publishes sq_tail (release) and bumps header.doorbell; it issues a futex
// wake only when the drive has said it is going to sleep (header.device_sleeping). The drive
// posts completions by publishing cq_tail and wakes the host the same way (qp.host_waiting).
// The futex words are process-shared (no FUTEX_PRIVATE_FLAG), so they work between the host and
// a drive running under qemu-user as well. All atomics are lock-free 32/64-bit ones.
//
// A queue pair belongs to one host client at a time (owner_pid, claimed by compare-and-swap);
// namespaces created on it belong to it, and the drive rejects commands for another queue pair's
// namespaces. `generation` changes on every claim so the drive can drop a previous owner's state.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <ctime>

#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "instinfer/csd/protocol.hpp"

namespace instinfer::csd {

inline constexpr uint64_t kRegionMagic = 0x3144534346'4e49ull;  // "INFCSD1"
inline constexpr uint64_t kHeaderBytes = 4096;
inline constexpr uint64_t kControlBytes = 4096;
inline constexpr uint32_t kMaxQueuePairs = 64;
inline constexpr uint32_t kErrorTextBytes = 248;

static_assert(std::atomic<uint32_t>::is_always_lock_free && std::atomic<uint64_t>::is_always_lock_free);

struct region_header {
  uint64_t magic = 0;
  uint32_t version = 0;
  uint32_t n_queue_pairs = 0;
  uint32_t depth = 0;  // entries per SQ and per CQ
  uint32_t reserved0 = 0;
  uint64_t data_bytes = 0;  // data area per queue pair
  uint64_t qp_stride = 0;
  uint64_t total_bytes = 0;
  std::atomic<uint32_t> device_ready{0};  // 1 once the drive serves; 2 when it has shut down
  std::atomic<int32_t> device_pid{0};
  std::atomic<uint32_t> doorbell{0};  // futex word the drive sleeps on
  std::atomic<uint32_t> device_sleeping{0};
  std::atomic<uint64_t> heartbeat{0};  // bumped by the drive's loop while alive
};
static_assert(sizeof(region_header) <= kHeaderBytes);

struct qp_control {
  std::atomic<int32_t> owner_pid{0};  // 0: free
  std::atomic<uint32_t> generation{0};
  std::atomic<uint32_t> sq_tail{0};  // written by the host
  std::atomic<uint32_t> sq_head{0};  // written by the drive
  std::atomic<uint32_t> cq_tail{0};  // written by the drive; host futex word
  std::atomic<uint32_t> cq_head{0};  // written by the host
  std::atomic<uint32_t> host_waiting{0};
};
static_assert(sizeof(qp_control) <= kControlBytes);

struct error_record {
  uint16_t cid = 0;
  int16_t status = 0;
  uint32_t reserved = 0;
  char text[kErrorTextBytes] = {};
};
static_assert(sizeof(error_record) == 256);

constexpr uint64_t align_up(uint64_t v, uint64_t a) noexcept {
  return (v + a - 1) / a * a;
}

// Offsets of everything in the region, derived from (queue pairs, depth, data bytes).
struct region_layout {
  uint32_t n_queue_pairs = 1;
  uint32_t depth = 64;
  uint64_t data_bytes = 16ull << 20;

  constexpr uint64_t sq_offset() const noexcept { return kControlBytes; }
  constexpr uint64_t cq_offset() const noexcept { return sq_offset() + uint64_t{depth} * sizeof(sq_entry); }
  constexpr uint64_t errors_offset() const noexcept { return cq_offset() + uint64_t{depth} * sizeof(cq_entry); }
  constexpr uint64_t data_offset() const noexcept {
    return align_up(errors_offset() + uint64_t{depth} * sizeof(error_record), 4096);
  }
  constexpr uint64_t qp_stride() const noexcept { return align_up(data_offset() + data_bytes, 4096); }
  constexpr uint64_t qp_base(uint32_t q) const noexcept { return kHeaderBytes + uint64_t{q} * qp_stride(); }
  constexpr uint64_t total_bytes() const noexcept { return kHeaderBytes + uint64_t{n_queue_pairs} * qp_stride(); }

  constexpr bool valid() const noexcept {
    return n_queue_pairs >= 1 && n_queue_pairs <= kMaxQueuePairs && depth >= 2 && depth <= 4096 &&
           (depth & (depth - 1)) == 0 && data_bytes >= 4096 && data_bytes <= (1ull << 34) && data_bytes % 4096 == 0;
  }
};
static_assert(region_layout{1, 64, 1 << 20}.data_offset() % 4096 == 0);
static_assert(region_layout{2, 64, 1 << 20}.qp_base(1) == kHeaderBytes + region_layout{2, 64, 1 << 20}.qp_stride());

// Typed view of one queue pair inside a mapped region. Trivially copyable; owns nothing.
struct qp_view {
  qp_control* control = nullptr;
  sq_entry* sq = nullptr;
  cq_entry* cq = nullptr;
  error_record* errors = nullptr;
  std::byte* data = nullptr;
  uint64_t data_bytes = 0;
  uint32_t depth = 0;

  static qp_view at(std::byte* region_base, const region_layout& l, uint32_t q) noexcept {
    std::byte* b = region_base + l.qp_base(q);
    return {reinterpret_cast<qp_control*>(b),
            reinterpret_cast<sq_entry*>(b + l.sq_offset()),
            reinterpret_cast<cq_entry*>(b + l.cq_offset()),
            reinterpret_cast<error_record*>(b + l.errors_offset()),
            b + l.data_offset(),
            l.data_bytes,
            l.depth};
  }
  // [offset, offset + bytes) lies inside the data area (overflow-safe).
  bool data_range_ok(uint64_t offset, uint64_t bytes) const noexcept {
    return offset <= data_bytes && bytes <= data_bytes - offset;
  }
};

// Process-shared futex wait on `word` while it equals `expected`, at most timeout_ns.
inline void futex_wait(std::atomic<uint32_t>* word, uint32_t expected, int64_t timeout_ns) noexcept {
  timespec ts{static_cast<time_t>(timeout_ns / 1000000000), static_cast<long>(timeout_ns % 1000000000)};
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT, expected, &ts, nullptr, 0);
}
inline void futex_wake_all(std::atomic<uint32_t>* word) noexcept {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE, INT32_MAX, nullptr, nullptr, 0);
}

}  // namespace instinfer::csd
