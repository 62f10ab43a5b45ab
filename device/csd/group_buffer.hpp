// The drive's DRAM group buffer: a chunk being appended to lives in a slot until it is full, then
// it is programmed as a whole (one block-packed append of all its pages). When every slot of the
// namespace is taken, the least recently used partial chunk is programmed as it is and read back
// when appended to again: the only path that rewrites flash, counted as evictions and reloads.
#pragma once

#include <cstddef>
#include <cstdint>

#include "drive_context.hpp"
#include "kv_namespace.hpp"
#include "token_ftl.hpp"

namespace instinfer::csd {

class group_buffer {
 public:
  group_buffer(drive_context& ctx, token_ftl& ftl) noexcept : ctx_(ctx), ftl_(ftl) {}

  // The chunk's bytes in a slot, for an append or a copy: reloaded from flash if it was programmed,
  // zeros if nothing was stored.
  result<std::byte*> buffered(kv_namespace& ns, uint64_t chunk);
  // The chunk is full: program it and free its slot.
  status seal(kv_namespace& ns, uint64_t chunk, uint64_t position_hint);
  void release(kv_namespace& ns, uint64_t chunk) noexcept;

 private:
  result<uint32_t> acquire_slot(kv_namespace& ns, uint64_t chunk);

  drive_context& ctx_;
  token_ftl& ftl_;
};

}  // namespace instinfer::csd
