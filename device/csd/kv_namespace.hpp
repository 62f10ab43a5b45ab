// One namespace of the drive: the KV cache of one host cache (or its share of the heads). Plain
// data: its chunks and token-indexed L2P, the mirrored page tables, the DRAM group buffer's slots
// and SparF's column state. The drive's components act on it: token_ftl (L2P, program, erase),
// group_buffer (slots), column_ftl (SparF's second L2P) and attend_engine (the reads).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "instinfer/attention/decode.hpp"
#include "instinfer/attention/sparf/params.hpp"
#include "instinfer/core/crc32c.hpp"
#include "instinfer/core/status.hpp"
#include "instinfer/csd/protocol.hpp"
#include "instinfer/csd/seq_layer_key.hpp"
#include "instinfer/layout/channel_layout.hpp"
#include "instinfer/layout/chunk_layout.hpp"
#include "instinfer/layout/page_geometry.hpp"

namespace instinfer::csd {

inline constexpr uint32_t kNoSlot = UINT32_MAX;
inline constexpr uint32_t kNoChunk = UINT32_MAX;

struct free_deleter {
  void operator()(std::byte* p) const noexcept { std::free(p); }
};
// Page-aligned memory: O_DIRECT reads land in it.
using aligned_bytes = std::unique_ptr<std::byte[], free_deleter>;

inline aligned_bytes alloc_aligned(uint64_t bytes) {
  return aligned_bytes(static_cast<std::byte*>(std::aligned_alloc(4096, (bytes + 4095) / 4096 * 4096)));
}

struct chunk_entry {
  uint32_t n_tokens = 0;    // tokens written
  uint32_t slot = kNoSlot;  // DRAM group buffer slot (authoritative when set)
  bool on_flash = false;    // the chunk's pages are programmed (l2p holds them)
};

using page_table = std::vector<uint32_t>;  // a (seq, layer)'s chunks in token order

struct kv_namespace {
  uint32_t nsid = 0;
  uint32_t owner_qp = 0;
  namespace_config cfg{};
  page_geometry geo{};
  chunk_layout layout{};         // a whole chunk: [K|V][n_kv_heads] pages
  uint32_t pages_per_chunk = 0;  // 2 * n_kv_heads
  uint64_t chunk_bytes = 0;
  uint64_t base = 0;
  uint64_t count = 0;
  decode_params params{};                // the decode driver's: layout = the whole chunk's
  decode_heads_fn kernel = nullptr;      // the head-range decode kernel for params
  decode_rows_fn rows_kernel = nullptr;  // its causal-rows kernel (attend-chunk); null: none for params
  std::vector<chunk_entry> chunks;
  std::vector<uint32_t> l2p;  // token-indexed L2P: [chunk][K|V][head] -> physical page
  std::unordered_map<seq_layer_key, page_table, seq_layer_hash> tables;  // mirrored page tables

  // DRAM group buffer (group_buffer.hpp)
  std::vector<aligned_bytes> slot_mem;
  std::vector<uint32_t> slot_chunk;
  std::vector<uint64_t> slot_use;  // LRU stamps
  std::vector<uint32_t> free_slots;
  uint64_t max_slots = 0;

  // SparF: the channel-indexed K copy under a second L2P table, and V sums for the running mean
  // (column_ftl.hpp). Column data is derived from the token chunks: a sealed column block is keyed
  // by the chunks (and their generations) it was built from and its first token's row in the first
  // (chunks are append-only, so rows a block used never change under the same id and generation),
  // so forks share it and a reused chunk id never matches stale data; the block being filled lives in DRAM per (seq,
  // layer). Anything missing or stale (after a fork, a truncation, a failed program) is rebuilt from the token pages
  // when attended.
  struct column_block {
    std::vector<uint32_t> chunks, gens;  // the token chunks holding its tokens, in order
    uint32_t offset = 0;                 // its first token's row in chunks[0]
    std::vector<uint32_t> pages;         // [n_kv_heads][channel groups] physical pages
    std::vector<double> v_sum;           // [n_kv_heads][head_dim] sum of V over its tokens
    bool live = false;
  };
  struct column_tail {
    bool valid = false;
    uint32_t block = 0;  // column block index in the (seq, layer): tokens from block * tokens_per_page
    uint32_t n = 0;      // tokens held (< tokens per column page)
    std::vector<uint32_t> chunks, gens;
    aligned_bytes k;  // one column block, channel_layout order
    std::vector<double> v_sum;
    uint64_t use = 0;  // LRU stamp: tails beyond the DRAM budget are dropped, least recent first
  };
  bool sparf = false;
  channel_layout columns{};
  sparf_config sparf_one_head{};  // the engine runs per (item, kv head)
  std::vector<uint32_t> gen;      // per chunk: bumped when the chunk is reset (ids are reused)
  std::vector<column_block> cblocks;
  std::vector<uint32_t> free_cblocks;
  std::unordered_map<uint32_t, std::vector<uint32_t>> cblocks_of_chunk;
  std::unordered_map<seq_layer_key, column_tail, seq_layer_hash> tails;
  uint64_t tail_bytes = 0;  // DRAM held by column tails (budget: the drive's buffer_bytes)

  // Page summaries (cfg.page_summaries; attention/sparf/page_summary.hpp, device/csd/page_summaries.hpp):
  // per chunk (a page group: one chunk's token range) the per-kv-head min and max of K over the
  // rows it holds, in DRAM, folded as rows are written. Keyed by chunk, a summary is shared by
  // forks exactly as the chunk's pages are and freed with the chunk; a page table that uses fewer
  // rows of its last chunk than it holds (after a truncation) has that group's summary rebuilt
  // from the rows when attended. Null: none (never allocated: rebuilt when attended).
  bool page_summaries = false;
  sparf_config summary_one_head{};                  // the exact pass over one kv head's staged pages (sparf_exact_head)
  std::vector<std::unique_ptr<float[]>> summaries;  // [chunk]
  uint64_t summary_bytes = 0;                       // DRAM the summaries hold
  size_t summary_floats() const noexcept { return size_t{2} * cfg.n_kv_heads * cfg.head_dim; }

  // Persistent namespaces (cfg.persist, docs/persistence.md): per chunk, the tokens its flash copy
  // held when programmed (0: no checked copy) and one CRC32C per page over that many rows, seeded
  // with the physical page and the token count, so another page's data, or a copy of another
  // length, never matches. Recorded at program, verified by every read from flash.
  bool persist = false;
  std::vector<uint32_t> stored_tokens;  // [chunk]
  std::vector<uint32_t> page_sums;      // [chunk][page]

  static uint32_t page_sum(const std::byte* page, uint64_t bytes, uint32_t ppn, uint32_t tokens) noexcept {
    const uint32_t seed[2] = {ppn, tokens};
    return crc32c(page, bytes, crc32c(seed, sizeof seed));
  }
  // Record the checksums of a chunk just programmed from `src` (chunk_layout order).
  void record_sums(uint64_t chunk, const std::byte* src) noexcept {
    if (!persist) return;
    const uint32_t n = entry(chunk).n_tokens;
    const uint64_t bytes = uint64_t{n} * geo.row_bytes();
    const uint32_t* pp = pages(chunk);
    for (uint32_t p = 0; p < pages_per_chunk; ++p)
      page_sums[(chunk - base) * pages_per_chunk + p] = page_sum(src + uint64_t{p} * geo.page_bytes, bytes, pp[p], n);
    stored_tokens[chunk - base] = n;
  }
  // A page of `chunk` (index p in the chunk) just read from flash.
  status verify_page(uint64_t chunk, uint32_t p, const std::byte* data) const {
    if (!persist) return {};
    const uint32_t n = stored_tokens[chunk - base];
    const uint32_t ppn = pages(chunk)[p];
    if (page_sum(data, uint64_t{n} * geo.row_bytes(), ppn, n) == page_sums[(chunk - base) * pages_per_chunk + p])
      return {};
    return {errc::kCorruptData, "chunk " + std::to_string(chunk - base) + " page " + std::to_string(p) +
                                    " (flash page " + std::to_string(ppn) +
                                    ") fails its checksum: the flash data is "
                                    "damaged; the sequences holding it cannot be served"};
  }

  uint32_t q_heads() const noexcept { return cfg.n_kv_heads * cfg.group_size; }
  bool owns(uint64_t chunk) const noexcept { return chunk >= base && chunk - base < count; }
  chunk_entry& entry(uint64_t chunk) noexcept { return chunks[chunk - base]; }
  const chunk_entry& entry(uint64_t chunk) const noexcept { return chunks[chunk - base]; }
  uint32_t* pages(uint64_t chunk) noexcept { return l2p.data() + (chunk - base) * pages_per_chunk; }
  const uint32_t* pages(uint64_t chunk) const noexcept { return l2p.data() + (chunk - base) * pages_per_chunk; }
  // The chunk's bytes in the group buffer, or null when it is not buffered.
  const std::byte* resident(uint64_t chunk) const noexcept {
    const uint32_t slot = entry(chunk).slot;
    return slot == kNoSlot ? nullptr : slot_mem[slot].get();
  }
  uint32_t chunks_for(uint32_t n_tokens) const noexcept {
    return (n_tokens + geo.tokens_per_page - 1) / geo.tokens_per_page;
  }

  status check_chunk(uint64_t chunk) const {
    if (!owns(chunk))
      return {errc::kInvalidArgument, "chunk " + std::to_string(chunk) + " is not in namespace " +
                                          std::to_string(nsid) + " (chunks " + std::to_string(base) + ".." +
                                          std::to_string(base + count - 1) + ")"};
    return {};
  }
  status check_layer(uint32_t layer) const {
    if (layer >= cfg.n_layers)
      return {errc::kLayerOutOfRange,
              "layer " + std::to_string(layer) + " >= n_layers " + std::to_string(cfg.n_layers)};
    return {};
  }
};

}  // namespace instinfer::csd
