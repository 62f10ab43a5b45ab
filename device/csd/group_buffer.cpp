#include "group_buffer.hpp"

#include <cstring>

namespace instinfer::csd {

result<uint32_t> group_buffer::acquire_slot(kv_namespace& ns, uint64_t chunk) {
  uint32_t slot;
  if (!ns.free_slots.empty()) {
    slot = ns.free_slots.back();
    ns.free_slots.pop_back();
  } else if (ns.slot_mem.size() < ns.max_slots) {
    aligned_bytes mem = alloc_aligned(ns.chunk_bytes);
    if (!mem) return status{errc::kOutOfMemory, "cannot allocate a group-buffer slot"};
    slot = static_cast<uint32_t>(ns.slot_mem.size());
    ns.slot_mem.push_back(std::move(mem));
    ns.slot_chunk.push_back(kNoChunk);
    ns.slot_use.push_back(0);
  } else {
    // Buffer full: program the least recently used partial chunk as it is.
    uint32_t victim = 0;
    for (uint32_t s = 1; s < ns.slot_chunk.size(); ++s)
      if (ns.slot_use[s] < ns.slot_use[victim]) victim = s;
    const uint64_t vc = ns.slot_chunk[victim];
    INSTINFER_TRY(ftl_.program_chunk(ns, vc, vc, ns.slot_mem[victim].get()));
    ++ctx_.stats.buffer_evictions;
    slot = victim;
    ns.entry(vc).slot = kNoSlot;
  }
  ns.slot_chunk[slot] = static_cast<uint32_t>(chunk);
  ns.slot_use[slot] = ++ctx_.use_clock;
  ns.entry(chunk).slot = slot;
  return slot;
}

void group_buffer::release(kv_namespace& ns, uint64_t chunk) noexcept {
  chunk_entry& ce = ns.entry(chunk);
  if (ce.slot == kNoSlot) return;
  ns.slot_chunk[ce.slot] = kNoChunk;
  ns.free_slots.push_back(ce.slot);
  ce.slot = kNoSlot;
}

result<std::byte*> group_buffer::buffered(kv_namespace& ns, uint64_t chunk) {
  chunk_entry& ce = ns.entry(chunk);
  if (ce.slot != kNoSlot) {
    ns.slot_use[ce.slot] = ++ctx_.use_clock;
    return ns.slot_mem[ce.slot].get();
  }
  auto slot = acquire_slot(ns, chunk);
  if (!slot.ok()) return slot.error();
  std::byte* dst = ns.slot_mem[*slot].get();
  if (ce.on_flash) {
    if (status s = ftl_.move_to_dram(ns, chunk, dst); !s.ok()) {
      release(ns, chunk);  // the slot holds a failed read: never serve it, the chunk stays on flash
      return s;
    }
    ++ctx_.stats.buffer_reloads;
  } else {
    // Nothing stored yet. The slot still holds what it held before (another chunk's rows, or heap
    // memory another namespace freed), and reads and programs take whole pages: the rows past what
    // is written must be zeros, never someone else's KV.
    std::memset(dst, 0, ns.chunk_bytes);
  }
  return dst;
}

status group_buffer::seal(kv_namespace& ns, uint64_t chunk, uint64_t position_hint) {
  INSTINFER_TRY(ftl_.program_chunk(ns, chunk, position_hint, ns.resident(chunk)));
  release(ns, chunk);
  return {};
}

}  // namespace instinfer::csd
