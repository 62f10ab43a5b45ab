// The drive's chunk source for decode_driver (attention/decode_driver.hpp): items of one kv head
// (per_kv_head_policy), served as one-head pseudo-chunks [K page][V page]. Each worker streams an
// item's chunks through its own page reader into two staging buffers of max_window_chunks()
// chunks: acquire() waits for the window's buffer (queued by the previous acquire, or now for an
// item's first window) and queues the item's next window into the other buffer before it
// returns, so the next reads are in flight while the kernel runs. Chunks still in the DRAM group
// buffer are copied from memory instead of read. Also keeps each worker's CPU time.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "attend_worker.hpp"
#include "instinfer/attention/decode_driver.hpp"
#include "kv_namespace.hpp"

namespace instinfer::csd {

class page_chunk_source {
 public:
  // tables: per sequence of the batch, its page table (null for a sequence of no tokens).
  // workers: the engine's per-core state, at least as many as the driver has threads.
  page_chunk_source(const kv_namespace& ns, std::span<const page_table* const> tables, std::span<attend_worker> workers,
                    flash_store& store, uint32_t window_chunks) noexcept
      : ns_(ns), tables_(tables), workers_(workers), store_(store), window_(window_chunks) {}

  chunk_layout layout() const noexcept { return chunk_layout::make(ns_.geo, 1); }  // [K page][V page]
  uint32_t max_window_chunks() const noexcept { return window_; }
  status prepare(const decode_plan& plan, uint32_t n_workers) noexcept;
  result<chunk_window> acquire(uint32_t worker, const decode_work_item& item, uint32_t first, uint32_t n) noexcept;
  void release(uint32_t worker, const decode_work_item& item, const chunk_window& window) noexcept;

  // CPU time of the workers in the run (prepare's included), for the drive's accounting.
  uint64_t cpu_ns() const noexcept;

 private:
  struct lane {  // one worker's double buffering
    std::byte* buf[2] = {nullptr, nullptr};
    uint32_t next = 0;  // the buffer of the next window
    const decode_work_item* queued_item = nullptr;
    uint32_t queued_first = 0, queued_n = 0;
    int64_t cpu0 = -1, cpu = 0;
  };
  status queue_window(uint32_t worker, const decode_work_item& item, uint32_t first, uint32_t n,
                      std::byte* dst) noexcept;

  const kv_namespace& ns_;
  std::span<const page_table* const> tables_;
  std::span<attend_worker> workers_;
  flash_store& store_;
  uint32_t window_;
  std::vector<lane> lanes_;
  int64_t prepare_cpu_ = 0;
};
static_assert(chunk_source<page_chunk_source>);

}  // namespace instinfer::csd
