// What the drive's components share: its options, the flash and its block allocator, the flash
// timing model, the counters, and the clocks of the command being executed. Owned by the drive
// (dispatch.cpp); components hold a reference. Commands run one at a time, so nothing here is
// locked; attend workers only read flash through their own readers.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>

#include "block_manager.hpp"
#include "drive.hpp"
#include "flash_store.hpp"
#include "instinfer/csd/models.hpp"
#include "instinfer/csd/protocol.hpp"

namespace instinfer::csd {

struct drive_context {
  drive_context(const drive_options& options, std::unique_ptr<flash_store> flash)
      : o(options), store(std::move(flash)), blocks(options.flash), timeline(options.flash) {}

  drive_options o;
  std::unique_ptr<flash_store> store;
  block_manager blocks;
  flash_timeline timeline;
  device_stats stats{};
  uint64_t use_clock = 0;      // LRU stamps of group-buffer slots and column tails
  uint64_t program_stamp = 0;  // block allocation order (erase picks the least recently written)
  double now_ns = 0.0;         // modelled drive clock: the current command's start
  double flash_end = 0.0;      // latest flash completion of the current command
  attend_work work{};          // the current command's attention work (compute model)

  double cmd_start() const noexcept { return now_ns; }
  void flash_done_at(double t) noexcept { flash_end = std::max(flash_end, t); }
  // A page program on the flash timeline: its die is busy for tPROG, later reads of it wait. The
  // command does not wait for it (the drive acknowledges writes from its DRAM buffer).
  void program_page(uint32_t ppn) noexcept {
    timeline.program(ppn, now_ns);
    stats.modelled_program_ns += static_cast<uint64_t>(o.flash.transfer_ns() + o.flash.program_us * 1e3);
  }
  // A synchronous page read by the FTL (the attend engine models its reads in batches).
  void note_read(uint32_t ppn) noexcept {
    ++stats.flash_pages_read;
    flash_done_at(timeline.read(ppn, now_ns));
  }
};

}  // namespace instinfer::csd
