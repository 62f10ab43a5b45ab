// Flash, link and compute models of the emulated CSD. Everything they produce is *modelled* time:
// what the drive described by the parameters would take, not the emulator's wall-clock. This is
// the only model of the drive: the drive (device/csd) charges its commands with it, and the paper
// harness (bench/paper_model.hpp, `instinfer-bench paper`) calls the same functions for every flash,
// link and compute time it reports.
//
// Flash: `channels` buses of `channel_gbps` each; every channel has `dies_per_channel` dies that
// work in parallel (a die reads a page into its register in read_us, programs one in program_us,
// erases a block in erase_us) and share the channel bus for page transfers. A page read occupies
// its die for read_us and then the bus for page_bytes / channel rate, and the die stays busy until
// its register has been emptied over the bus. A program occupies the bus first (the page moves into
// the die's register), then the die for program_us. Whole pages cross the bus: the model has no
// in-page filter (the controller does not select entries out of a page register before the
// transfer), so neither has anything that uses it. Reads, programs and erases share one timeline
// per die and per channel: a read behind a program waits for it (no program suspend).
//
// Link: PCIe 4.0 x4 by default: 7 GB/s and a fixed per-command latency (doorbell, SQ fetch,
// completion, interrupt).
//
// Compute: the drive's embedded cores (compute_params): a stated number of cores x clock x fp32
// flops per cycle, applied to the work the attention kernels did (attend_work: elements through
// the kernel, scored and ranked tokens). See docs/csd.md ("Compute model") for the derivation.
//
// A command's modelled time is the overlapped maximum of its link, flash and compute times
// (command_time): the drive streams pages into the kernel while it reads, and the link moves
// q in and the output back while flash and cores work on other heads.
//
// Defaults follow the paper (InstInfer, HPCA 2025): 8 channels x 1.4 GB/s = 11.2 GB/s internal,
// 4 KiB pages, 7 GB/s link. 8 dies per channel with tR 20 us: a die delivers one 4 KiB page per
// tR + transfer (22.9 us), 8 dies 1.43 GB/s per channel, just above the bus's 1.4 GB/s.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "instinfer/core/dtype.hpp"
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
  explicit flash_timeline(const flash_params& p = {}) : p_(p), die_free_(p.lanes(), 0.0), bus_free_(p.channels, 0.0) {}

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

  // A page program issued at `t`: the page crosses the bus into the die's register, then the die
  // is busy for tPROG; later reads of that die wait. Returns when the die has finished.
  double program(uint32_t ppn, double t) noexcept {
    const uint32_t lane = decompose(p_, ppn).lane;
    double& die = die_free_[lane];
    double& bus = bus_free_[lane_channel(p_, lane)];
    const double xfer_end = std::max({t, die, bus}) + p_.transfer_ns();
    bus = xfer_end;
    die = xfer_end + p_.program_us * 1e3;
    program_ns_ += p_.transfer_ns() + p_.program_us * 1e3;
    return die;
  }
  // Die time (bus transfer + tPROG) of every program so far.
  double program_busy_ns() const noexcept { return program_ns_; }
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
  double program_ns_ = 0.0;
};

// SparF's reads (attend-sparse): the column pages from `t`, then the token pages once every column
// page is in (the token selection needs the approximate scores). Returns when the last page is in.
inline double sparse_reads(flash_timeline& tl, const uint32_t* col, size_t n_col, const uint32_t* tok, size_t n_tok,
                           double t) {
  const double t_columns = tl.read_batch(col, n_col, t);
  return std::max(t_columns, tl.read_batch(tok, n_tok, t_columns));
}

// Where a (seq, layer)'s chunks start striping over the lanes (the token FTL places chunk i of a
// page table on lane (stripe + i) % lanes, a column block b on lanes from stripe + 7 b on).
constexpr uint64_t flash_stripe(uint64_t seq, uint32_t layer) noexcept {
  const uint64_t x = seq * 0x9e3779b97f4a7c15ull + layer * 0xc2b2ae3d27d4eb4full;
  return (x ^ (x >> 29)) & 0xffffffffull;
}

// The drive's embedded cores. Default: 4 cores x 1.5 GHz x 8 fp32 flop per cycle = 48 GFLOP/s,
// a quad Cortex-A72 (the class of ARM SoC in computational storage drives; 1.5 GHz as in the
// Broadcom BCM2711) whose 128-bit NEON unit retires one 4-lane fp32 FMLA (8 flop) per cycle
// (docs/csd.md, "Compute model"). `efficiency` scales the peak (1: peak, a lower bound on time).
struct compute_params {
  uint32_t cores = 4;
  double ghz = 1.5;
  double flops_per_cycle = 8.0;  // per core, fp32
  double efficiency = 1.0;

  constexpr double gflops() const noexcept { return cores * ghz * flops_per_cycle * efficiency; }
  constexpr double ns(double flops) const noexcept { return flops / gflops(); }
  status validate() const {
    if (cores == 0 || cores > 1024) return {errc::kInvalidArgument, "compute cores must be in [1, 1024]"};
    if (!(ghz > 0.0) || !(flops_per_cycle > 0.0) || !(efficiency > 0.0 && efficiency <= 1.0))
      return {errc::kInvalidArgument, "core clock and flops per cycle must be > 0, efficiency in (0, 1]"};
    return {};
  }
};

// The work of one attention command, counted from what its kernels touched (all kv heads).
// Costs (fp32 flop): 2 per K or V element and query head of the group (one FMA: q.k, or p.v);
// widening a stored element to fp32 (the A72 has no fp16 arithmetic), per element: 0 for f32,
// 1 for f16/bf16 (a convert), 2 for q8_0 (int8 -> f32 convert, times the block's scale), 3 for
// q4_0 (nibble unpack, convert, scale); the block's f16 scale (one per 32 elements) is counted in
// those. 8 per scored (token, query head) (scale, running max, exp, sum); SparF's selection: 2 per
// K-column element and query head (approximate q.k; a quantized cache's columns are f16), 8 per
// approximately scored (token, query head) (softmax) and 4 per (token, kv head) ranked by the
// top-k selection. Bytes read from flash are counted apart (from dtype_row_bytes), so a quantized
// cache reads fewer bytes but spends more compute per element.
struct attend_work {
  double kv_elements = 0.0;      // K and V elements through the exact kernel
  double scored_tokens = 0.0;    // (token, kv head) pairs of the exact softmax
  double approx_elements = 0.0;  // K-column elements of SparF's approximate scores
  double ranked_tokens = 0.0;    // (token, kv head) pairs SparF scored approximately and ranked
  uint32_t group = 1;            // query heads per kv head
  dtype kv_dtype = dtype::kF16;  // the token rows' stored dtype

  // fp32 flop to turn one stored element of `t` into fp32.
  static constexpr double widen_flops(dtype t) noexcept {
    switch (t) {
      case dtype::kF32: return 0.0;
      case dtype::kF16:
      case dtype::kBF16: return 1.0;
      case dtype::kQ8_0: return 2.0;
      case dtype::kQ4_0: return 3.0;
    }
    return 1.0;
  }
  double flops() const noexcept {
    const dtype column = is_quantized(kv_dtype) ? dtype::kF16 : kv_dtype;  // channel_layout::column_dtype
    return (2.0 * group + widen_flops(kv_dtype)) * kv_elements + (2.0 * group + widen_flops(column)) * approx_elements +
           8.0 * group * (scored_tokens + ranked_tokens) + 4.0 * ranked_tokens;
  }
  void add(const attend_work& o) noexcept {
    kv_elements += o.kv_elements;
    scored_tokens += o.scored_tokens;
    approx_elements += o.approx_elements;
    ranked_tokens += o.ranked_tokens;
  }
};

// One command's modelled time: link, flash and compute overlap; the command takes the longest.
struct command_time {
  double link_ns = 0.0;
  double flash_ns = 0.0;
  double compute_ns = 0.0;
  constexpr double total_ns() const noexcept { return std::max({link_ns, flash_ns, compute_ns}); }
};

}  // namespace instinfer::csd
