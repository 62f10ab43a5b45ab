// The csd backend: KV lives on emulated computational storage drives (instinfer-csd processes)
// and decode attention runs inside them, next to the flash. Only q, k, v and the attention output
// (plus fixed-size command entries) cross the host link per decode step: the drives hold the page
// tables themselves, mirrored from the write commands (and from a map command after a fork or a
// truncation changed a table), so an attend command carries (sequence, layer, query) only.
//
// URI: csd:[FLASH_PATH][?options]. Empty path: RAM-backed flash. Options:
//   drives=N (1)          kv heads are partitioned over N drives; the host concatenates outputs
//   cores=N (4)           attention worker threads per drive
//   channels=8 dies=8 channel_gbps=1.4 read_us=20 program_us=200 erase_us=2000
//   page=4096 pages_per_block=256 blocks_per_die=64 (or capacity=BYTES per drive)
//   link_gbps=7 link_us=2 buffer_mb=512 data_mb=16 buffered=0
//   timeout_ms=5000       per command; when given, also the drive's start-up (else 60 s)
//   attach=NAME[,NAME...]  use running drives (instinfer-csd --name NAME) instead of starting them
//   device=PATH emulator=CMD  the drive binary (default: csd::device_binary_candidates), and a
//                         runner for it (e.g. qemu-aarch64-static)
//   debug_attend_delay_ms=N  test seam: every attend sleeps on the drive
// With several drives and a flash path, drive d uses FLASH_PATH.d.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string_view>

#include "instinfer/backend/backend.hpp"
#include "instinfer/backend/uri.hpp"

namespace instinfer {

namespace csd {
struct device_stats;
}

class csd_backend final : public backend {
 public:
  static constexpr std::string_view kScheme = "csd";
  // This component was built (INSTINFER_CSD=ON: instinfer::csd is linked).
  static constexpr bool compiled_in() noexcept {
#if defined(INSTINFER_WITH_CSD) && INSTINFER_WITH_CSD
    return true;
#else
    return false;
#endif
  }
  // The drive binary can be found (INSTINFER_CSD_DEVICE, or csd::device_binary_candidates).
#if defined(INSTINFER_WITH_CSD) && INSTINFER_WITH_CSD
  static bool available() noexcept;
#else
  static bool available() noexcept {
    return false;
  }
#endif

  static result<std::unique_ptr<csd_backend>> create(const backend_uri& uri);
  ~csd_backend() override;

  std::string_view name() const noexcept override {
    return kScheme;
  }
  uint32_t preferred_page_bytes() const noexcept override;
  status configure(const backend_config& config) override;
  uint64_t capacity_chunks() const noexcept override;
  uint64_t free_chunks() const noexcept override;
  result<chunk_id> allocate_chunk(const chunk_hint& hint) noexcept override;
  void release_chunk(chunk_id id) noexcept override;
  status write_tokens(chunk_id id, const chunk_hint& hint, uint32_t first, uint32_t n, const std::byte* k,
                      const std::byte* v) noexcept override;
  status copy_tokens(chunk_id dst, const chunk_hint& dst_hint, chunk_id src, uint32_t n) noexcept override;
  status read_chunk(chunk_id id, uint32_t n_tokens, std::byte* dst) noexcept override;
  // The drive protocol has no flush command (written pages are on the drive's flash, open chunks in
  // its DRAM group buffer): flush is a round trip to every drive, so a lost or hung drive is
  // reported (kDeviceLost, kTimeout) as by every other call.
  status flush() noexcept override;
  // csd:PATH?persist=1 (one drive, file flash): the drive commits its mapping and the page tables
  // (docs/persistence.md); null otherwise.
  persistent_store* persistence() noexcept override;
  status attend(uint32_t layer, const attend_batch& batch) noexcept override;
  // Causal chunk attention inside the drive (attend-chunk): query rows go over the link, the drive
  // reads each K/V page once per chunk; a sequence's rows split over commands where the data area
  // is too small for them.
  status attend_causal(uint32_t layer, const attend_batch& batch) noexcept override;
  bool runs_causal() const noexcept override {
    return true;
  }
  // With cache_options::sparf the drives keep the channel-indexed K copy and run SparF themselves.
  bool runs_sparf() const noexcept override;
  // With cache_options::page_summaries the drives keep the page summaries and run that policy.
  bool runs_page_summaries() const noexcept override;
  status attend_sparse(uint32_t layer, const attend_batch& batch, const sparf_params& params,
                       sparf_counters* counters) noexcept override;
  void on_sequence_freed(seq_id seq) noexcept override;
  backend_stats stats() const noexcept override;

  // Extras for tests and benchmarks.
  uint32_t n_drives() const noexcept;
  int32_t device_pid(uint32_t drive) const noexcept;
  // Counters of one drive, straight from its stats command.
  status drive_stats(uint32_t drive, csd::device_stats& out) const noexcept;
  // Free pending chunks on the drives and erase their dead blocks now.
  status reclaim() noexcept;

 private:
  struct impl;
  explicit csd_backend(std::unique_ptr<impl> p);
  status send_attend_chunk(uint32_t layer, const attend_batch& batch) noexcept;
  status send_attend(uint32_t layer, const attend_batch& batch, const sparf_params* sparse,
                     sparf_counters* counters) noexcept;
  std::unique_ptr<impl> impl_;
};

#if defined(INSTINFER_WITH_CSD) && INSTINFER_WITH_CSD
result<std::unique_ptr<backend>> make_csd_backend(const backend_uri& uri);
#else
inline result<std::unique_ptr<backend>> make_csd_backend(const backend_uri& /*uri*/) {
  return status{errc::kUnsupported, "the csd backend is not built into this instinfer (INSTINFER_CSD=OFF)"};
}
#endif

}  // namespace instinfer
