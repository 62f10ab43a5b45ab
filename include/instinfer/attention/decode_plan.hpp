// Decode planning: how a batch of sequences is cut into work items, before anything runs.
//
// Plan once, then run (as FlashInfer's scheduler does): the planner sees only shapes (chunks and
// tokens per sequence), never data or I/O, and produces
//   - work items (sequence, kv-head range, chunk range, partial slot), ordered by output row and,
//     within a row, by token;
//   - a CSR `indptr` over output rows: row r's items (= its partials) are
//     items[indptr[r] .. indptr[r + 1]), in token order, so merging them in that order is the
//     same on every backend.
// An output row is one sequence's kv-head range: all kv heads (the host sweeps each chunk once
// for all heads; `kv_heads_per_item = 0`) or a single kv head (the drive reads one head's flash
// pages per task; `kv_heads_per_item = 1`), or any range size between.
//
// A sequence is split into several items only when that helps load balance: the target is about
// total chunk-heads / (workers * items_per_worker) chunks per item, raised to `min_item_tokens`
// worth of chunks so that the merge stays negligible next to an item's work (even shares of a row
// keep every item above half the target). One worker never splits. A sequence with no tokens still
// gets one item of zero chunks, so its output (zeros, lse = -inf) is written like any other.
// The planner is noexcept; its arrays grow to the largest batch seen, then stay.
#pragma once

#include <cstdint>
#include <new>
#include <span>
#include <string>
#include <vector>

#include "instinfer/core/status.hpp"

namespace instinfer {

// One sequence as the planner sees it: n_chunks chunks, every one full except the last.
struct decode_sequence_shape {
  uint32_t n_chunks = 0;
  uint32_t n_tokens = 0;  // (n_chunks - 1) * tokens_per_chunk < n_tokens <= n_chunks * tokens_per_chunk
};

struct decode_plan_options {
  uint32_t tokens_per_chunk = 1;
  uint32_t n_kv_heads = 1;
  uint32_t n_workers = 1;
  uint32_t items_per_worker = 4;   // aim for this many items per worker (dynamic balance)
  uint32_t min_item_tokens = 512;  // target at least this many tokens per item
  uint32_t kv_heads_per_item = 0;  // split granularity over kv heads: 0 = all kv heads of the sequence

  constexpr uint32_t heads_per_item() const noexcept {
    return kv_heads_per_item == 0 || kv_heads_per_item > n_kv_heads ? n_kv_heads : kv_heads_per_item;
  }
  constexpr uint32_t rows_per_sequence() const noexcept {
    return (n_kv_heads + heads_per_item() - 1) / heads_per_item();
  }
};

// The host's policy: items cover every kv head of their chunks (one sequential sweep per chunk).
constexpr decode_plan_options host_sweep_policy(uint32_t tokens_per_chunk, uint32_t n_kv_heads,
                                                uint32_t n_workers) noexcept {
  return {tokens_per_chunk, n_kv_heads, n_workers, 4, 512, 0};
}
// The drive's policy: one item per (sequence, kv head, chunk range); a head's pages are read alone.
constexpr decode_plan_options per_kv_head_policy(uint32_t tokens_per_chunk, uint32_t n_kv_heads,
                                                 uint32_t n_workers) noexcept {
  return {tokens_per_chunk, n_kv_heads, n_workers, 4, 0, 1};
}

struct decode_work_item {
  static constexpr uint32_t kNoPartial = UINT32_MAX;

  uint32_t seq = 0;
  uint32_t kv_head_begin = 0;
  uint32_t kv_head_end = 0;  // exclusive
  uint32_t chunk_begin = 0;
  uint32_t n_chunks = 0;
  uint32_t last_chunk_tokens = 0;  // tokens of the item's last chunk (tokens_per_chunk if not the sequence's last)
  uint32_t row = 0;                // output row: indptr[row] <= this item's index < indptr[row + 1]
  // Slot in the partial-output workspace, consecutive within a row; kNoPartial when the row has
  // this one item, which then writes its output in place.
  uint32_t partial = kNoPartial;

  constexpr uint32_t n_kv_heads() const noexcept { return kv_head_end - kv_head_begin; }
  constexpr uint32_t chunk_end() const noexcept { return chunk_begin + n_chunks; }
};

// Pure arithmetic of the split, constexpr so that the invariants are checked at compile time too.
namespace decode_split {

// Chunks per item: unlimited with one worker, else total chunk-heads over the items wanted.
constexpr uint64_t target_chunks(uint64_t total_chunks, const decode_plan_options& o) noexcept {
  if (o.n_workers <= 1) return UINT32_MAX;
  const uint64_t tpc = o.tokens_per_chunk == 0 ? 1 : o.tokens_per_chunk;
  const uint64_t min_chunks = (o.min_item_tokens + tpc - 1) / tpc;
  const uint64_t want = uint64_t{o.n_workers} * (o.items_per_worker == 0 ? 1 : o.items_per_worker);
  const uint64_t units = total_chunks * o.rows_per_sequence();  // one unit: a chunk of one row
  const uint64_t even = (units + want - 1) / want;
  const uint64_t t = even > min_chunks ? even : min_chunks;
  return t == 0 ? 1 : t;
}

// Items of a row of n_chunks chunks: always >= 1 (an empty row still writes its output).
constexpr uint32_t parts(uint32_t n_chunks, uint64_t target) noexcept {
  return n_chunks == 0 ? 1u : static_cast<uint32_t>((n_chunks + target - 1) / target);
}

// First chunk of part p of `n` parts over n_chunks chunks: even shares, in token order.
constexpr uint32_t part_begin(uint32_t n_chunks, uint32_t n, uint32_t p) noexcept {
  return static_cast<uint32_t>(uint64_t{n_chunks} * p / n);
}

}  // namespace decode_split

static_assert(decode_split::target_chunks(1000, host_sweep_policy(16, 8, 1)) == UINT32_MAX);
static_assert(decode_split::target_chunks(1000, host_sweep_policy(16, 8, 4)) == 63);  // 1000 / 16 items
static_assert(decode_split::target_chunks(10, host_sweep_policy(16, 8, 4)) == 32);    // 512 tokens minimum
static_assert(decode_split::target_chunks(10, per_kv_head_policy(16, 8, 4)) == 5);    // 80 chunk-heads / 16
static_assert(decode_split::parts(0, 5) == 1 && decode_split::parts(10, 5) == 2 && decode_split::parts(11, 5) == 3);
static_assert(decode_split::part_begin(10, 3, 0) == 0 && decode_split::part_begin(10, 3, 1) == 3 &&
              decode_split::part_begin(10, 3, 3) == 10);
static_assert(per_kv_head_policy(16, 8, 2).rows_per_sequence() == 8 &&
              host_sweep_policy(16, 8, 2).rows_per_sequence() == 1);
static_assert(decode_plan_options{16, 7, 2, 4, 0, 3}.rows_per_sequence() == 3);

// The plan of one batch. Build it, then read items() and indptr() until the next build.
class decode_plan {
 public:
  // shape_of(s) -> decode_sequence_shape for s in [0, n_sequences). Shapes are trusted here:
  // callers validate them first (see decode_driver).
  template <class ShapeOf>
  status build(uint32_t n_sequences, ShapeOf&& shape_of, const decode_plan_options& options) noexcept {
    options_ = options;
    uint64_t total_chunks = 0;
    for (uint32_t s = 0; s < n_sequences; ++s) total_chunks += shape_of(s).n_chunks;
    const uint64_t target = decode_split::target_chunks(total_chunks, options);
    const uint32_t per_item = options.heads_per_item();
    const uint32_t rows = options.rows_per_sequence();
    try {
      items_.clear();
      indptr_.clear();
      indptr_.reserve(uint64_t{n_sequences} * rows + 1);
      n_partials_ = 0;
      for (uint32_t s = 0; s < n_sequences; ++s) {
        const decode_sequence_shape sh = shape_of(s);
        const uint32_t n = decode_split::parts(sh.n_chunks, target);
        for (uint32_t h = 0; h < options.n_kv_heads; h += per_item) {
          const uint32_t h_end = h + per_item < options.n_kv_heads ? h + per_item : options.n_kv_heads;
          const uint32_t row = static_cast<uint32_t>(indptr_.size());
          indptr_.push_back(static_cast<uint32_t>(items_.size()));
          for (uint32_t p = 0; p < n; ++p) {
            const uint32_t begin = decode_split::part_begin(sh.n_chunks, n, p);
            const uint32_t end = decode_split::part_begin(sh.n_chunks, n, p + 1);
            const uint32_t last = end == sh.n_chunks && end > 0 ? sh.n_tokens - (end - 1) * options.tokens_per_chunk
                                                                : options.tokens_per_chunk;
            items_.push_back(
                {s, h, h_end, begin, end - begin, last, row, n > 1 ? n_partials_++ : decode_work_item::kNoPartial});
          }
        }
      }
      indptr_.push_back(static_cast<uint32_t>(items_.size()));
    } catch (const std::bad_alloc&) {
      return {errc::kOutOfMemory,
              "decode_plan: cannot grow the plan for a batch of " + std::to_string(n_sequences) + " sequences"};
    }
    return {};
  }

  status build(std::span<const decode_sequence_shape> shapes, const decode_plan_options& options) noexcept {
    return build(
        static_cast<uint32_t>(shapes.size()), [shapes](uint32_t s) noexcept { return shapes[s]; }, options);
  }

  std::span<const decode_work_item> items() const noexcept { return items_; }
  // n_rows() + 1 offsets into items(); row r = (sequence r / rows_per_sequence, head range r % rows_per_sequence).
  std::span<const uint32_t> indptr() const noexcept { return indptr_; }
  uint32_t n_rows() const noexcept { return indptr_.empty() ? 0 : static_cast<uint32_t>(indptr_.size() - 1); }
  uint32_t n_partials() const noexcept { return n_partials_; }
  const decode_plan_options& options() const noexcept { return options_; }

 private:
  decode_plan_options options_{};
  std::vector<decode_work_item> items_;
  std::vector<uint32_t> indptr_;
  uint32_t n_partials_ = 0;
};

}  // namespace instinfer
