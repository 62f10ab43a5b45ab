// What the attend engine keeps per drive core between commands: its page reader, staging buffers
// and SparF scratch, and the small helpers the dense and sparse paths share (clocks, grow-only
// aligned buffers, the first error of a run).
#pragma once

#include <time.h>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "flash_store.hpp"
#include "instinfer/attention/sparf/workspace.hpp"
#include "instinfer/core/status.hpp"
#include "kv_namespace.hpp"

namespace instinfer::csd {

inline int64_t thread_cpu_ns() noexcept {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return int64_t{ts.tv_sec} * 1000000000 + ts.tv_nsec;
}

inline int64_t wall_ns() noexcept {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Grow-only aligned staging: reallocated only when a command needs more than any before.
inline bool reserve_aligned(aligned_bytes& buf, uint64_t& have, uint64_t need) noexcept {
  if (have >= need) return true;
  buf = alloc_aligned(need);
  have = buf ? need : 0;
  return buf != nullptr;
}

// The first error any worker saw.
class first_error {
 public:
  void note(status s) noexcept {
    std::lock_guard lock(mutex_);
    if (error_.ok()) error_ = std::move(s);
  }
  status take() noexcept { return std::move(error_); }

 private:
  std::mutex mutex_;
  status error_;
};

// One core's reader and staging buffers, kept between commands.
struct attend_worker {
  std::unique_ptr<page_reader> reader;
  // Dense: two buffers of pages_per_batch chunks x [K page][V page] of one kv head.
  aligned_bytes staging;
  uint64_t staging_bytes = 0;
  std::vector<const std::byte*> ptrs;
  // SparF
  sparf_workspace sparf;
  aligned_bytes col_stage, tok_stage;
  uint64_t col_stage_bytes = 0, tok_stage_bytes = 0;
  std::vector<const std::byte*> col_ptrs, tok_ptrs;
  std::vector<uint32_t> channels, selected;
  std::vector<float> weight, scratch, alpha;
  // Page summaries: group scores and order, the chosen groups, their tokens, alpha = 1 per query
  // head, and the exact pass's own counters (the policy counts whole groups itself).
  std::vector<float> group_scores, ones;
  std::vector<uint32_t> group_order, groups, tokens;
  sparf_counters exact_counters;

  status ensure_reader(flash_store& store, uint32_t depth) noexcept {
    if (reader) return {};
    auto r = store.make_reader(depth);
    if (!r.ok()) return r.error();
    reader = std::move(*r);
    return {};
  }
  // Copies one kv head's K and V pages of a buffered chunk to dst, or queues their flash reads.
  status stage_head(const kv_namespace& ns, uint32_t chunk, uint32_t head, std::byte* dst) noexcept {
    const uint64_t page = ns.geo.page_bytes;
    const uint32_t H = ns.cfg.n_kv_heads;
    if (const std::byte* src = ns.resident(chunk)) {
      std::memcpy(dst, src + uint64_t{head} * page, page);
      std::memcpy(dst + page, src + uint64_t{H + head} * page, page);
      return {};
    }
    const uint32_t* pages = ns.pages(chunk);
    INSTINFER_TRY(reader->queue(pages[head], dst));
    return reader->queue(pages[H + head], dst + page);
  }
};

}  // namespace instinfer::csd
