// kv_cache's attention calls: decode (attend), sparse decode (attend_sparse), causal chunk
// attention (attend_chunk), the caller's threads (attend_slice, attend_chunk_slice), and what
// serves them: prefetch, the page table, flush and stats.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <new>

#include "core/kv_cache_internal.hpp"
#include "core/slice_gate.hpp"
#include "instinfer/core/crc32c.hpp"
#include "instinfer/kv/kv_cache.hpp"
#include "sparf/sparse_attender.hpp"

namespace instinfer {

using namespace kv_cache_detail;

// ---- decode, sparse decode, and what serves them ----------------------------------------------

status kv_cache::attend(uint32_t layer, std::span<const seq_id> seqs, const float* q, float* out, float* lse) {
  std::lock_guard lock(mutex_);
  INSTINFER_TRY(check_layer(layer));
  if (seqs.empty()) return {errc::kInvalidArgument, "attend needs at least one sequence"};
  if (!q || !out) return {errc::kInvalidArgument, "q and out must not be null"};
  INSTINFER_TRY(fill_batch(layer, seqs));
  auto query = separate_query(seqs.size(), q, out, lse);
  if (!query.ok()) return query.error();
  return backend_->attend(layer, batch_view(query.value(), out, lse));
}

// Backends write out (and lse) while they still read q (the host decoder keeps its running
// accumulator in out), so an overlapping q is copied first; q is one row per sequence, small.
result<const float*> kv_cache::separate_query(size_t n_rows, const float* q, const float* out, const float* lse) {
  const size_t n_q = n_rows * config_.shape.n_q_heads * config_.shape.head_dim;
  const size_t n_lse = n_rows * config_.shape.n_q_heads;
  const bool alias = overlaps(q, n_q * sizeof(float), out, n_q * sizeof(float)) ||
                     (lse != nullptr && overlaps(q, n_q * sizeof(float), lse, n_lse * sizeof(float)));
  if (!alias) return q;
  try {
    if (q_copy_.size() < n_q) q_copy_.resize(n_q);
  } catch (const std::bad_alloc&) {
    return status{errc::kOutOfMemory, "copy of a query that overlaps out or lse"};
  }
  std::memcpy(q_copy_.data(), q, n_q * sizeof(float));
  return static_cast<const float*>(q_copy_.data());
}

// batch_ for one layer: each sequence's page table, in CSR form (the view backends receive).
status kv_cache::fill_batch(uint32_t layer, std::span<const seq_id> seqs) {
  try {
    batch_.clear(config_.page.tokens_per_page);
    for (seq_id s : seqs) {
      auto found = find(s);
      if (!found.ok()) return found.error();
      const layer_table& t = found.value()->layers[layer];
      batch_.add(s, t.chunks, t.n_tokens);
    }
  } catch (const std::bad_alloc&) {
    return {errc::kOutOfMemory, "attend batch of " + std::to_string(seqs.size()) + " sequences"};
  }
  return {};
}

attend_batch kv_cache::batch_view(const float* q, float* out, float* lse) const noexcept {
  return batch_.view(q, out, lse, config_.shape.n_q_heads, config_.shape.head_dim);
}

status kv_cache::attend_sparse(uint32_t layer, std::span<const seq_id> seqs, const float* q, float* out, float* lse,
                               const sparf_params& params) {
  std::lock_guard lock(mutex_);
  if (!attender_)
    return {errc::kUnsupported,
            "attend_sparse needs a cache created with cache_options::sparf or cache_options::page_summaries = true"};
  INSTINFER_TRY(check_layer(layer));
  if (seqs.empty()) return {errc::kInvalidArgument, "attend_sparse needs at least one sequence"};
  if (!q || !out) return {errc::kInvalidArgument, "q and out must not be null"};
  INSTINFER_TRY(params.validate(config_.shape.head_dim));
  INSTINFER_TRY(fill_batch(layer, seqs));
  auto query = separate_query(seqs.size(), q, out, lse);
  if (!query.ok()) return query.error();
  sparf_counters counters;
  INSTINFER_TRY(attender_->attend_sparse(layer, batch_view(query.value(), out, lse), params, &counters));
  sparf_totals_.add(counters);
  return {};
}

void kv_cache::prefetch(uint32_t layer, std::span<const seq_id> seqs) {
  std::lock_guard lock(mutex_);
  if (layer >= config_.shape.n_layers || seqs.empty()) return;
  if (!fill_batch(layer, seqs).ok()) return;  // a hint: an unknown sequence cancels it
  backend_->prefetch(layer, batch_view(nullptr, nullptr, nullptr));
}

status kv_cache::page_table(uint32_t layer, std::span<const seq_id> seqs, csr_page_table& out) const {
  std::lock_guard lock(mutex_);
  INSTINFER_TRY(check_layer(layer));
  const uint32_t tpp = config_.page.tokens_per_page;
  try {
    out.tokens_per_page = tpp;
    out.indptr.assign(1, 0);
    out.indices.clear();
    out.last_page_len.clear();
    for (seq_id s : seqs) {
      auto found = find(s);
      if (!found.ok()) return found.error();
      const layer_table& t = found.value()->layers[layer];
      out.indices.insert(out.indices.end(), t.chunks.begin(), t.chunks.end());
      out.indptr.push_back(static_cast<uint32_t>(out.indices.size()));
      out.last_page_len.push_back(t.n_tokens == 0 ? 0
                                                  : t.n_tokens - (static_cast<uint32_t>(t.chunks.size()) - 1) * tpp);
    }
  } catch (const std::bad_alloc&) {
    return {errc::kOutOfMemory, "page table"};
  }
  return {};
}

status kv_cache::flush() {
  std::lock_guard lock(mutex_);
  if (store_) return commit_locked();
  return backend_->flush();
}

cache_stats kv_cache::stats() const {
  std::lock_guard lock(mutex_);
  cache_stats s;
  s.n_sequences = sequences_.size();
  s.chunk_bytes = config_.layout().chunk_bytes();
  for (uint32_t c : refcount_) s.shared_chunks += c > 1;
  s.backend = backend_->stats();
  s.sparf = sparf_totals_;
  if (attender_) {
    s.sparf_column_bytes = attender_->resident_bytes();
    s.page_summary_bytes = attender_->page_summary_bytes();
    s.sparf_reused_selections = attender_->reused_selections();
  }
  return s;
}

// ---- causal chunk attention --------------------------------------------------------------------

status kv_cache::attend_chunk(uint32_t layer, std::span<const seq_id> seqs, std::span<const uint32_t> positions,
                              std::span<const uint32_t> n_rows, const float* q, float* out, float* lse) {
  std::lock_guard lock(mutex_);
  return attend_chunk_locked(layer, seqs, positions, n_rows, q, out, lse);
}

status kv_cache::attend_chunk_locked(uint32_t layer, std::span<const seq_id> seqs, std::span<const uint32_t> positions,
                                     std::span<const uint32_t> n_rows, const float* q, float* out, float* lse) {
  auto batch = chunk_batch_locked(layer, seqs, positions, n_rows, q, out, lse);
  if (!batch.ok()) return batch.error();
  return backend_->attend_causal(layer, batch.value());
}

status kv_cache::check_attend_call_locked(uint32_t layer, std::span<const seq_id> seqs) {
  INSTINFER_TRY(check_layer(layer));
  for (seq_id s : seqs) {
    auto found = find(s);
    if (!found.ok()) return found.error();
  }
  return {};
}

// The whole call's checks, in the documented order; every slice of a call runs them, so all
// slices of a rejected call return the same error.
result<uint64_t> kv_cache::check_chunk_call_locked(uint32_t layer, std::span<const seq_id> seqs,
                                                   std::span<const uint32_t> positions,
                                                   std::span<const uint32_t> n_rows) {
  INSTINFER_TRY(check_layer(layer));
  if (seqs.empty()) return status{errc::kInvalidArgument, "attend_chunk needs at least one sequence"};
  if (positions.size() != seqs.size() || n_rows.size() != seqs.size())
    return status{errc::kInvalidArgument, "attend_chunk: positions and n_rows need one entry per sequence"};
  uint64_t total = 0;
  for (size_t b = 0; b < seqs.size(); ++b) {
    auto found = find(seqs[b]);
    if (!found.ok()) return found.error();
    const uint32_t len = found.value()->layers[layer].n_tokens;
    if (n_rows[b] == 0)
      return status{errc::kInvalidArgument, "attend_chunk: entry " + std::to_string(b) + " (" + seq_name(seqs[b]) +
                                                ") has n_rows = 0; every sequence needs at least one query row"};
    if (uint64_t{positions[b]} + n_rows[b] > len)
      return status{errc::kInvalidArgument, "attend_chunk: entry " + std::to_string(b) + " (" + seq_name(seqs[b]) +
                                                ") has query rows at positions [" + std::to_string(positions[b]) +
                                                ", " + std::to_string(uint64_t{positions[b]} + n_rows[b]) +
                                                ") but layer " + std::to_string(layer) + " holds " +
                                                std::to_string(len) +
                                                " tokens: append the chunk's K/V first (more queries than positions)"};
    total += n_rows[b];
  }
  if (total > UINT32_MAX / 2) return status{errc::kInvalidArgument, "attend_chunk: too many query rows"};
  return total;
}

result<attend_batch> kv_cache::chunk_batch_locked(uint32_t layer, std::span<const seq_id> seqs,
                                                  std::span<const uint32_t> positions, std::span<const uint32_t> n_rows,
                                                  const float* q, float* out, float* lse) {
  if (!q || !out) return status{errc::kInvalidArgument, "q and out must not be null"};
  auto checked = check_chunk_call_locked(layer, seqs, positions, n_rows);
  if (!checked.ok()) return checked.error();
  const uint64_t total = checked.value();
  INSTINFER_TRY(fill_batch(layer, seqs));
  try {
    row_indptr_.assign(1, 0);
    row_pos_.assign(positions.begin(), positions.end());
    for (uint32_t n : n_rows) row_indptr_.push_back(row_indptr_.back() + n);
  } catch (const std::bad_alloc&) {
    return status{errc::kOutOfMemory, "attend_chunk rows"};
  }
  // Like attend, an out or lse over q is allowed: q is copied first.
  auto query = separate_query(total, q, out, lse);
  if (!query.ok()) return query.error();
  attend_batch batch = batch_view(query.value(), out, lse);
  batch.row_indptr = row_indptr_.data();
  batch.row_pos = row_pos_.data();
  return batch;
}

// ---- slices for the caller's threads ------------------------------------------------------------

namespace {
struct slice_range {
  size_t begin = 0, end = 0;
};
result<slice_range> slice_of(size_t n, uint32_t ith, uint32_t nth) {
  if (nth == 0 || ith >= nth)
    return status{errc::kInvalidArgument,
                  "slice ith " + std::to_string(ith) + " of nth " + std::to_string(nth) + ": need 0 <= ith < nth"};
  return slice_range{n * ith / nth, n * (size_t{ith} + 1) / nth};
}
}  // namespace

// Backends that run attention on the caller's threads (host) share one run among the slices
// (slice_gate); the others get each slice's sequences, one slice at a time under the lock.
status kv_cache::attend_slice(uint32_t layer, std::span<const seq_id> seqs, const float* q, float* out, float* lse,
                              uint32_t ith, uint32_t nth) {
  auto r = slice_of(seqs.size(), ith, nth);
  if (!r.ok()) return r.error();
  if (seqs.empty()) return {errc::kInvalidArgument, "attend needs at least one sequence"};
  if (!q || !out) return {errc::kInvalidArgument, "q and out must not be null"};
  if (nth > 1 && backend_->runs_shared()) {
    const slice_call call{layer, q, out, lse, nth, seqs.size(), false, crc32c(seqs.data(), seqs.size_bytes())};
    return shared_slice(
        call, ith,
        [&]() -> status {
          INSTINFER_TRY(check_layer(layer));
          INSTINFER_TRY(fill_batch(layer, seqs));
          auto query = separate_query(seqs.size(), q, out, lse);
          if (!query.ok()) return query.error();
          return backend_->shared_begin(layer, batch_view(query.value(), out, lse), nth);
        },
        seqs.size(), q, out, lse);
  }
  {
    // Every slice checks the whole call, so all slices of a rejected call return the same error.
    std::lock_guard lock(mutex_);
    INSTINFER_TRY(check_attend_call_locked(layer, seqs));
  }
  if (r->begin == r->end) return {};  // more slices than sequences: nothing to do here
  const size_t row = size_t{config_.shape.n_q_heads} * config_.shape.head_dim;
  return attend(layer, seqs.subspan(r->begin, r->end - r->begin), q + r->begin * row, out + r->begin * row,
                lse ? lse + r->begin * config_.shape.n_q_heads : nullptr);
}

status kv_cache::attend_chunk_slice(uint32_t layer, std::span<const seq_id> seqs, std::span<const uint32_t> positions,
                                    std::span<const uint32_t> n_rows, const float* q, float* out, float* lse,
                                    uint32_t ith, uint32_t nth) {
  auto r = slice_of(seqs.size(), ith, nth);
  if (!r.ok()) return r.error();
  if (seqs.empty()) return {errc::kInvalidArgument, "attend_chunk needs at least one sequence"};
  if (positions.size() != seqs.size() || n_rows.size() != seqs.size())
    return {errc::kInvalidArgument, "attend_chunk: positions and n_rows need one entry per sequence"};
  if (!q || !out) return {errc::kInvalidArgument, "q and out must not be null"};
  if (nth > 1 && backend_->runs_shared()) {
    uint32_t args = crc32c(seqs.data(), seqs.size_bytes());
    args = crc32c(positions.data(), positions.size_bytes(), args);
    args = crc32c(n_rows.data(), n_rows.size_bytes(), args);
    const slice_call call{layer, q, out, lse, nth, seqs.size(), true, args};
    uint64_t total = 0;
    for (uint32_t n : n_rows) total += n;
    return shared_slice(
        call, ith,
        [&]() -> status {
          auto batch = chunk_batch_locked(layer, seqs, positions, n_rows, q, out, lse);
          if (!batch.ok()) return batch.error();
          return backend_->shared_begin(layer, batch.value(), nth);
        },
        total, q, out, lse);
  }
  std::lock_guard lock(mutex_);
  auto checked = check_chunk_call_locked(layer, seqs, positions, n_rows);  // the whole call, as above
  if (!checked.ok()) return checked.error();
  if (r->begin == r->end) return {};
  uint64_t first_row = 0;
  for (size_t b = 0; b < r->begin; ++b) first_row += n_rows[b];
  const size_t row = size_t{config_.shape.n_q_heads} * config_.shape.head_dim;
  const size_t n = r->end - r->begin;
  return attend_chunk_locked(layer, seqs.subspan(r->begin, n), positions.subspan(r->begin, n),
                             n_rows.subspan(r->begin, n), q + first_row * row, out + first_row * row,
                             lse ? lse + first_row * config_.shape.n_q_heads : nullptr);
}

// The cache's lock is taken by the slice that starts the run and released by the one that ends
// it (slice_gate): the page tables and the batch arrays stay as planned while any slice works.
status kv_cache::shared_slice(const slice_call& call, uint32_t ith, const std::function<status()>& begin_locked,
                              uint64_t n_rows, const float* q, const float* out, const float* lse) {
  const uint64_t row = uint64_t{config_.shape.n_q_heads} * config_.shape.head_dim;
  const auto query_crc = [&] { return crc32c(q, n_rows * row * sizeof(float)); };
  const auto output_crc = [&] {
    const uint32_t c = crc32c(out, n_rows * row * sizeof(float));
    return lse == nullptr ? c : crc32c(lse, n_rows * config_.shape.n_q_heads * sizeof(float), c);
  };
  return slices_->enter(
      call, ith, begin_locked, [&](uint32_t worker) { backend_->shared_work(worker); },
      [&]() -> status { return backend_->shared_end(); }, query_crc, output_crc);
}

}  // namespace instinfer
