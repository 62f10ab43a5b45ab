// Device probe: what the storage under a path prefers, and the KV page size that follows.
//
// NVMe namespaces are asked directly (libnvme: LBA size, NPWG/NPWA/NOWS when the namespace marks
// them valid, NOIOB, MDTS); anything else is described by statx(STATX_DIOALIGN) and the block
// queue limits in sysfs (logical/physical block, minimum/optimal I/O size, max transfer).
//
// Page choice: at least 4 KiB, a power of two (page_geometry's rule), a multiple of the preferred
// write granularity (the largest of NPWG, physical block, minimum I/O size, DIO offset alignment)
// and no larger than the maximum transfer. `reasons` says, line by line, why.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "instinfer/core/status.hpp"

namespace instinfer {

enum class storage_kind : uint8_t { kNvme = 0, kBlockDevice = 1, kFile = 2, kUnknown = 3 };

struct device_probe_result {
  std::string path;  // what was asked about
  storage_kind kind = storage_kind::kUnknown;
  std::string block_device;     // kernel name of the device underneath ("nvme0n1", "vda"), if any
  std::string filesystem_note;  // "file on vda", "block device", ...

  // Direct I/O alignment (statx STATX_DIOALIGN); 0 when the kernel did not say.
  uint32_t dio_mem_align = 0;
  uint32_t dio_offset_align = 0;

  // Block queue limits (sysfs); 0 when unknown.
  uint32_t logical_block_bytes = 0;
  uint32_t physical_block_bytes = 0;
  uint32_t minimum_io_bytes = 0;
  uint32_t optimal_io_bytes = 0;
  uint64_t max_transfer_bytes = 0;  // max_sectors_kb (or MDTS)
  bool rotational = false;
  bool poll_queues = false;  // queue/io_poll: IOPOLL can work

  // NVMe namespace facts (libnvme); 0 when not NVMe, not reported, or not marked valid.
  bool nvme_identified = false;
  uint32_t nvme_lba_bytes = 0;
  uint32_t nvme_npwg_bytes = 0;   // preferred write granularity
  uint32_t nvme_npwa_bytes = 0;   // preferred write alignment
  uint32_t nvme_nows_bytes = 0;   // optimal write size
  uint32_t nvme_noiob_bytes = 0;  // optimal I/O boundary
  uint64_t nvme_mdts_bytes = 0;   // max data transfer (assuming a 4 KiB minimum memory page)

  // The decision.
  uint32_t write_granularity_bytes = 0;  // what page_bytes must be a multiple of
  uint32_t page_bytes = 4096;            // chosen default KV page bytes
  std::vector<std::string> reasons;      // what was found and why the choice follows

  // Multi-line human-readable report (what instinfer-probe prints).
  std::string report() const;
};

// Probe the storage that holds `path` (a file, which need not exist yet, a directory or a block
// device). Missing facts are skipped with a reason, never an error; only an unusable path is.
result<device_probe_result> probe_device(const std::string& path);

// The page-size policy alone (pure; for tests): granularity and max transfer in bytes (0: unknown).
uint32_t choose_page_bytes(uint32_t write_granularity, uint64_t max_transfer, std::vector<std::string>* reasons);

}  // namespace instinfer
