// The batch decode driver, written once: plan -> run items on chunk windows -> merge -> write.
//
//   1. plan (attention/decode_plan.hpp): work items (sequence, kv-head range, chunk range) and a
//      CSR of partials per output row (a sequence's kv-head range), in token order;
//   2. run: workers of core/thread_pool take items dynamically; for each item they ask a
//      `chunk_source` for windows of its chunks (pointers in memory; a source may wait on I/O or
//      stage copies per worker) and call the head-range decode kernel on each window, merging
//      windows in order;
//   3. merge: a row of one item wrote its output in place; for a split row, the worker that
//      finishes the row's last item merges its partials in token order (state.hpp's
//      merge_partial_range), so merges run in parallel and close to the data;
//   4. write: state.hpp's write_normalized gives out = o / d and lse.
// The hot path allocates nothing once the workspace has grown to the largest batch seen.
//
// A chunk_source serves the chunks; the driver never knows where they live:
//   layout()            the chunk_layout of the chunks it hands out (may hold fewer kv heads than
//                       the problem, e.g. one staged head);
//   max_window_chunks() the most chunks one window may hold (0: an item's whole range at once);
//   prepare(plan, n)    before the workers start, with the plan and the worker count: size
//                       per-worker state (readers, staging buffers), start the first reads;
//   acquire(w, item, first, n)  worker w wants chunks [first, first + n) of the item's sequence
//                       (within the item's range, n <= max_window_chunks): returns the pointers and
//                       the index, in layout(), of the item's first kv head; may block; may fail;
//   release(w, item, window)    worker w is done with that window (its buffer may be reused).
// A worker holds at most one window at a time and windows of an item come in token order.
//
// The sources of this library (each tier's chunks, one driver):
//  - host (src/kernels/decode_driver.cpp, memory_chunk_source): chunks in place, host_sweep_policy;
//  - SSD (src/backend/ssd/stream_decode): one thread owns the io_uring engine and its staging ring;
//    prepare() turns the plan into read windows in plan order and issues a ring's worth; acquire()
//    returns group-buffer pointers for buffered chunks, else reaps until the window's slot has
//    landed (later reads stay in flight, so compute overlaps I/O); release() frees the slot and
//    issues the next read. It runs with one worker, the calling thread;
//  - drive (device/csd/page_source): per_kv_head_policy; each worker has its own page reader and
//    two staging buffers of W chunks x [K page][V page] of one head (layout() is the one-head
//    chunk_layout); acquire() waits for this window and queues the next into the other buffer.
#pragma once

#include <algorithm>
#include <atomic>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <new>
#include <span>
#include <string>
#include <system_error>
#include <vector>

#include "instinfer/attention/decode.hpp"
#include "instinfer/attention/decode_plan.hpp"
#include "instinfer/attention/state.hpp"
#include "instinfer/core/status.hpp"
#include "instinfer/core/thread_pool.hpp"
#include "instinfer/layout/chunk_layout.hpp"

namespace instinfer {

// One sequence of a batch as the driver sees it; where its chunks live is the source's business.
struct decode_sequence {
  uint32_t n_chunks = 0;
  uint32_t n_tokens = 0;     // (n_chunks - 1) * tokens_per_page < n_tokens <= n_chunks * tokens_per_page
  const float* q = nullptr;  // [n_q_heads][head_dim]
  float* out = nullptr;      // [n_q_heads][head_dim], normalised
  float* lse = nullptr;      // [n_q_heads] natural-log sum-exp, or null
  // Causal chunk rows (decode_work::n_rows): 0 = one decode row seeing every token; n > 0 = q and
  // out [n_rows][n_q_heads][head_dim], lse [n_rows][n_q_heads], row r sees tokens [0, first_pos + r].
  // Needs a rows kernel (set_rows_kernel).
  uint32_t n_rows = 0;
  uint32_t first_pos = 0;

  constexpr decode_sequence_shape shape() const noexcept { return {n_chunks, n_tokens}; }
};

// A window of an item's chunks, served by a chunk_source.
struct chunk_window {
  const std::byte* const* chunks = nullptr;  // the window's chunk pointers, token order, in the source's layout()
  uint32_t first_kv_head = 0;                // index, in that layout, of the item's kv_head_begin
};

// (clang-format 14 mangles `noexcept ->` in requires-expressions.)
// clang-format off
template <class S>
concept chunk_source = requires(S& source, const S& csource, const decode_plan& plan, uint32_t worker,
                                const decode_work_item& item, uint32_t first, const chunk_window& window) {
  { csource.layout() } noexcept -> std::convertible_to<chunk_layout>;
  { csource.max_window_chunks() } noexcept -> std::convertible_to<uint32_t>;
  { source.prepare(plan, worker) } noexcept -> std::same_as<status>;
  { source.acquire(worker, item, first, first) } noexcept -> std::same_as<result<chunk_window>>;
  { source.release(worker, item, window) } noexcept;
};
// clang-format on

// Chunks already in host memory: decode_work's pointers, served whole (no copies, no waiting).
class memory_chunk_source {
 public:
  memory_chunk_source(const chunk_layout& layout, std::span<const decode_work> batch) noexcept
      : layout_(layout), batch_(batch) {}

  chunk_layout layout() const noexcept { return layout_; }
  uint32_t max_window_chunks() const noexcept { return 0; }
  status prepare(const decode_plan&, uint32_t) noexcept { return {}; }
  result<chunk_window> acquire(uint32_t, const decode_work_item& item, uint32_t first, uint32_t) noexcept {
    return chunk_window{batch_[item.seq].chunks + first, item.kv_head_begin};
  }
  void release(uint32_t, const decode_work_item&, const chunk_window&) noexcept {}

 private:
  chunk_layout layout_;
  std::span<const decode_work> batch_;
};
static_assert(chunk_source<memory_chunk_source>);

struct decode_driver_options {
  uint32_t n_threads = 1;          // workers, the calling thread included
  uint32_t items_per_worker = 4;   // aim for this many items per worker
  uint32_t min_item_tokens = 512;  // split no finer than this (see decode_plan_options)
  uint32_t kv_heads_per_item = 0;  // 0: items cover all kv heads (host sweep); 1: one head (drive)
  // Workers to use instead of starting n_threads - 1 own ones (a cache's shared compute pool:
  // backend_config::pool); its size() then is the thread count.
  std::shared_ptr<thread_pool> pool;
  static constexpr uint32_t kMaxThreads = 1024;
};

class decode_driver {
 public:
  // `kernel` is the head-range kernel for `params` (select_decode_heads_kernel). Validates the
  // params and the thread count, and starts the workers.
  static result<std::unique_ptr<decode_driver>> create(const decode_params& params, decode_heads_fn kernel,
                                                       const decode_driver_options& options) {
    INSTINFER_TRY(params.validate());
    if (kernel == nullptr) return status{errc::kInvalidArgument, "decode_driver: no kernel"};
    const uint32_t n_threads = options.pool ? options.pool->size() : options.n_threads;
    if (n_threads == 0 || n_threads > decode_driver_options::kMaxThreads)
      return status{errc::kInvalidArgument, "decode_driver: n_threads must be in [1, " +
                                                std::to_string(decode_driver_options::kMaxThreads) + "], got " +
                                                std::to_string(n_threads)};
    try {
      return std::unique_ptr<decode_driver>(new decode_driver(params, kernel, options));
    } catch (const std::system_error& e) {
      return status{errc::kOutOfMemory,
                    "decode_driver: cannot start " + std::to_string(n_threads) + " threads: " + e.what()};
    } catch (const std::bad_alloc&) {
      return status{errc::kOutOfMemory, "decode_driver: out of memory"};
    }
  }

  // Attention of every sequence of `batch` over the chunks `source` serves. Runs are serialised.
  // On failure (a bad batch: nothing is written; a source error: outputs are unspecified) returns
  // the first error.
  template <chunk_source Source>
  status run(std::span<const decode_sequence> batch, Source& source) noexcept {
    std::lock_guard<std::mutex> lock(run_mutex_);
    INSTINFER_TRY(begin(batch, source, pool_->size()));
    auto body = [&](uint32_t worker) noexcept { work(worker, batch, source, run_kernel_params_, run_window_); };
    pool_->run(body);
    if (failed_.load(std::memory_order_acquire)) return std::move(first_error_);
    return {};
  }

  // A run whose workers are the caller's threads instead of the pool (kv_cache's slices, an
  // engine's ith/nth): begin_shared plans `batch` for n_workers, then each of up to n_workers
  // threads calls work_shared with its own worker index. Items are taken dynamically, so the run
  // is complete once every caller that joined has returned, however many joined (one is enough).
  // The caller keeps batch and source alive, serialises shared runs with everything else on this
  // driver, and reads the outcome with shared_status() after the last work_shared returned.
  template <chunk_source Source>
  status begin_shared(std::span<const decode_sequence> batch, Source& source, uint32_t n_workers) noexcept {
    if (n_workers == 0 || n_workers > decode_driver_options::kMaxThreads)
      return {errc::kInvalidArgument, "decode_driver: a shared run needs 1 to " +
                                          std::to_string(decode_driver_options::kMaxThreads) + " workers"};
    std::lock_guard<std::mutex> lock(run_mutex_);
    return begin(batch, source, n_workers);
  }
  template <chunk_source Source>
  void work_shared(uint32_t worker, std::span<const decode_sequence> batch, Source& source) noexcept {
    if (worker >= run_workers_) {
      fail({errc::kInternal, "decode_driver: shared-run worker index out of range"});
      return;
    }
    work(worker, batch, source, run_kernel_params_, run_window_);
  }
  status shared_status() noexcept {
    if (failed_.load(std::memory_order_acquire)) return first_error_;
    return {};
  }

  // The causal-rows kernel for the same params (select_decode_rows_kernel): lets batches carry
  // query rows (decode_sequence::n_rows > 0). Set before the first run that needs it.
  void set_rows_kernel(decode_rows_fn kernel) noexcept { rows_kernel_ = kernel; }

  const decode_params& params() const noexcept { return params_; }
  uint32_t n_threads() const noexcept { return pool_->size(); }
  // The plan of the last run (valid until the next run starts).
  const decode_plan& plan() const noexcept { return plan_; }

 private:
  decode_driver(const decode_params& params, decode_heads_fn kernel, const decode_driver_options& options)
      : params_(params),
        kernel_(kernel),
        options_(options),
        max_states_(widest_item_states(params, options)),
        run_states_(max_states_),
        pool_(options.pool ? options.pool : std::make_shared<thread_pool>(options.n_threads)) {}

  uint32_t head_dim() const noexcept { return params_.layout.page.head_dim; }

  // Plan, size the workspace and prepare the source for n_workers; run_mutex_ held.
  template <chunk_source Source>
  status begin(std::span<const decode_sequence> batch, Source& source, uint32_t n_workers) noexcept {
    INSTINFER_TRY(check_batch(batch));
    const chunk_layout staged = source.layout();
    INSTINFER_TRY(check_source_layout(staged));
    run_workers_ = n_workers;
    decode_plan_options po{params_.layout.tokens(),   params_.layout.n_kv_heads, n_workers,
                           options_.items_per_worker, options_.min_item_tokens,  options_.kv_heads_per_item};
    INSTINFER_TRY(plan_.build(
        static_cast<uint32_t>(batch.size()), [batch](uint32_t s) noexcept { return batch[s].shape(); }, po));
    INSTINFER_TRY(prepare_rows(batch));
    INSTINFER_TRY(grow_workspace());
    INSTINFER_TRY(source.prepare(plan_, n_workers));
    run_kernel_params_ = params_;
    run_kernel_params_.layout = staged;
    run_window_ = source.max_window_chunks();
    next_item_.store(0, std::memory_order_relaxed);
    failed_.store(false, std::memory_order_relaxed);
    first_error_ = status{};
    return {};
  }

  // States (query heads) of the widest item.
  static uint32_t widest_item_states(const decode_params& params, const decode_driver_options& options) noexcept {
    const decode_plan_options po{params.layout.tokens(), params.layout.n_kv_heads, 1, 1, 0, options.kv_heads_per_item};
    return po.heads_per_item() * params.group_size;
  }

  status check_batch(std::span<const decode_sequence> batch) const {
    const uint32_t tpp = params_.layout.tokens();
    if (batch.size() >= UINT32_MAX) return {errc::kInvalidArgument, "decode batch is too large"};
    for (size_t i = 0; i < batch.size(); ++i) {
      const decode_sequence& s = batch[i];
      // Messages are built only on failure: a valid batch allocates nothing.
      const auto where = [i] { return "decode batch entry " + std::to_string(i) + ": "; };
      if (s.q == nullptr || s.out == nullptr) return {errc::kInvalidArgument, where() + "q and out must not be null"};
      if (s.n_rows > 0 && rows_kernel_ == nullptr)
        return {errc::kUnsupported, where() + "causal query rows need a rows kernel (decode_driver::set_rows_kernel)"};
      if (s.n_rows > 0 && uint64_t{s.first_pos} + s.n_rows > s.n_tokens)
        return {errc::kInvalidArgument, where() + std::to_string(s.n_rows) + " query rows at position " +
                                            std::to_string(s.first_pos) + " reach past the sequence's " +
                                            std::to_string(s.n_tokens) + " tokens"};
      const uint64_t lo = s.n_chunks == 0 ? 0 : uint64_t{s.n_chunks - 1} * tpp + 1;
      const uint64_t hi = uint64_t{s.n_chunks} * tpp;
      if (s.n_tokens < lo || s.n_tokens > hi)
        return {errc::kInvalidArgument, where() + std::to_string(s.n_tokens) + " tokens do not fit " +
                                            std::to_string(s.n_chunks) + " chunks of " + std::to_string(tpp) +
                                            " tokens (every chunk but the last must be full)"};
    }
    return {};
  }

  // The source may stage fewer kv heads per chunk (e.g. one), but the same pages.
  status check_source_layout(const chunk_layout& staged) const {
    const page_geometry& a = staged.page;
    const page_geometry& b = params_.layout.page;
    if (a.page_bytes != b.page_bytes || a.head_dim != b.head_dim || a.kv_dtype != b.kv_dtype ||
        a.tokens_per_page != b.tokens_per_page)
      return {errc::kInvalidArgument, "decode_driver: the chunk source's pages differ from the decode parameters'"};
    if (staged.n_kv_heads * params_.group_size < max_states_)
      return {errc::kInvalidArgument, "decode_driver: the chunk source's chunks hold " +
                                          std::to_string(staged.n_kv_heads) + " kv heads, fewer than an item covers"};
    return {};
  }

  // Per run: the widest item's states (decode: max_states_; causal rows multiply it by the rows)
  // and every causal row's visible token count.
  status prepare_rows(std::span<const decode_sequence> batch) noexcept {
    uint64_t max_rows = 1, total_rows = 0;
    for (const decode_sequence& s : batch) {
      max_rows = std::max<uint64_t>(max_rows, s.n_rows);
      total_rows += s.n_rows;
    }
    if (uint64_t{max_states_} * max_rows > UINT32_MAX)
      return {errc::kInvalidArgument, "decode_driver: too many query rows in one sequence"};
    run_states_ = static_cast<uint32_t>(uint64_t{max_states_} * max_rows);
    run_has_rows_ = total_rows > 0;
    if (total_rows == 0) return {};
    try {
      if (visible_.size() < total_rows) visible_.resize(total_rows);
      if (row_offset_.size() < batch.size()) row_offset_.resize(batch.size());
    } catch (const std::bad_alloc&) {
      return {errc::kOutOfMemory, "decode_driver: cannot grow the causal rows of " + std::to_string(total_rows)};
    }
    uint64_t next = 0;
    for (size_t b = 0; b < batch.size(); ++b) {
      row_offset_[b] = next;
      for (uint32_t r = 0; r < batch[b].n_rows; ++r) visible_[next + r] = batch[b].first_pos + r + 1;
      next += batch[b].n_rows;
    }
    return {};
  }

  status grow_workspace() noexcept {
    const uint64_t states = run_states_;
    const uint64_t workers = run_workers_;
    try {
      const auto grow = [](auto& v, uint64_t n) {
        if (v.size() < n) v.resize(n);
      };
      grow(partial_o_, uint64_t{plan_.n_partials()} * states * head_dim());
      grow(stats_, plan_.items().size() * states);
      grow(window_o_, workers * states * head_dim());
      grow(window_stats_, workers * states);
      grow(merge_stats_, workers * states);
      if (run_has_rows_) grow(merge_o_, workers * states * head_dim());
      if (remaining_capacity_ < plan_.n_rows()) {
        remaining_ = std::make_unique<std::atomic<uint32_t>[]>(plan_.n_rows());
        remaining_capacity_ = plan_.n_rows();
      }
    } catch (const std::bad_alloc&) {
      return {errc::kOutOfMemory,
              "decode_driver: cannot grow the workspace for " + std::to_string(plan_.items().size()) + " work items"};
    }
    const auto indptr = plan_.indptr();
    for (uint32_t r = 0; r < plan_.n_rows(); ++r)
      remaining_[r].store(indptr[r + 1] - indptr[r], std::memory_order_relaxed);
    return {};
  }

  // Where item i keeps its states and output. Within a row, partials are packed at the row's
  // own width, so the row's slots form the [partial][states][head_dim] block merge_partial_range reads.
  // States of an item: [rows][kv heads of the item][group], rows = 1 for a decode row.
  uint64_t item_states(const decode_work_item& it, const decode_sequence& seq) const noexcept {
    return uint64_t{it.n_kv_heads()} * params_.group_size * (seq.n_rows == 0 ? 1 : seq.n_rows);
  }
  softmax_stats* item_stats(uint32_t i, const decode_work_item& it, const decode_sequence& seq) noexcept {
    const uint32_t first = plan_.indptr()[it.row];
    return stats_.data() + uint64_t{first} * run_states_ + (i - first) * item_states(it, seq);
  }
  float* row_partials(const decode_work_item& first_of_row) noexcept {
    return partial_o_.data() + uint64_t{first_of_row.partial} * run_states_ * head_dim();
  }
  // An unsplit item writes the caller's rows in place (causal rows: strided by n_q_heads), a split
  // one its packed partial block.
  float* item_output(const decode_work_item& it, const decode_sequence& seq) noexcept {
    const uint64_t n_states = item_states(it, seq);
    if (it.partial == decode_work_item::kNoPartial)
      return seq.out + uint64_t{it.kv_head_begin} * params_.group_size * head_dim();
    const decode_work_item& first = plan_.items()[plan_.indptr()[it.row]];
    return row_partials(first) + uint64_t{it.partial - first.partial} * n_states * head_dim();
  }

  template <chunk_source Source>
  void work(uint32_t worker, std::span<const decode_sequence> batch, Source& source, const decode_params& kernel_params,
            uint32_t window) noexcept {
    const auto items = plan_.items();
    for (;;) {
      if (failed_.load(std::memory_order_relaxed)) return;
      const size_t i = next_item_.fetch_add(1, std::memory_order_relaxed);
      if (i >= items.size()) return;
      const decode_work_item& it = items[i];
      const decode_sequence& seq = batch[it.seq];
      softmax_stats* st = item_stats(static_cast<uint32_t>(i), it, seq);
      float* o = item_output(it, seq);
      if (seq.n_rows > 0) {
        if (status s = run_item_rows(worker, it, seq, source, kernel_params, window, st, o); !s.ok()) {
          fail(std::move(s));
          return;
        }
        finish_item_rows(worker, it, seq, st, o);
        continue;
      }
      if (status s = run_item(worker, it, seq, source, kernel_params, window, st, o); !s.ok()) {
        fail(std::move(s));
        return;
      }
      finish_item(worker, it, seq, st, o);
    }
  }

  // The kernel over the item's chunks, window by window; the first window writes (st, o), later
  // ones go through the worker's window buffers and merge in token order.
  template <chunk_source Source>
  status run_item(uint32_t worker, const decode_work_item& it, const decode_sequence& seq, Source& source,
                  const decode_params& kernel_params, uint32_t window, softmax_stats* st, float* o) noexcept {
    const uint32_t G = params_.group_size;
    const uint32_t D = head_dim();
    const uint32_t n_kv = it.n_kv_heads();
    const float* q = seq.q + uint64_t{it.kv_head_begin} * G * D;
    if (it.n_chunks == 0) {  // an empty sequence: empty states, zero output
      kernel_(kernel_params, nullptr, 0, it.last_chunk_tokens, 0, n_kv, q, o, st);
      return {};
    }
    const uint32_t w = window == 0 ? it.n_chunks : window;
    const uint32_t tpp = params_.layout.tokens();
    const uint64_t states = run_states_;
    for (uint32_t c = it.chunk_begin; c < it.chunk_end(); c += w) {
      const uint32_t n = std::min(w, it.chunk_end() - c);
      result<chunk_window> got = source.acquire(worker, it, c, n);
      if (!got.ok()) return got.error();
      const chunk_window& cw = got.value();
      if (cw.first_kv_head + n_kv > kernel_params.layout.n_kv_heads) {
        source.release(worker, it, cw);
        return {errc::kInternal, "decode_driver: a chunk window's kv heads lie outside the source's layout"};
      }
      const uint32_t last = c + n == it.chunk_end() ? it.last_chunk_tokens : tpp;
      if (c == it.chunk_begin) {
        kernel_(kernel_params, cw.chunks, n, last, cw.first_kv_head, n_kv, q, o, st);
      } else {
        float* wo = window_o_.data() + worker * states * D;
        softmax_stats* ws = window_stats_.data() + worker * states;
        kernel_(kernel_params, cw.chunks, n, last, cw.first_kv_head, n_kv, q, wo, ws);
        for (uint32_t h = 0; h < n_kv * G; ++h) merge_state(st[h], o + uint64_t{h} * D, ws[h], wo + uint64_t{h} * D, D);
      }
      source.release(worker, it, cw);
    }
    return {};
  }

  // An unsplit row is final now; a split row is merged by whoever finishes its last item.
  void finish_item(uint32_t worker, const decode_work_item& it, const decode_sequence& seq, const softmax_stats* st,
                   float* o) noexcept {
    const uint32_t G = params_.group_size;
    const uint32_t D = head_dim();
    const uint32_t n_states = it.n_kv_heads() * G;
    float* lse = seq.lse == nullptr ? nullptr : seq.lse + uint64_t{it.kv_head_begin} * G;
    if (it.partial == decode_work_item::kNoPartial) {
      write_normalized(st, o, n_states, D, o, lse);
      return;
    }
    if (remaining_[it.row].fetch_sub(1, std::memory_order_acq_rel) != 1) return;
    const uint32_t first = plan_.indptr()[it.row];
    const uint32_t last = plan_.indptr()[it.row + 1];
    const decode_work_item& head = plan_.items()[first];
    float* out = seq.out + uint64_t{it.kv_head_begin} * G * D;
    softmax_stats* acc = merge_stats_.data() + uint64_t{worker} * run_states_;
    merge_partial_range(item_stats(first, head, seq), row_partials(head), 0, last - first, n_states, D, acc, out);
    write_normalized(acc, out, n_states, D, out, lse);
  }

  // ---- causal rows (decode_sequence::n_rows > 0): the same steps with the rows kernel ----------

  uint64_t out_row_stride(const decode_work_item& it) const noexcept {
    return it.partial == decode_work_item::kNoPartial ? uint64_t{params_.n_q_heads()} * head_dim()
                                                      : uint64_t{it.n_kv_heads()} * params_.group_size * head_dim();
  }

  template <chunk_source Source>
  status run_item_rows(uint32_t worker, const decode_work_item& it, const decode_sequence& seq, Source& source,
                       const decode_params& kernel_params, uint32_t window, softmax_stats* st, float* o) noexcept {
    const uint32_t G = params_.group_size;
    const uint32_t D = head_dim();
    const uint32_t n_kv = it.n_kv_heads();
    const uint64_t row_states = uint64_t{n_kv} * G;
    const uint32_t tpp = params_.layout.tokens();
    decode_rows rows;
    rows.n_rows = seq.n_rows;
    rows.visible = visible_.data() + row_offset_[it.seq];
    rows.first_token = it.chunk_begin * tpp;
    rows.q_stride = uint64_t{params_.n_q_heads()} * D;
    rows.o_stride = out_row_stride(it);
    rows.stats_stride = row_states;
    const float* q = seq.q + uint64_t{it.kv_head_begin} * G * D;
    if (it.n_chunks == 0) {
      rows_kernel_(kernel_params, nullptr, 0, it.last_chunk_tokens, 0, n_kv, rows, q, o, st);
      return {};
    }
    const uint32_t w = window == 0 ? it.n_chunks : window;
    for (uint32_t c = it.chunk_begin; c < it.chunk_end(); c += w) {
      const uint32_t n = std::min(w, it.chunk_end() - c);
      result<chunk_window> got = source.acquire(worker, it, c, n);
      if (!got.ok()) return got.error();
      const chunk_window& cw = got.value();
      if (cw.first_kv_head + n_kv > kernel_params.layout.n_kv_heads) {
        source.release(worker, it, cw);
        return {errc::kInternal, "decode_driver: a chunk window's kv heads lie outside the source's layout"};
      }
      const uint32_t last = c + n == it.chunk_end() ? it.last_chunk_tokens : tpp;
      rows.first_token = c * tpp;
      if (c == it.chunk_begin) {
        rows_kernel_(kernel_params, cw.chunks, n, last, cw.first_kv_head, n_kv, rows, q, o, st);
      } else {
        float* wo = window_o_.data() + worker * uint64_t{run_states_} * D;
        softmax_stats* ws = window_stats_.data() + worker * uint64_t{run_states_};
        decode_rows packed = rows;
        packed.o_stride = row_states * D;
        rows_kernel_(kernel_params, cw.chunks, n, last, cw.first_kv_head, n_kv, packed, q, wo, ws);
        for (uint32_t r = 0; r < seq.n_rows; ++r)
          for (uint64_t h = 0; h < row_states; ++h)
            merge_state(st[r * row_states + h], o + r * rows.o_stride + h * D, ws[r * row_states + h],
                        wo + (r * row_states + h) * D, D);
      }
      source.release(worker, it, cw);
    }
    return {};
  }

  void finish_item_rows(uint32_t worker, const decode_work_item& it, const decode_sequence& seq,
                        const softmax_stats* st, float* o) noexcept {
    const uint32_t G = params_.group_size;
    const uint32_t D = head_dim();
    const uint64_t hq = params_.n_q_heads();
    const uint32_t row_states = it.n_kv_heads() * G;
    float* out = seq.out + uint64_t{it.kv_head_begin} * G * D;
    float* lse = seq.lse == nullptr ? nullptr : seq.lse + uint64_t{it.kv_head_begin} * G;
    const auto lse_row = [&](uint32_t r) { return lse == nullptr ? nullptr : lse + r * hq; };
    if (it.partial == decode_work_item::kNoPartial) {
      for (uint32_t r = 0; r < seq.n_rows; ++r)
        write_normalized(st + uint64_t{r} * row_states, o + r * hq * D, row_states, D, o + r * hq * D, lse_row(r));
      return;
    }
    if (remaining_[it.row].fetch_sub(1, std::memory_order_acq_rel) != 1) return;
    const uint32_t first = plan_.indptr()[it.row];
    const uint32_t last = plan_.indptr()[it.row + 1];
    const decode_work_item& head = plan_.items()[first];
    softmax_stats* acc = merge_stats_.data() + uint64_t{worker} * run_states_;
    float* merged = merge_o_.data() + uint64_t{worker} * run_states_ * D;
    merge_partial_range(item_stats(first, head, seq), row_partials(head), 0, last - first, row_states * seq.n_rows, D,
                        acc, merged);
    for (uint32_t r = 0; r < seq.n_rows; ++r)
      write_normalized(acc + uint64_t{r} * row_states, merged + uint64_t{r} * row_states * D, row_states, D,
                       out + r * hq * D, lse_row(r));
  }

  void fail(status s) noexcept {
    std::lock_guard<std::mutex> lock(error_mutex_);
    if (!failed_.load(std::memory_order_relaxed)) first_error_ = std::move(s);
    failed_.store(true, std::memory_order_release);
  }

  decode_params params_;
  decode_heads_fn kernel_;
  decode_rows_fn rows_kernel_ = nullptr;
  decode_driver_options options_;
  uint32_t max_states_;  // states (query heads) of the widest item
  uint32_t run_states_;  // this run's widest item: max_states_ x the most causal rows of a sequence
  bool run_has_rows_ = false;
  std::shared_ptr<thread_pool> pool_;  // own, or shared (decode_driver_options::pool)
  std::mutex run_mutex_;
  uint32_t run_workers_ = 1;           // this run's workers: the pool, or a shared run's callers
  decode_params run_kernel_params_{};  // params_ with the source's staged layout
  uint32_t run_window_ = 0;            // the source's window (0: an item's whole range)

  // Workspace: grows to the largest batch seen, then the hot path allocates nothing.
  decode_plan plan_;
  std::vector<float> partial_o_;                        // [n_partials][max states][head_dim], packed per row
  std::vector<softmax_stats> stats_;                    // [n_items][max states], packed per row
  std::vector<float> window_o_;                         // [workers][max states][head_dim]
  std::vector<softmax_stats> window_stats_;             // [workers][max states]
  std::vector<softmax_stats> merge_stats_;              // [workers][max states]
  std::vector<float> merge_o_;                          // causal rows: [workers][max states][head_dim]
  std::vector<uint32_t> visible_;                       // causal rows: tokens each row sees
  std::vector<uint64_t> row_offset_;                    // causal rows: a sequence's first row in visible_
  std::unique_ptr<std::atomic<uint32_t>[]> remaining_;  // items left per row
  uint32_t remaining_capacity_ = 0;
  std::atomic<size_t> next_item_{0};
  std::atomic<bool> failed_{false};
  std::mutex error_mutex_;
  status first_error_;
};

}  // namespace instinfer
