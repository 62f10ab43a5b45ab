// Where the emulated drive's NAND bytes live: RAM (deterministic tests) or a file / block device
// read and written with io_uring and O_DIRECT. Physical page numbers come from the FTL; the store
// only moves whole pages. Timing is not its business (the flash model in csd/models.hpp is).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "instinfer/core/status.hpp"
#include "instinfer/csd/models.hpp"

namespace instinfer::csd {

// Batched page reads for one worker thread: queue reads, then wait for all of them. A reader is
// used by one thread at a time; its buffers must be page-aligned (O_DIRECT).
class page_reader {
 public:
  virtual ~page_reader() = default;
  virtual status queue(uint32_t ppn, std::byte* dst) noexcept = 0;
  // Start queued reads without waiting (io_uring submit; RAM: no-op).
  virtual status submit() noexcept = 0;
  virtual status wait_all() noexcept = 0;
};

class flash_store {
 public:
  virtual ~flash_store() = default;
  // Program n consecutive pages starting at ppn (same block) from src (page-aligned).
  virtual status program(uint32_t ppn, uint32_t n_pages, const std::byte* src) noexcept = 0;
  // Erase the block holding pages [first_ppn, first_ppn + pages_per_block).
  virtual status erase_block(uint32_t first_ppn) noexcept = 0;
  // One page, synchronously.
  virtual status read(uint32_t ppn, std::byte* dst) noexcept = 0;
  virtual result<std::unique_ptr<page_reader>> make_reader(uint32_t depth) noexcept = 0;
  // Every page programmed so far is durable (fdatasync of a file; nothing to do in RAM).
  virtual status sync() noexcept = 0;
  virtual bool direct_io() const noexcept = 0;
  virtual bool ram() const noexcept = 0;
};

// Test seam: injected flash errors. Page reads (synchronous and through readers) and page-run
// programs are counted from 1; those numbered [nth, nth + count) fail with kIoError, as an EIO
// from the device would. The drive process sets it from INSTINFER_CSD_FAULT (drive_cli.cpp).
struct flash_fault {
  enum class kind : uint8_t { kNone, kRead, kProgram };
  kind op = kind::kNone;
  uint64_t nth = 0;
  uint64_t count = 1;
};

// RAM-backed flash; blocks are allocated when first programmed and freed when erased.
std::unique_ptr<flash_store> make_ram_flash(const flash_params& p);
struct flash_file_options {
  std::string path;             // the file or block device (also named in messages)
  int fd = -1;                  // >= 0: a descriptor of `path` handed over by the host (owned from now on)
  int lock_fd = -1;             // with fd: the descriptor holding the file's lock (owned, kept open)
  bool allow_buffered = false;  // a file without O_DIRECT where the filesystem refuses it
  bool keep = false;            // keep a file the drive created when the store goes
};
// File or block device, sized (sparse) to the flash capacity. Opened by the drive itself (fd < 0):
// created 0600 when missing, never through a symbolic link, and locked (kBusy when another cache
// or drive has it; io/storage_file.hpp); a file it created is removed when the store is destroyed
// or the drive fails to start, unless `keep`. A handed-over descriptor is used as it is (its
// opener created, locked and removes the file). O_DIRECT is used when the filesystem allows it;
// otherwise the file is opened buffered only if `allow_buffered`, else kUnsupported.
result<std::unique_ptr<flash_store>> make_file_flash(const flash_params& p, const flash_file_options& options);
// `inner` with the fault injected (fault.op != kNone).
std::unique_ptr<flash_store> make_faulty_flash(std::unique_ptr<flash_store> inner, const flash_fault& fault);

}  // namespace instinfer::csd
