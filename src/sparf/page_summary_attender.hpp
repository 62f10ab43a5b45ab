// The page-summary policy (attention/sparf/page_summary.hpp) beside the page tables of a backend
// that does not run it itself (host, ssd, cuda): per (sequence, layer) one f32 summary per page
// group, in host memory.
//
// Sharing: a group's summary is a shared block; a fork copies the pointers (full groups stay
// shared, as their chunks are), and an append never writes a block in place (the tail group's
// block is copied, folded and swapped in), so a fork's summaries never change under another
// sequence. Truncation keeps the whole groups before the cut and rebuilds the new tail group from
// the stored rows.
//
// attend_sparse: per kv head, every group is scored from its summary and the top groups chosen;
// their K and V pages are used in place (host_view) or read through read_pages (one batch per
// sequence: the SSD merges neighbouring pages) into per-head pseudo-chunks, or whole chunks
// through read_chunk where read_pages is unsupported; then the one decode kernel runs over them.
// Heads are spread over a thread_pool of backend_config::n_threads workers.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <unordered_map>
#include <vector>

#include "instinfer/attention/decode.hpp"
#include "instinfer/attention/sparf/page_summary.hpp"
#include "instinfer/attention/sparf/score.hpp"
#include "instinfer/attention/sparf/workspace.hpp"
#include "instinfer/core/thread_pool.hpp"
#include "sparf/sparse_attender.hpp"

namespace instinfer {

class page_summary_attender final : public sparse_attender {
 public:
  page_summary_attender(backend& b, const backend_config& config, const sparf_config& cfg);
  page_summary_attender(const page_summary_attender&) = delete;
  page_summary_attender& operator=(const page_summary_attender&) = delete;

  status on_append(seq_id seq, uint32_t layer, uint32_t first, uint32_t n, const std::byte* k,
                   const std::byte* v) noexcept override;
  status on_fork(seq_id src, seq_id dst) noexcept override;
  status on_truncate(seq_id seq, uint32_t layer, uint32_t keep, const stored_rows_reader& old_rows, uint32_t n_suffix,
                     const std::byte* suffix_k, const std::byte* suffix_v) noexcept override;
  void on_truncate_end(seq_id seq, bool commit) noexcept override;
  void on_free(seq_id seq) noexcept override;
  status attend_sparse(uint32_t layer, const attend_batch& batch, const sparf_params& params,
                       sparf_counters* counters) noexcept override;
  // Distinct summary blocks held (shared blocks once).
  uint64_t resident_bytes() const noexcept override;
  // Takes back the last successful on_append (a policy beside this one refused the same append).
  void undo_last_append() noexcept;

 private:
  using block = std::vector<float>;  // page_summary_floats(n_kv_heads, head_dim)
  struct layer_state {
    std::vector<std::shared_ptr<const block>> groups;
    uint32_t n_tokens = 0;
  };
  struct staged_layer {
    uint32_t layer = 0;
    layer_state state;
  };

  // Appends n rows to ls, all or nothing (throws std::bad_alloc before changing ls).
  void extend(layer_state& ls, uint32_t n, const std::byte* k) const;
  status attend_one(const attend_item& it, const layer_state* ls, const page_summary_plan& plan,
                    sparf_counters& counters) noexcept;
  result<bool> load_pages(const attend_item& it, const page_summary_plan& plan);
  template <class F>
  status for_each_head(F&& fn) noexcept;

  backend& backend_;
  backend_config config_;
  sparf_config cfg_;
  size_t block_floats_ = 0;
  std::unordered_map<seq_id, std::vector<layer_state>> seqs_;
  std::unordered_map<seq_id, std::vector<staged_layer>> staged_;
  struct append_undo {  // what the last on_append replaced: the old tail block and sizes
    seq_id seq = 0;
    uint32_t layer = 0;
    uint32_t n_tokens = 0;
    size_t n_groups = 0;
    std::shared_ptr<const block> tail;  // the old block of the group the append started in, if any
    bool valid = false;
  };
  append_undo undo_;

  std::shared_ptr<thread_pool> pool_;         // the cache's compute pool (backend_config::pool), or own
  decode_chunks_fn kernel_staged_ = nullptr;  // per-head pseudo-chunks (one kv head)
  page_summary_score_fn score_kernel_ = nullptr;
  static constexpr uint32_t kScoreRunGroups = 256;  // groups per scoring task (~2 MiB of blocks at 8 x 128)
  decode_params per_head_{};
  std::vector<status> worker_status_;
  // Chunks in memory (host_view, or whole chunks read): the chosen groups' rows go through
  // SparF's exact pass (sparf_exact_head: gathered with prefetch into 16 KiB pseudo-pages, one
  // kernel), since one head's pages of scattered chunks are too far apart for the prefetchers.
  std::vector<sparf_workspace> ws_;
  std::vector<sparf_counters> exact_counters_;  // sparf_exact_head's, per worker (not reported)
  decode_chunks_fn exact_kernel_ = nullptr;
  struct scratch {                         // grow-only
    std::vector<float> scores;             // [n_kv_heads][n_groups]
    std::vector<const float*> group_ptrs;  // [n_groups]: each group's summary block
    std::vector<uint32_t> order;           // [workers][n_groups]
    std::vector<uint32_t> chosen;          // [n_kv_heads][n_select]
    std::vector<const std::byte*> ptrs;    // [n_kv_heads][n_select]
    std::vector<float> o;                  // [workers][group_size][head_dim]
    std::vector<softmax_stats> stats;      // [workers][group_size]
    std::vector<page_read> reads;
    std::vector<std::byte> staging;
    std::vector<uint32_t> chunk_slot;
    std::vector<uint32_t> tokens;                   // [n_kv_heads][n_select * tokens_per_page]
    std::vector<float> ones;                        // alpha = 1 per query head of a group
    std::vector<const std::byte*> sequence_chunks;  // [n_groups]: the chunk of each group, or null
  };
  scratch sc_;
};

}  // namespace instinfer
