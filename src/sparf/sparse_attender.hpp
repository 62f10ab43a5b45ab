// A sparse attention policy beside the paged KV manager.
//
// kv_cache owns the page tables; a sparse_attender owns whatever a sparse policy keeps beside
// them (SparF: the channel-indexed K copy and V means per (sequence, layer), column chunks stored
// on the backend, staging and scratch). kv_cache tells it about every change through the
// observer calls below and forwards attend_sparse; the attender gets what it needs through the
// arguments (page tables as attend_items, rows through a reader, the backend it was made with)
// and never calls back into kv_cache. A second policy (e.g. Quest-style page summaries, no
// column copy) is another implementation of this interface; kv_cache does not change.
//
// Observer contract: each call comes after kv_cache validated the change and before it commits
// its own part, and nothing kv_cache does after the call can fail; a call that fails leaves the
// attender as it was (kv_cache then undoes its part). Truncation is staged per layer and
// committed or dropped for the whole sequence at once, so remove_range stays all or nothing.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <vector>

#include "instinfer/attention/sparf/params.hpp"
#include "instinfer/backend/backend.hpp"
#include "instinfer/core/thread_pool.hpp"

namespace instinfer {

// The stored rows [begin, end) of one (sequence, layer) as it was before the change being
// observed: k, v := [end - begin][n_kv_heads][head_dim] in the cache dtype.
using stored_rows_reader =
    std::function<status(uint32_t begin, uint32_t end, std::vector<std::byte>& k, std::vector<std::byte>& v)>;

class sparse_attender {
 public:
  virtual ~sparse_attender() = default;

  // Tokens [first, first + n) of (seq, layer) were stored; k, v: [n][n_kv_heads][head_dim] rows
  // in the cache dtype.
  virtual status on_append(seq_id seq, uint32_t layer, uint32_t first, uint32_t n, const std::byte* k,
                           const std::byte* v) noexcept = 0;
  // dst is a new sequence holding all of src's tokens (every layer).
  virtual status on_fork(seq_id src, seq_id dst) noexcept = 0;
  // Staged: (seq, layer) keeps its first `keep` tokens (old_rows reads the rows it held), then
  // the n_suffix rows suffix_k / suffix_v follow (remove_range of an interior range). Takes effect
  // at on_truncate_end(seq, true); on_truncate_end(seq, false) drops every staged layer.
  virtual status on_truncate(seq_id seq, uint32_t layer, uint32_t keep, const stored_rows_reader& old_rows,
                             uint32_t n_suffix, const std::byte* suffix_k, const std::byte* suffix_v) noexcept = 0;
  virtual void on_truncate_end(seq_id seq, bool commit) noexcept = 0;
  // The sequence is gone (every layer).
  virtual void on_free(seq_id seq) noexcept = 0;

  // Sparse decode attention of one layer: one item per sequence (its page table, q, out, lse),
  // shapes as backend::attend. kv_cache checked the layer, the pointers and params.validate();
  // the attender checks each sequence's plan before writing anything. counters (optional) get
  // what this call read.
  virtual status attend_sparse(uint32_t layer, const attend_batch& batch, const sparf_params& params,
                               sparf_counters* counters) noexcept = 0;

  // Bytes of SparF's own data held in this process (cache_stats::sparf_column_bytes).
  virtual uint64_t resident_bytes() const noexcept = 0;
  // Bytes of the page-summary policy's summaries held in this process
  // (cache_stats::page_summary_bytes); 0 where it is not kept.
  virtual uint64_t page_summary_bytes() const noexcept { return 0; }
  // SparF calls per (sequence, layer) that reused a kept selection (cache_stats).
  virtual uint64_t reused_selections() const noexcept { return 0; }
};

// SparF for `b`: next to the data when the backend runs it itself (backend::runs_sparf, the csd
// drive: the attender only forwards), otherwise on the host with per-(sequence, layer)
// channel_index copies; where chunks are not host-addressable (ssd, cuda) sealed column blocks
// are stored as kColumns chunks of `b` and read back page by page. `b` must outlive the attender.
result<std::unique_ptr<sparse_attender>> make_sparf_attender(backend& b, const backend_config& config,
                                                             const sparf_config& sparf);

// The policies a cache keeps (cache_options::sparf, cache_options::page_summaries), each chosen
// per call by sparf_params::policy; a policy not kept answers kUnsupported. With both, every
// change goes to both, all or nothing. The page-summary policy keeps its summaries in host memory
// and runs on the host; a backend that runs sparse attention itself (csd) does not offer it yet.
result<std::unique_ptr<sparse_attender>> make_sparse_attender(backend& b, const backend_config& config,
                                                              const sparf_config& cfg, bool sparf, bool page_summaries);

// Workers an attender keeps scratch for: the pool's, at most one per kv head (more would only
// hold workspaces no head is handed to).
inline uint32_t attender_workers(const thread_pool& pool, uint32_t n_kv_heads) noexcept {
  return std::min(pool.size(), std::max(1u, n_kv_heads));
}

// Both policies' per-kv-head work: kv heads handed out to the pool's workers one at a time,
// fn(worker, head); the first failure stops handing out heads and is returned. Only workers
// [0, worker_status.size()) take part: a cache's shared pool may be larger than the attender's
// per-worker scratch (attender_workers).
template <class F>
status for_each_kv_head(thread_pool& pool, std::vector<status>& worker_status, uint32_t n_kv_heads, F&& fn) noexcept {
  std::atomic<uint32_t> next{0};
  for (status& s : worker_status) s = status{};
  const size_t n_workers = worker_status.size();
  auto body = [&](uint32_t w) noexcept {
    if (w >= n_workers) return;
    for (uint32_t h = next.fetch_add(1, std::memory_order_relaxed); h < n_kv_heads;
         h = next.fetch_add(1, std::memory_order_relaxed)) {
      status s = fn(w, h);
      if (!s.ok()) {
        worker_status[w] = std::move(s);
        next.store(n_kv_heads, std::memory_order_relaxed);  // stop handing out heads
        return;
      }
    }
  };
  pool.run(body);
  for (status& s : worker_status)
    if (!s.ok()) return std::move(s);
  return {};
}

}  // namespace instinfer
