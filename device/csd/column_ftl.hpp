// SparF's second FTL: the channel-indexed copy of K under its own L2P (column blocks), and the V
// sums for the running mean. Column data is derived from the token chunks, so losing it never
// loses KV: the write path appends to a DRAM tail and programs it as a column block when sealed;
// the attend path rebuilds anything missing or stale from the token pages.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "drive_context.hpp"
#include "kv_namespace.hpp"
#include "token_ftl.hpp"

namespace instinfer::csd {

class column_ftl {
 public:
  using column_tail = kv_namespace::column_tail;

  column_ftl(drive_context& ctx, token_ftl& ftl) noexcept : ctx_(ctx), ftl_(ftl) {}

  // Write path: the tokens just stored at [first_index * tpp + first_token, + n) of (seq, layer)
  // (ids: the chunks named by the write; k, v: rows [n][n_kv_heads][head_dim]) also go into the
  // column tail. A failure here loses no token data, so it is not the write's: the tail is marked
  // stale and rebuilt when attended. May throw std::bad_alloc (then call forget_tail).
  void append(kv_namespace& ns, uint64_t seq, uint32_t layer, uint32_t first_index, uint32_t first_token,
              const uint32_t* ids, const std::byte* k, const std::byte* v, uint32_t n);
  // Attend path: the column blocks of (seq, layer)'s first n tokens (table `tab`), rebuilding what is
  // missing or stale, and the tail (nullptr when n is a multiple of the column page's tokens).
  status ensure(kv_namespace& ns, uint64_t seq, uint32_t layer, const page_table& tab, uint32_t n,
                std::vector<uint32_t>& blocks_out, const column_tail*& tail_out);

  // The chunk was reset: its id may be reused, so no column block built from it may match again.
  void chunk_reset(kv_namespace& ns, uint32_t chunk) noexcept;
  // Mark the (seq, layer)'s tail stale (rebuilt when attended).
  static void forget_tail(kv_namespace& ns, uint64_t seq, uint32_t layer) noexcept;
  // Free the tails of a sequence's layers.
  static void drop_sequence(kv_namespace& ns, uint64_t seq) noexcept;

 private:
  // Tokens [first, first + n) of a (seq, layer) as a run of its token chunks: the first one's
  // table position, how many, and the first token's row in the first chunk. A column block need not
  // start or end on a chunk boundary (a quantized row gives e.g. 30 tokens a page against 512 column
  // tokens), so its run may share its first and last chunks with the neighbouring blocks.
  struct chunk_run {
    uint32_t first_index = 0, count = 0, offset = 0;
  };
  static chunk_run run_of(const kv_namespace& ns, uint64_t first, uint32_t n) noexcept;

  static uint32_t gen_of(const kv_namespace& ns, uint32_t chunk) noexcept { return ns.gen[chunk - ns.base]; }
  void drop_block(kv_namespace& ns, uint32_t b) noexcept;
  static uint32_t find_block(const kv_namespace& ns, const uint32_t* chunks, const chunk_run& run) noexcept;
  result<uint32_t> add_block(kv_namespace& ns, const uint32_t* chunks, const chunk_run& run, const std::byte* src,
                             const std::vector<double>& v_sum, uint64_t lane0);
  status build_columns(kv_namespace& ns, const uint32_t* chunks, uint32_t offset, uint32_t n, std::byte* dst,
                       std::vector<double>& v_sum);
  status ensure_tail_memory(kv_namespace& ns, column_tail& tl, bool may_evict);

  drive_context& ctx_;
  token_ftl& ftl_;
};

}  // namespace instinfer::csd
