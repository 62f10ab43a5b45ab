// Host side of one emulated drive: start (or attach to) an instinfer-csd process, own one queue
// pair of its shared memory, submit commands and wait for their completions in bounded time.
//
// The only memory shared with the drive is the region of queue_pair.hpp: queue entries and the
// queue pair's data area. A started drive gets the region as an anonymous memfd (nothing else can
// open it); an attached drive publishes /dev/shm/instinfer-csd-NAME with mode 0600.
//
// Waiting never hangs: a completion is awaited at most timeout_ms; while waiting, the client checks
// every few milliseconds that the drive process is alive. A drive that died yields kDeviceLost, one
// that stopped answering kTimeout; after either, the connection is closed and every later call
// fails fast with kDeviceLost.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "instinfer/core/status.hpp"
#include "instinfer/csd/protocol.hpp"
#include "instinfer/csd/queue_pair.hpp"

namespace instinfer::csd {

struct connection_options {
  std::string device_path;               // instinfer-csd; empty: see device_binary_candidates
  std::string emulator;                  // run the drive under this (e.g. qemu-aarch64-static); $INSTINFER_CSD_EMULATOR
  std::string attach;                    // name of a running drive (instinfer-csd --name NAME) instead of starting one
  std::vector<std::string> device_args;  // drive options for a started drive (--flash, --channels, ...)
  // A started drive's flash, opened (and locked) by the host: the drive gets it as descriptor 4
  // (--flash-fd 4) and the descriptor holding its lock as 5 (--flash-lock-fd 5, shared so that the
  // lock lasts while either process lives). -1: none (RAM flash, or the drive opens --flash itself).
  int flash_fd = -1;
  int flash_lock_fd = -1;
  region_layout layout{1, 64, 16ull << 20};  // for a started drive
  uint32_t timeout_ms = 5000;                // per command; also how long an attached drive may take to be ready
  uint32_t start_timeout_ms = 60000;         // a started drive's start-up (qemu can be slow); the csd: URI's
                                             // timeout_ms sets it when given
};

// Where instinfer-csd is looked for, in order: device_path alone when set, else
// $INSTINFER_CSD_DEVICE alone when set, else the folder of the file holding this library's code
// (libinstinfer.so, or the executable it was linked into) and its ../libexec and ../bin, the
// install prefix's libexec (CMAKE_INSTALL_FULL_LIBEXECDIR), and the folder of /proc/self/exe and
// its ../bin. Normalised, without duplicates.
std::vector<std::string> device_binary_candidates(const connection_options& options);
// The first executable candidate (empty when none is).
std::string find_device_binary(const connection_options& options);

class connection {
 public:
  static result<std::unique_ptr<connection>> open(const connection_options& options);
  ~connection();
  connection(const connection&) = delete;
  connection& operator=(const connection&) = delete;

  // The queue pair's data area: payloads and results live here (offsets in sq_entry).
  std::byte* area() noexcept { return view_.data; }
  uint64_t area_bytes() const noexcept { return view_.data_bytes; }

  // Submit one command (cid is assigned). At most one command is outstanding per connection.
  status post(sq_entry e) noexcept;
  // Wait for the posted command. A failed command returns its status with the drive's message;
  // the completion (with modelled time) is stored in last().
  status wait() noexcept;
  status execute(const sq_entry& e) noexcept {
    INSTINFER_TRY(post(e));
    return wait();
  }
  const cq_entry& last() const noexcept { return last_; }

  bool lost() const noexcept { return lost_; }
  bool started() const noexcept { return child_ > 0; }
  int32_t device_pid() const noexcept;
  const identify_data& identity() const noexcept { return identity_; }

  // Link bytes this connection moved (as the link model counts them), excluding kStats and
  // kIdentify, which are control-plane.
  uint64_t link_bytes_in() const noexcept { return link_in_; }
  uint64_t link_bytes_out() const noexcept { return link_out_; }

 private:
  connection() = default;
  status start(const connection_options& o);
  status attach(const connection_options& o);
  status check_alive() noexcept;
  void fail_closed() noexcept;

  int fd_ = -1;
  void* map_ = nullptr;
  uint64_t map_bytes_ = 0;
  region_header* header_ = nullptr;
  qp_view view_{};
  uint32_t qp_ = 0;
  int child_ = -1;
  uint16_t next_cid_ = 1;
  bool outstanding_ = false;
  bool lost_ = false;
  bool counted_ = true;
  uint32_t timeout_ms_ = 5000;
  cq_entry last_{};
  identify_data identity_{};
  uint64_t link_in_ = 0;
  uint64_t link_out_ = 0;
};

}  // namespace instinfer::csd
