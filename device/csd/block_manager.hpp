// The physical side of the KV-oriented FTL: erase blocks per lane (a lane is one die of one
// channel), append-only page allocation, page validity, and host-driven erase of dead blocks.
//
// No garbage collection copies a valid page, ever: KV is transient, so the host frees whole
// sequences and the drive erases a block once every page in it is invalid, least recently written
// first. A block with one valid page left stays until that page is freed too.
//
// Pinned pages (persistent namespaces): the pages the drive's last commit references. Their data
// may be dead to the running FTL, but a crash would bring that commit back, so a block holding a
// pinned page is never erased; the next commit re-pins (docs/persistence.md).
//
// The allocator knows nothing about what a page holds, so a second logical layout (the
// channel-indexed K copy of SparF) can allocate from the same lanes with its own L2P table.
#pragma once

#include <algorithm>
#include <cstdint>
#include <deque>
#include <vector>

#include "instinfer/core/status.hpp"
#include "instinfer/csd/models.hpp"

namespace instinfer::csd {

inline constexpr uint32_t kNoPage = UINT32_MAX;

class block_manager {
 public:
  enum class block_state : uint8_t { kFree = 0, kOpen = 1, kFull = 2 };
  struct block_info {
    uint32_t valid = 0;    // valid pages
    uint32_t written = 0;  // write pointer
    uint64_t stamp = 0;    // last program (LRU order of erases)
    uint32_t pinned = 0;   // pages the last commit references
    block_state state = block_state::kFree;
  };
  struct run {
    uint32_t first_ppn = 0;
    uint32_t n_pages = 0;
  };

  explicit block_manager(const flash_params& p)
      : p_(p),
        blocks_(p.total_blocks()),
        free_(p.lanes()),
        open_(p.lanes(), UINT32_MAX),
        valid_bits_((p.total_pages() + 63) / 64, 0) {
    for (uint32_t lane = 0; lane < p.lanes(); ++lane)
      for (uint32_t b = 0; b < p.blocks_per_die; ++b) free_[lane].push_back(lane * p.blocks_per_die + b);
    free_count_ = p.total_blocks();
  }

  const flash_params& params() const noexcept { return p_; }
  uint64_t free_blocks() const noexcept { return free_count_; }
  uint64_t total_blocks() const noexcept { return blocks_.size(); }
  uint64_t valid_pages() const noexcept { return valid_pages_; }
  const block_info& block(uint32_t global_block) const noexcept { return blocks_[global_block]; }

  // Up to n pages appended to `lane`'s open block (opening a free block of that lane, or of the
  // next lane that has one). The run may be shorter than n when the block ends: call again.
  result<run> allocate(uint32_t lane, uint32_t n, uint64_t stamp) {
    const uint32_t lanes = p_.lanes();
    for (uint32_t k = 0; k < lanes; ++k) {
      const uint32_t l = (lane + k) % lanes;
      if (open_[l] == UINT32_MAX) {
        if (free_[l].empty()) continue;
        open_[l] = free_[l].front();
        free_[l].pop_front();
        --free_count_;
        blocks_[open_[l]].state = block_state::kOpen;
      }
      const uint32_t gb = open_[l];
      block_info& b = blocks_[gb];
      const uint32_t take = std::min(n, p_.pages_per_block - b.written);
      const run r{gb * p_.pages_per_block + b.written, take};
      for (uint32_t i = 0; i < take; ++i) set_valid(r.first_ppn + i, true);
      b.written += take;
      b.valid += take;
      b.stamp = stamp;
      valid_pages_ += take;
      if (b.written == p_.pages_per_block) {
        b.state = block_state::kFull;
        open_[l] = UINT32_MAX;
      }
      return r;
    }
    return status{errc::kNoSpace, "flash full: no free erase block (free sequences, then reclaim)"};
  }

  bool valid(uint32_t ppn) const noexcept { return (valid_bits_[ppn / 64] >> (ppn % 64)) & 1u; }

  // Replace the pinned set with `ppns` (each below total_pages).
  void set_pins(const std::vector<uint32_t>& ppns) {
    for (uint32_t gb : pinned_blocks_) blocks_[gb].pinned = 0;
    pinned_blocks_.clear();
    for (uint32_t ppn : ppns) {
      block_info& b = blocks_[ppn / p_.pages_per_block];
      if (b.pinned++ == 0) pinned_blocks_.push_back(ppn / p_.pages_per_block);
    }
  }

  // Recovery: a committed page is valid again. Its block is closed (never appended to: its
  // unreferenced pages may hold data of a later, uncommitted program) and leaves its lane's free
  // list. False when the page was adopted already (two owners: the metadata is inconsistent).
  bool adopt(uint32_t ppn) {
    if (valid(ppn)) return false;
    const uint32_t gb = ppn / p_.pages_per_block;
    block_info& b = blocks_[gb];
    if (b.state == block_state::kFree) {
      auto& lane = free_[gb / p_.blocks_per_die];
      lane.erase(std::find(lane.begin(), lane.end(), gb));
      --free_count_;
      b.state = block_state::kFull;
      b.written = p_.pages_per_block;
    }
    set_valid(ppn, true);
    ++b.valid;
    ++valid_pages_;
    return true;
  }

  // The page's data is dead (its chunk was freed or rewritten elsewhere).
  void invalidate(uint32_t ppn) noexcept {
    if (ppn == kNoPage || !valid(ppn)) return;
    set_valid(ppn, false);
    --blocks_[ppn / p_.pages_per_block].valid;
    --valid_pages_;
  }

  // Erase full blocks with no valid page, least recently written first, until `target` blocks are
  // free (0: every such block). on_erase(global_block) runs before each block returns to its lane.
  template <class OnErase>
  uint32_t erase_dead(uint64_t target, OnErase&& on_erase) {
    std::vector<uint32_t> dead;
    for (uint32_t gb = 0; gb < blocks_.size(); ++gb)
      if (blocks_[gb].state == block_state::kFull && blocks_[gb].valid == 0 && blocks_[gb].pinned == 0)
        dead.push_back(gb);
    std::sort(dead.begin(), dead.end(), [&](uint32_t a, uint32_t b) { return blocks_[a].stamp < blocks_[b].stamp; });
    uint32_t erased = 0;
    for (uint32_t gb : dead) {
      if (target != 0 && free_count_ >= target) break;
      if (!on_erase(gb).ok()) break;
      blocks_[gb] = block_info{};
      free_[gb / p_.blocks_per_die].push_back(gb);
      ++free_count_;
      ++erased;
    }
    return erased;
  }

 private:
  void set_valid(uint32_t ppn, bool v) noexcept {
    const uint64_t bit = uint64_t{1} << (ppn % 64);
    if (v)
      valid_bits_[ppn / 64] |= bit;
    else
      valid_bits_[ppn / 64] &= ~bit;
  }

  flash_params p_;
  std::vector<block_info> blocks_;
  std::vector<std::deque<uint32_t>> free_;  // per lane
  std::vector<uint32_t> open_;              // per lane: open block or UINT32_MAX
  std::vector<uint64_t> valid_bits_;
  std::vector<uint32_t> pinned_blocks_;
  uint64_t free_count_ = 0;
  uint64_t valid_pages_ = 0;
};

}  // namespace instinfer::csd
