// The batch an attention call hands a backend: one layer's page tables for a batch of sequences,
// in CSR form (kv/page_table.hpp: indptr / indices / last_page_len, FlashInfer's paged_kv), plus
// the query, output and lse rows. It is a trivially copyable view, so it crosses every boundary as
// is: host kernels, the SSD's read planner, the CSD client's command encoder, a CUDA upload.
//
// `batch[b]` is sequence b seen as an attend_item (its chunk ids as a span, token count, row
// pointers), computed from the CSR arrays: backends walk a batch without copying it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <iterator>
#include <span>
#include <type_traits>
#include <vector>

#include "instinfer/kv/page_table.hpp"

namespace instinfer {

using chunk_id = uint32_t;
inline constexpr chunk_id kInvalidChunk = UINT32_MAX;
using seq_id = uint64_t;

// One sequence of an attend call.
struct attend_item {
  seq_id seq = 0;
  std::span<const chunk_id> chunks;  // the (seq, layer) page table, in token order
  uint32_t n_tokens = 0;             // tokens of this layer: fill of the last chunk follows
  const float* q = nullptr;          // [n_q_heads][head_dim]
  float* out = nullptr;              // [n_q_heads][head_dim]
  float* lse = nullptr;              // [n_q_heads] or null
  // Causal chunk (attend_causal): 0 = one decode row; n > 0 = q, out [n_rows][n_q_heads][head_dim]
  // and lse [n_rows][n_q_heads], row r at position first_pos + r seeing tokens [0, first_pos + r].
  uint32_t n_rows = 0;
  uint32_t first_pos = 0;
};

struct attend_batch {
  page_table_view pages{};       // sequence b's chunks: indices[indptr[b] .. indptr[b + 1])
  const seq_id* seqs = nullptr;  // [batch]
  const float* q = nullptr;      // [batch][n_q_heads][head_dim]
  float* out = nullptr;          // [batch][n_q_heads][head_dim]
  float* lse = nullptr;          // [batch][n_q_heads] or null
  uint32_t n_q_heads = 0;
  uint32_t head_dim = 0;
  // Causal chunks (attention_engine::attend_causal), else null: sequence b's query rows are
  // [row_indptr[b], row_indptr[b + 1]) of q / out / lse, at positions row_pos[b] + i.
  const uint32_t* row_indptr = nullptr;  // [batch + 1]
  const uint32_t* row_pos = nullptr;     // [batch]

  constexpr uint32_t size() const noexcept { return pages.batch; }
  constexpr bool empty() const noexcept { return pages.batch == 0; }

  attend_item operator[](uint32_t b) const noexcept {
    const size_t row = size_t{n_q_heads} * head_dim;
    if (row_indptr != nullptr) {
      const size_t r0 = row_indptr[b];
      return {seqs[b],
              std::span<const chunk_id>(pages.indices + pages.indptr[b], pages.n_chunks(b)),
              static_cast<uint32_t>(pages.n_tokens(b)),
              q != nullptr ? q + r0 * row : nullptr,
              out != nullptr ? out + r0 * row : nullptr,
              lse != nullptr ? lse + r0 * n_q_heads : nullptr,
              row_indptr[b + 1] - row_indptr[b],
              row_pos[b]};
    }
    return {seqs[b],
            std::span<const chunk_id>(pages.indices + pages.indptr[b], pages.n_chunks(b)),
            static_cast<uint32_t>(pages.n_tokens(b)),
            q != nullptr ? q + b * row : nullptr,  // null rows stay null (prefetch carries none)
            out != nullptr ? out + b * row : nullptr,
            lse != nullptr ? lse + size_t{b} * n_q_heads : nullptr};
  }

  // Range-for over the sequences (items by value).
  struct iterator {
    const attend_batch* batch = nullptr;
    uint32_t b = 0;
    using value_type = attend_item;
    using difference_type = std::ptrdiff_t;
    attend_item operator*() const noexcept { return (*batch)[b]; }
    iterator& operator++() noexcept {
      ++b;
      return *this;
    }
    iterator operator++(int) noexcept { return {batch, b++}; }
    bool operator==(const iterator& o) const noexcept { return b == o.b; }
  };
  iterator begin() const noexcept { return {this, 0}; }
  iterator end() const noexcept { return {this, size()}; }
};
static_assert(std::is_trivially_copyable_v<attend_batch>);

// Owns the arrays behind an attend_batch: the manager's per-call workspace (grow-only) and a
// convenient way for tests and tools to build a batch from (seq, chunk ids, token count) rows.
class attend_batch_builder {
 public:
  void clear(uint32_t tokens_per_page) {
    table_.indptr.assign(1, 0);
    table_.indices.clear();
    table_.last_page_len.clear();
    table_.tokens_per_page = tokens_per_page;
    seqs_.clear();
  }
  // A token count that does not fit the chunks gives a last_page_len outside [1, tokens_per_page],
  // which backends refuse: builders never validate, so bad batches can be tested.
  void add(seq_id seq, std::span<const chunk_id> chunks, uint32_t n_tokens) {
    table_.indices.insert(table_.indices.end(), chunks.begin(), chunks.end());
    table_.indptr.push_back(static_cast<uint32_t>(table_.indices.size()));
    const uint32_t full = chunks.empty() ? 0 : static_cast<uint32_t>(chunks.size() - 1) * table_.tokens_per_page;
    table_.last_page_len.push_back(chunks.empty() ? 0 : n_tokens - full);
    seqs_.push_back(seq);
  }
  uint32_t size() const noexcept { return static_cast<uint32_t>(seqs_.size()); }
  attend_batch view(const float* q, float* out, float* lse, uint32_t n_q_heads, uint32_t head_dim) const noexcept {
    return {table_.view(), seqs_.data(), q, out, lse, n_q_heads, head_dim};
  }
  const csr_page_table& table() const noexcept { return table_; }

 private:
  csr_page_table table_;
  std::vector<seq_id> seqs_;
};

}  // namespace instinfer
