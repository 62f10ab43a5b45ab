// The token-indexed FTL: each chunk's K and V pages under the namespace's L2P, the mirrored
// (seq, layer) page tables, programming (a whole chunk into one lane's block, or pages striped
// over lanes), and erasing dead blocks. It knows nothing of the DRAM group buffer: callers hand it
// the bytes to program.
#pragma once

#include <cstddef>
#include <cstdint>

#include "drive_context.hpp"
#include "kv_namespace.hpp"

namespace instinfer::csd {

class token_ftl {
 public:
  explicit token_ftl(drive_context& ctx) noexcept : ctx_(ctx) {}

  // Program a chunk's pages (`src`: chunk_layout order) to flash; its old pages become invalid. The
  // K and V pages of every head go into the same erase block of one lane when they fit.
  // position_hint: the chunk's page-table position plus stripe(seq, layer).
  status program_chunk(kv_namespace& ns, uint64_t chunk, uint64_t position_hint, const std::byte* src);
  // Read a programmed chunk into dst (aligned, chunk_bytes) and drop its pages: the chunk lives in
  // DRAM again (reloaded for an append).
  status move_to_dram(kv_namespace& ns, uint64_t chunk, std::byte* dst);
  // Copy a programmed chunk into dst (any alignment), keeping it on flash.
  status read_chunk(const kv_namespace& ns, uint64_t chunk, std::byte* dst);
  // Invalidate the chunk's pages (reset or overwrite).
  void drop_pages(kv_namespace& ns, uint64_t chunk) noexcept;

  // Program n_pages pages, page i on lane (lane0 + i): pages of one head that a later read wants
  // together land on different channels. All or nothing; ppns receives the pages.
  status program_striped(const std::byte* src, uint64_t page_bytes, uint32_t n_pages, uint64_t lane0, uint32_t* ppns);
  // Erase whole dead blocks, least recently written first, until `target` blocks are free (0: all).
  uint32_t erase_dead(uint64_t target);

  // Where a (seq, layer)'s stripe starts, so different sequences and layers start on different lanes.
  static uint64_t stripe(uint64_t seq, uint32_t layer) noexcept {
    return flash_stripe(seq, layer);  // models.hpp: the paper harness places its pages the same way
  }

  // The mirrored page tables.
  static page_table& table(kv_namespace& ns, uint64_t seq, uint32_t layer) {
    return ns.tables[seq_layer_key{seq, layer}];
  }
  static void set_position(kv_namespace& ns, uint64_t seq, uint32_t layer, uint32_t index, uint32_t chunk);

 private:
  drive_context& ctx_;
};

}  // namespace instinfer::csd
