// The drive's in-storage attention: decode attention over a batch of (sequence, n_tokens) items of
// one layer, on the drive's own cores, reading K and V pages through per-worker io_uring readers
// (double-buffered) or from the DRAM group buffer. Dense: every page of the items, through the
// library's decode_driver (attention/decode_driver.hpp) over the page-reader chunk source
// (page_source.hpp). Sparse (SparF, attend_sparse.cpp): the chosen column pages first, then only
// the token pages holding selected tokens, through attention/sparf/{select,exact}.hpp. Page
// summaries (attend_page_summary.cpp): the groups scored from their summaries in DRAM, then the
// chosen groups' K and V pages read whole, through attention/sparf/{page_summary,exact}.hpp.
// Results are written straight into the command's result area (protocol_codec.hpp's attend layout).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "attend_worker.hpp"
#include "column_ftl.hpp"
#include "drive_context.hpp"
#include "instinfer/attention/decode_driver.hpp"
#include "instinfer/attention/sparf/page_summary.hpp"
#include "instinfer/attention/sparf/select.hpp"
#include "instinfer/core/thread_pool.hpp"
#include "instinfer/csd/protocol_codec.hpp"
#include "kv_namespace.hpp"

namespace instinfer::csd {

class attend_engine {
 public:
  // Starts o.n_cores - 1 threads for SparF (the caller is the last core); the dense driver's are
  // started by the first dense attend. Throws std::system_error when it cannot.
  attend_engine(drive_context& ctx, column_ftl& columns);
  ~attend_engine();
  attend_engine(const attend_engine&) = delete;
  attend_engine& operator=(const attend_engine&) = delete;

  // kAttend: data and res are the command's payload and result ranges (validated against the data
  // area by the dispatcher); result_bytes receives the bytes produced.
  status attend(kv_namespace& ns, const sq_entry& e, const std::byte* data, std::byte* res, uint64_t& result_bytes);
  // kAttendChunk: causal query rows per item (prefill), through the same driver with its rows kernel.
  status attend_chunk(kv_namespace& ns, const sq_entry& e, const std::byte* data, std::byte* res,
                      uint64_t& result_bytes);
  // kAttendSparse: the same, with SparF parameters in front and counters behind.
  status attend_sparse(kv_namespace& ns, const sq_entry& e, const std::byte* data, std::byte* res,
                       uint64_t& result_bytes);

 private:
  // A decoded, validated attend command: where its parts lie, its items and their page tables.
  struct command {
    attend_args args{};
    attend_wire_layout wire{};
    sparf_params sparf{};  // attend-sparse only
    std::vector<attend_entry> items;
    std::vector<const page_table*> tabs;  // per item; null for an item of no tokens
    const float* q = nullptr;             // [n_items][q_heads][head_dim]
    float* out = nullptr;                 // [n_items][q_heads][head_dim]
    float* lse = nullptr;                 // [n_items][q_heads]
    std::byte* counters = nullptr;        // attend-sparse: one sparf_wire_counters
    // attend-chunk: per item its query rows, their first position and first row of q / out / lse
    std::vector<uint32_t> n_rows, first_pos, row_begin;
    uint32_t n_items() const noexcept { return args.n_items; }
  };
  // What the tasks of one attend-sparse command share (filled single-threaded first).
  struct sparse_shared {
    std::vector<sparf_plan> plans;                            // SparF, per item
    std::vector<std::vector<uint32_t>> item_blocks;           // SparF, per item: its column blocks
    std::vector<const kv_namespace::column_tail*> item_tail;  // SparF, per item: its tail, or null
    std::vector<float> v_mean;                                // SparF: [n_items][n_kv_heads][head_dim]
    std::vector<page_summary_plan> page_plans;                // page summaries, per item
    std::vector<std::vector<const float*>> item_summaries;    // page summaries, per item and group
    std::vector<std::unique_ptr<float[]>> rebuilt;            // summaries of truncated tails, this command's
  };
  struct sparse_worker_out {
    sparf_counters counters;
    std::vector<uint32_t> col_ppns, tok_ppns;  // flash pages read, for the model
  };

  status decode_command(const kv_namespace& ns, const sq_entry& e, bool sparse, const std::byte* data, std::byte* res,
                        command& c) const;
  status decode_chunk_command(const kv_namespace& ns, const sq_entry& e, const std::byte* data, std::byte* res,
                              command& c) const;
  status check_items(const kv_namespace& ns, command& c) const;

  // Dense: the driver for the namespace's decode parameters (one at a time, kept while they
  // stay the same), the modelled flash reads, the run.
  result<decode_driver*> driver_for(const kv_namespace& ns);
  void model_dense_reads(const kv_namespace& ns, const command& c);
  status run_dense(const kv_namespace& ns, const command& c);

  // Sparse: column data and V means (single-threaded), then one task per (item, kv head).
  status prepare_columns(kv_namespace& ns, const command& c, sparse_shared& sh);
  // pages: the page-summary policy's tasks (run_page_task), else SparF's (run_sparse_task).
  status run_sparse(const kv_namespace& ns, const command& c, const sparse_shared& sh, sparse_worker_out& total,
                    bool pages = false);
  status run_sparse_task(const kv_namespace& ns, const command& c, const sparse_shared& sh, uint32_t task,
                         attend_worker& ws, sparse_worker_out& mine);
  status load_column_pages(const kv_namespace& ns, const sparse_shared& sh, uint32_t item, uint32_t head,
                           uint32_t n_column_blocks, uint32_t n_channels, bool keep_all, attend_worker& ws,
                           sparse_worker_out& mine);
  status load_token_pages(const kv_namespace& ns, const page_table& tab, uint32_t head, const sparf_selection& sel,
                          attend_worker& ws, sparse_worker_out& mine);

  // Page summaries (attend_page_summary.cpp): plans and every item's group summaries (rebuilding
  // what is missing or covers more rows than attended), then one task per (item, kv head).
  status attend_page_summary(kv_namespace& ns, command& c, int64_t wall0, uint64_t& result_bytes);
  // The end both sparse policies share: the exact pass's modelled compute (over the rows read),
  // then, when the run succeeded, its counters to the host and the command's statistics.
  status finish_sparse(const kv_namespace& ns, command& c, const status& run, const sparf_counters& k, int64_t wall0,
                       uint64_t& attends, uint64_t& result_bytes);
  status prepare_summaries(kv_namespace& ns, const command& c, sparse_shared& sh);
  status run_page_task(const kv_namespace& ns, const command& c, const sparse_shared& sh, uint32_t task,
                       attend_worker& ws, sparse_worker_out& mine);

  drive_context& ctx_;
  column_ftl& columns_;
  thread_pool pool_;                       // SparF's workers
  std::unique_ptr<decode_driver> driver_;  // dense: its own workers (core/thread_pool)
  std::vector<attend_worker> workers_;     // per core, indexed by the worker index of either
  std::vector<uint32_t> read_ppns_;
  std::vector<decode_sequence> dense_batch_;
};

}  // namespace instinfer::csd
