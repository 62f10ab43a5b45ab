// SparF on the host side of a backend that does not run it (host, ssd, cuda): one
// channel_index per (sequence, layer), dual-step loading through the backend's page reads.
//
// Host-addressable backends (host): the whole index stays in memory and the selected tokens'
// chunks are used in place. Others (ssd, cuda): sealed column blocks are stored as chunks of the
// backend (chunk_stream::kColumns; shared by forks like full token chunks; only the tail block
// stays in memory) and just the chosen column pages are read back; token pages come through
// backend::read_pages as one batch, or whole chunks through read_chunk where that is unsupported.
// Compute (each kv head's selection, then each kv head's exact pass) is spread over a thread_pool
// of backend_config::n_threads workers; the reads in between stay on the calling thread. A head's
// result does not depend on which worker ran it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <unordered_map>
#include <vector>

#include "instinfer/attention/sparf/select.hpp"
#include "instinfer/attention/sparf/workspace.hpp"
#include "instinfer/core/thread_pool.hpp"
#include "instinfer/kv/channel_index.hpp"
#include "sparf/sparse_attender.hpp"

namespace instinfer {

class sparf_attender final : public sparse_attender {
 public:
  sparf_attender(backend& b, const backend_config& config, const sparf_config& sparf);
  ~sparf_attender() override;
  sparf_attender(const sparf_attender&) = delete;
  sparf_attender& operator=(const sparf_attender&) = delete;

  status on_append(seq_id seq, uint32_t layer, uint32_t first, uint32_t n, const std::byte* k,
                   const std::byte* v) noexcept override;
  status on_fork(seq_id src, seq_id dst) noexcept override;
  status on_truncate(seq_id seq, uint32_t layer, uint32_t keep, const stored_rows_reader& old_rows, uint32_t n_suffix,
                     const std::byte* suffix_k, const std::byte* suffix_v) noexcept override;
  void on_truncate_end(seq_id seq, bool commit) noexcept override;
  void on_free(seq_id seq) noexcept override;
  status attend_sparse(uint32_t layer, const attend_batch& batch, const sparf_params& params,
                       sparf_counters* counters) noexcept override;
  uint64_t resident_bytes() const noexcept override;
  uint64_t reused_selections() const noexcept override { return reused_; }

 private:
  // The index of one (sequence, layer) and its sealed column blocks stored on the backend
  // (column_store_chunks() chunks per block, in block order).
  // The last selection of a (sequence, layer), kept while sparf_params::reuse_min_cosine > 0.
  struct reuse_cache {
    bool valid = false;
    uint32_t n_at = 0;  // the sequence's tokens when it was made
    uint32_t uses = 0;  // calls it served since
    sparf_params params;
    std::vector<float> q;          // [n_q_heads][head_dim]: the queries it was made for
    std::vector<uint32_t> tokens;  // each kv head's tokens, ascending, from first[h]
    std::vector<uint32_t> first;   // [n_kv_heads + 1]
    std::vector<float> alpha;      // [n_q_heads]
  };
  struct layer_state {
    channel_index index;
    bool live = false;  // index created (the layer received tokens)
    std::vector<chunk_id> column_chunks;
    reuse_cache reuse;  // dropped on fork and truncation (a fresh selection follows)
  };
  struct staged_layer {
    uint32_t layer = 0;
    layer_state state;
  };

  status append_rows(seq_id seq, uint32_t layer, layer_state& ls, uint32_t n, const std::byte* k,
                     const std::byte* v) noexcept;
  void store_sealed_columns(seq_id seq, uint32_t layer, layer_state& ls) noexcept;
  uint32_t column_store_chunks() const noexcept;
  status track(chunk_id id) noexcept;
  void retain(const std::vector<chunk_id>& ids) noexcept;
  void release(std::vector<chunk_id>& ids) noexcept;

  status attend_one(const attend_item& it, layer_state* ls, const sparf_plan& plan, const sparf_params& params,
                    decode_chunks_fn kernel) noexcept;
  // Selection reuse: whether ls's last selection serves this call; the selections built from it
  // (sc_.selections, with the tokens appended since); keeping this call's fresh selections.
  bool reusable(const layer_state& ls, const attend_item& it, const sparf_params& params) const noexcept;
  void reuse_selections(layer_state& ls, const attend_item& it);
  void keep_selections(layer_state& ls, const attend_item& it, const sparf_params& params);
  // fn(worker, kv_head) for every kv head, on the pool; the first failure.
  template <class F>
  status for_each_head(F&& fn) noexcept;
  status fetch_column_pages(const layer_state& ls, const sparf_plan& plan, const sparf_params& params, const float* q);
  status load_token_pages(const attend_item& it);

  backend& backend_;
  backend_config config_;
  sparf_config cfg_;
  bool store_columns_ = false;  // sealed column blocks live on the backend
  std::unordered_map<seq_id, std::vector<layer_state>> seqs_;
  std::unordered_map<seq_id, std::vector<staged_layer>> staged_;
  std::vector<uint32_t> column_refs_;  // per chunk id: references to a stored column chunk
  uint64_t reused_ = 0;                // calls that reused a kept selection
  // One workspace and one counter set per worker of pool_ (a kv head's selection and exact pass
  // run on one worker; the heads of a sequence are shared dynamically).
  std::shared_ptr<thread_pool> pool_;  // the cache's compute pool (backend_config::pool), or own
  std::vector<sparf_workspace> ws_;
  std::vector<sparf_counters> worker_counters_;
  std::vector<status> worker_status_;
  // attend_sparse's per-call arrays and staging: grow-only, so the steady state allocates nothing.
  struct scratch {
    std::vector<uint32_t> selected, slot, channels, chosen, reused;
    std::vector<float> alpha, zero_mean, weight, channel_scratch;
    std::vector<sparf_selection> selections;
    std::vector<uint8_t> head_needs;
    std::vector<const std::byte*> ptrs, column_pages;
    std::vector<page_read> reads, column_reads;
    std::vector<std::byte> token_staging, column_staging;
  };
  scratch sc_;
};

}  // namespace instinfer
