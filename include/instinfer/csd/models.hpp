// Flash and link models of the emulated CSD. Everything they produce is *modelled* time: what
// the drive described by the parameters would take, not the emulator's wall-clock.
//
// Flash: `channels` buses of `channel_gbps` each; every channel has `dies_per_channel` dies that
// work in parallel (a die reads a page into its register in read_us, programs one in program_us,
// erases a block in erase_us) and share the channel bus for page transfers. A page read occupies
// its die for read_us and then the bus for page_bytes / channel rate; a program occupies the bus
// first, then the die. The timeline keeps, per die and per channel, the modelled time it becomes
// free, so queueing of reads (and erases) across commands is modelled. Programs run in the
// background of a second timeline: the controller gives reads priority (program suspend), so a
// burst of programs (a prefill) delays later programs but not reads. Programs' own throughput
// (bus + tPROG per die) is still modelled and reported.
//
// Link: PCIe 4.0 x4 by default: 7 GB/s and a fixed per-command latency (doorbell, SQ fetch,
// completion, interrupt).
//
// Defaults follow the paper (InstInfer, HPCA 2025): 8 channels x 1.4 GB/s = 11.2 GB/s internal,
// 4 KiB pages, 7 GB/s link. Die count and array times are chosen so the bus, not the dies, bounds
// a channel (8 dies x 4 KiB / 20 us = 1.6 GB/s > 1.4 GB/s), as the paper's figures assume.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "instinfer/core/status.hpp"

namespace instinfer::csd {

struct flash_params {
  uint32_t channels = 8;
  uint32_t dies_per_channel = 8;
  uint32_t blocks_per_die = 64;
  uint32_t pages_per_block = 256;
  uint32_t page_bytes = 4096;
  double channel_gbps = 1.4;  // per channel, 1e9 bytes/s
  double read_us = 20.0;      // array read (tR)
  double program_us = 200.0;  // tPROG
  double erase_us = 2000.0;   // tBERS

  constexpr uint32_t lanes() const noexcept { return channels * dies_per_channel; }
  constexpr uint64_t total_blocks() const noexcept { return uint64_t{lanes()} * blocks_per_die; }
  constexpr uint64_t total_pages() const noexcept { return total_blocks() * pages_per_block; }
  constexpr uint64_t capacity_bytes() const noexcept { return total_pages() * page_bytes; }
  constexpr double internal_gbps() const noexcept { return channels * channel_gbps; }
  // Modelled nanoseconds to move one page over a channel bus.
  constexpr double transfer_ns() const noexcept { return page_bytes / channel_gbps; }

  status validate() const {
    if (channels == 0 || channels > 256) return {errc::kInvalidArgument, "flash channels must be in [1, 256]"};
    if (dies_per_channel == 0 || dies_per_channel > 64)
      return {errc::kInvalidArgument, "dies per channel must be in [1, 64]"};
    if (blocks_per_die == 0) return {errc::kInvalidArgument, "blocks per die must be >= 1"};
    if (pages_per_block == 0 || pages_per_block > 65536)
      return {errc::kInvalidArgument, "pages per block must be in [1, 65536]"};
    if (page_bytes < 512 || page_bytes > 65536 || (page_bytes & (page_bytes - 1)) != 0)
      return {errc::kInvalidArgument,
              "flash page must be a power of two in [512, 65536], got " + std::to_string(page_bytes)};
    if (!(channel_gbps > 0.0) || channel_gbps > 1e4)
      return {errc::kInvalidArgument, "channel bandwidth must be in (0, 1e4] GB/s"};
    if (!(read_us >= 0.0) || !(program_us >= 0.0) || !(erase_us >= 0.0))
      return {errc::kInvalidArgument, "flash times must be >= 0"};
    if (total_pages() > (uint64_t{1} << 32) - 2)
      return {errc::kInvalidArgument, "flash has more than 2^32 pages: use bigger pages or fewer blocks"};
    return {};
  }
};

struct link_params {
  double gbps = 7.0;        // PCIe 4.0 x4, 1e9 bytes/s
  double command_us = 2.0;  // per command: doorbell, SQE fetch, completion, interrupt

  constexpr double transfer_ns(uint64_t bytes) const noexcept { return static_cast<double>(bytes) / gbps; }
  constexpr double command_ns(uint64_t bytes_in, uint64_t bytes_out) const noexcept {
    return command_us * 1e3 + transfer_ns(bytes_in + bytes_out);
  }
  status validate() const {
    if (!(gbps > 0.0) || gbps > 1e4) return {errc::kInvalidArgument, "link bandwidth must be in (0, 1e4] GB/s"};
    if (!(command_us >= 0.0)) return {errc::kInvalidArgument, "link command latency must be >= 0"};
    return {};
  }
};

// Physical page numbers: lane-major, lane = channel + channels * die (so consecutive lanes are on
// different channels), then block within the lane, then page within the block.
struct flash_address {
  uint32_t lane = 0;
  uint32_t block = 0;  // within the lane
  uint32_t page = 0;   // within the block
};

constexpr flash_address decompose(const flash_params& f, uint32_t ppn) noexcept {
  const uint32_t pages_per_lane = f.blocks_per_die * f.pages_per_block;
  return {ppn / pages_per_lane, (ppn % pages_per_lane) / f.pages_per_block, ppn % f.pages_per_block};
}
constexpr uint32_t compose(const flash_params& f, flash_address a) noexcept {
  return (a.lane * f.blocks_per_die + a.block) * f.pages_per_block + a.page;
}
constexpr uint32_t lane_channel(const flash_params& f, uint32_t lane) noexcept {
  return lane % f.channels;
}
constexpr uint32_t lane_die(const flash_params& f, uint32_t lane) noexcept {
  return lane / f.channels;
}

namespace detail {
constexpr flash_params kSmallFlash{2, 2, 4, 8, 4096, 1.0, 1.0, 1.0, 1.0};
static_assert(compose(kSmallFlash, decompose(kSmallFlash, 77)) == 77);
static_assert(compose(kSmallFlash, flash_address{3, 2, 5}) == (3 * 4 + 2) * 8 + 5);
static_assert(decompose(kSmallFlash, (3 * 4 + 2) * 8 + 5).lane == 3);
static_assert(decompose(kSmallFlash, (3 * 4 + 2) * 8 + 5).block == 2);
static_assert(lane_channel(kSmallFlash, 3) == 1 && lane_die(kSmallFlash, 3) == 1);
static_assert(flash_params{}.internal_gbps() > 11.19 && flash_params{}.internal_gbps() < 11.21);
}  // namespace detail

// Modelled resource timeline: per die and per channel bus, when it is next free (ns).
class flash_timeline {
 public:
  explicit flash_timeline(const flash_params& p = {})
      : p_(p),
        die_free_(p.lanes(), 0.0),
        bus_free_(p.channels, 0.0),
        prog_die_free_(p.lanes(), 0.0),
        prog_bus_free_(p.channels, 0.0) {}

  const flash_params& params() const noexcept { return p_; }

  // A page read issued at `t` (ns); returns when its data has crossed the channel bus.
  double read(uint32_t ppn, double t) noexcept {
    const uint32_t lane = decompose(p_, ppn).lane;
    double& die = die_free_[lane];
    double& bus = bus_free_[lane_channel(p_, lane)];
    const double array_done = std::max(t, die) + p_.read_us * 1e3;
    const double xfer_end = std::max(array_done, bus) + p_.transfer_ns();
    bus = xfer_end;
    die = xfer_end;
    return xfer_end;
  }
  // A batch of page reads all issued at `t` (one command's reads: the engine keeps many in flight).
  // Event-driven per channel: every die reads its queue in order; the bus serves whichever die's
  // page is ready first (an in-order greedy reservation would serialise dies behind one another).
  // Returns when the last page has crossed its bus (t when n == 0).
  double read_batch(const uint32_t* ppns, size_t n, double t) {
    if (n == 0) return t;
    const uint32_t lanes = p_.lanes();
    // Pages per lane, in issue order (counting sort by lane).
    std::vector<uint32_t> count(lanes + 1, 0);
    for (size_t i = 0; i < n; ++i) ++count[decompose(p_, ppns[i]).lane + 1];
    for (uint32_t l = 0; l < lanes; ++l) count[l + 1] += count[l];
    std::vector<uint32_t> pending(count.begin(), count.end() - 1);  // next unread index per lane
    const std::vector<uint32_t> lane_end(count.begin() + 1, count.end());
    double end = t;
    const double tr = p_.read_us * 1e3, xfer = p_.transfer_ns();
    std::vector<double> ready(lanes, 0.0);  // when the lane's current page sits in its register
    for (uint32_t ch = 0; ch < p_.channels; ++ch) {
      double& bus = bus_free_[ch];
      for (uint32_t l = ch; l < lanes; l += p_.channels)
        if (pending[l] < lane_end[l]) ready[l] = std::max(t, die_free_[l]) + tr;
      for (;;) {
        uint32_t best = UINT32_MAX;
        for (uint32_t l = ch; l < lanes; l += p_.channels)
          if (pending[l] < lane_end[l] && (best == UINT32_MAX || ready[l] < ready[best])) best = l;
        if (best == UINT32_MAX) break;
        const double xfer_end = std::max(ready[best], bus) + xfer;
        bus = xfer_end;
        die_free_[best] = xfer_end;
        if (++pending[best] < lane_end[best]) ready[best] = xfer_end + tr;
        end = std::max(end, xfer_end);
      }
    }
    return end;
  }

  // A page program issued at `t` (background timeline); returns when the die has finished.
  double program(uint32_t ppn, double t) noexcept {
    const uint32_t lane = decompose(p_, ppn).lane;
    double& die = prog_die_free_[lane];
    double& bus = prog_bus_free_[lane_channel(p_, lane)];
    const double xfer_end = std::max({t, die, bus}) + p_.transfer_ns();
    bus = xfer_end;
    die = xfer_end + p_.program_us * 1e3;
    return die;
  }
  // Erase of block `block` of `lane` issued at `t`.
  double erase(uint32_t lane, double t) noexcept {
    double& die = die_free_[lane];
    die = std::max(t, die) + p_.erase_us * 1e3;
    return die;
  }

 private:
  flash_params p_;
  std::vector<double> die_free_;
  std::vector<double> bus_free_;
  std::vector<double> prog_die_free_;
  std::vector<double> prog_bus_free_;
};

}  // namespace instinfer::csd
