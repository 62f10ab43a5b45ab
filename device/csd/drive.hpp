// The emulated drive's firmware, independent of how commands arrive: namespaces, the KV FTL
// (token-indexed L2P, DRAM group buffer, block allocator), validation of every command, and the
// in-storage attention engine (dispatch.cpp composes token_ftl, group_buffer, column_ftl and
// attend_engine). queue_server.hpp feeds it from the shared-memory queue pairs; tests feed it
// directly.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "flash_store.hpp"
#include "instinfer/core/status.hpp"
#include "instinfer/csd/models.hpp"
#include "instinfer/csd/protocol.hpp"

namespace instinfer::csd {

struct drive_options {
  flash_params flash{};
  link_params link{};
  compute_params compute{};              // modelled embedded cores (n_cores below are the emulator's threads)
  std::string flash_path;                // empty: RAM-backed flash
  int flash_fd = -1;                     // >= 0: flash_path opened by the host that started the drive
  int flash_lock_fd = -1;                // with flash_fd: the descriptor holding its lock (shared)
  bool keep_flash = false;               // keep a flash file the drive created itself (default: removed at exit)
  bool allow_buffered = false;           // file flash without O_DIRECT when the filesystem refuses it
  uint32_t n_cores = 4;                  // attention worker threads
  uint64_t buffer_bytes = 512ull << 20;  // DRAM group buffer per namespace
  // DRAM for page summaries, every namespace together. A chunk whose summary would not fit keeps
  // none: attending it rebuilds one from flash for that command (summary_rebuild_pages_read).
  uint64_t summary_bytes = 1024ull << 20;
  uint32_t max_namespaces = 16;
  uint32_t pages_per_batch = 16;       // chunks a worker streams per read batch (double-buffered)
  uint32_t debug_attend_delay_ms = 0;  // test seam: attend sleeps this long (kill-during-attend tests)
  flash_fault fault{};                 // test seam: injected flash errors (fault tests)

  status validate() const;
};

// Result of one command.
struct command_outcome {
  cq_entry cqe{};
  std::string error;          // message when cqe.status != 0
  uint64_t result_bytes = 0;  // bytes of result payload produced
  bool shutdown = false;
};

class drive {
 public:
  static result<std::unique_ptr<drive>> create(const drive_options& options);
  virtual ~drive() = default;

  // Execute one command arriving on queue pair `qp`. `area` is that queue pair's data area
  // (area_bytes long): payload and result ranges named by `e` are validated against it.
  virtual command_outcome execute(uint32_t qp, const sq_entry& e, std::byte* area, uint64_t area_bytes) noexcept = 0;
  // The queue pair changed hands (or its owner died): delete the namespaces it owned.
  virtual void drop_queue_pair(uint32_t qp) noexcept = 0;
  virtual identify_data identify() const noexcept = 0;
  virtual device_stats stats() const noexcept = 0;
};

}  // namespace instinfer::csd
