// The drive's side of the shared-memory queue pairs (queue_pair.hpp): the device-side twin of
// src/backend/csd/client.cpp. It publishes the region header, polls every queue pair's submission queue,
// executes each command on the drive, posts its completion (and error text), wakes a waiting host,
// notices queue pairs changing hands or their owners dying, and sleeps on the doorbell futex when
// idle. It does not own the process: the instinfer-csd main and in-process tests both run it.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "drive.hpp"
#include "instinfer/core/status.hpp"
#include "instinfer/csd/queue_pair.hpp"

namespace instinfer::csd {

// The queue-pair region mapped into this process: created under a name for hosts to attach to, or
// handed over as an fd by the host that started the drive.
class shared_region {
 public:
  // /dev/shm/instinfer-csd-NAME, mode 0600, created exclusively and unlinked on destruction.
  static result<shared_region> create_named(const std::string& name, const region_layout& layout);
  // A region the host created (memfd); it must be at least layout.total_bytes() long.
  static result<shared_region> map_fd(int fd, const region_layout& layout);

  shared_region(shared_region&& o) noexcept;
  shared_region& operator=(shared_region&&) = delete;
  shared_region(const shared_region&) = delete;
  ~shared_region();

  std::byte* base() const noexcept { return base_; }
  const region_layout& layout() const noexcept { return layout_; }
  bool named() const noexcept { return !shm_name_.empty(); }

 private:
  shared_region() = default;
  std::byte* base_ = nullptr;
  region_layout layout_{};
  std::string shm_name_;
  int fd_ = -1;  // owned only for a named region
};

class queue_server {
 public:
  // fresh_queue_pairs: initialise every queue pair's control block (a named region nobody uses
  // yet); false when the host that started the drive already claimed queue pair 0.
  queue_server(drive& dev, std::byte* region, const region_layout& layout, bool fresh_queue_pairs) noexcept;

  // Write the header and mark the drive ready: hosts may submit from now on.
  void publish() noexcept;
  // One pass over every queue pair; true when any command ran.
  bool poll() noexcept;
  // Poll, spin briefly, then sleep on the doorbell, until `stop` or a shutdown command.
  void serve(const std::atomic<bool>& stop) noexcept;
  // Mark the drive gone and wake every waiting host.
  void close() noexcept;
  bool shut_down() const noexcept { return shutdown_; }

 private:
  bool serve_queue_pair(uint32_t q, qp_view& v) noexcept;  // true when a command ran
  void complete(qp_view& v, const sq_entry& e, const command_outcome& r) noexcept;
  void sleep_until_doorbell() noexcept;

  drive& dev_;
  std::byte* base_;
  region_layout layout_;
  region_header* header_;
  std::vector<qp_view> qps_;
  std::vector<uint32_t> known_generation_;
  uint64_t loops_ = 0;
  bool shutdown_ = false;
};

}  // namespace instinfer::csd
