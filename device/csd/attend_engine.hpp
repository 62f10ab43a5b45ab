// The drive's in-storage attention: decode attention over a batch of (sequence, n_tokens) items of
// one layer, on the drive's own cores, reading K and V pages through per-worker io_uring readers
// (double-buffered) or from the DRAM group buffer. Dense: every page of the items. Sparse (SparF):
// the chosen column pages first, then only the token pages holding selected tokens. Results are
// written straight into the command's result area (protocol_codec.hpp's attend layout).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "column_ftl.hpp"
#include "drive_context.hpp"
#include "instinfer/core/thread_pool.hpp"
#include "instinfer/csd/protocol_codec.hpp"
#include "kv_namespace.hpp"

namespace instinfer::csd {

class attend_engine {
 public:
  // Starts o.n_cores - 1 threads (the caller is the last core); throws std::system_error when it
  // cannot.
  attend_engine(drive_context& ctx, column_ftl& columns);
  ~attend_engine();
  attend_engine(const attend_engine&) = delete;
  attend_engine& operator=(const attend_engine&) = delete;

  // kAttend: data and res are the command's payload and result ranges (validated against the data
  // area by the dispatcher); result_bytes receives the bytes produced.
  status attend(kv_namespace& ns, const sq_entry& e, const std::byte* data, std::byte* res, uint64_t& result_bytes);
  // kAttendSparse: the same, with SparF parameters in front and counters behind.
  status attend_sparse(kv_namespace& ns, const sq_entry& e, const std::byte* data, std::byte* res,
                       uint64_t& result_bytes);

 private:
  struct worker_state;
  struct command;
  struct dense_task;
  struct dense_plan;
  struct sparse_shared;
  struct sparse_worker_out;

  status decode_command(const kv_namespace& ns, const sq_entry& e, bool sparse, const std::byte* data, std::byte* res,
                        command& c) const;
  status check_items(const kv_namespace& ns, command& c) const;

  // Dense: plan (item, head, chunk range) tasks, model their flash reads, stream them on the
  // workers, merge the partial states in token order.
  dense_plan plan_dense(const kv_namespace& ns, const command& c) const;
  void model_dense_reads(const kv_namespace& ns, const command& c, const dense_plan& plan);
  status run_dense(const kv_namespace& ns, const command& c, const dense_plan& plan, float* part_o,
                   softmax_stats* part_s);
  status run_dense_task(const kv_namespace& ns, const command& c, const dense_task& t, worker_state& ws, float* acc_o,
                        softmax_stats* acc_s) noexcept;
  static void merge_dense(const kv_namespace& ns, const command& c, const dense_plan& plan, const float* part_o,
                          const softmax_stats* part_s);

  // Sparse: column data and V means (single-threaded), then one task per (item, kv head).
  status prepare_columns(kv_namespace& ns, const command& c, sparse_shared& sh);
  status run_sparse(const kv_namespace& ns, const command& c, const sparse_shared& sh, sparse_worker_out& total);
  status run_sparse_task(const kv_namespace& ns, const command& c, const sparse_shared& sh, uint32_t task,
                         worker_state& ws, sparse_worker_out& mine);
  status load_column_pages(const kv_namespace& ns, const sparse_shared& sh, uint32_t item, uint32_t head,
                           uint32_t n_column_blocks, uint32_t n_channels, bool keep_all, worker_state& ws,
                           sparse_worker_out& mine);
  status load_token_pages(const kv_namespace& ns, const page_table& tab, uint32_t head, uint32_t n_selected,
                          worker_state& ws, sparse_worker_out& mine);
  status ensure_reader(worker_state& ws, uint32_t depth) noexcept;

  drive_context& ctx_;
  column_ftl& columns_;
  thread_pool pool_;
  std::vector<worker_state> workers_;  // indexed by the pool's worker index
  std::vector<uint32_t> read_ppns_;
};

}  // namespace instinfer::csd
