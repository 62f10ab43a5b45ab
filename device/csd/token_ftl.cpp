#include "token_ftl.hpp"

#include <cstring>

namespace instinfer::csd {

void token_ftl::drop_pages(kv_namespace& ns, uint64_t chunk) noexcept {
  uint32_t* pages = ns.pages(chunk);
  for (uint32_t p = 0; p < ns.pages_per_chunk; ++p) ctx_.blocks.invalidate(pages[p]), pages[p] = kNoPage;
  ns.entry(chunk).on_flash = false;
}

status token_ftl::program_chunk(kv_namespace& ns, uint64_t chunk, uint64_t position_hint, const std::byte* src) {
  drop_pages(ns, chunk);
  uint32_t* pages = ns.pages(chunk);
  // Stripe a page table's chunks over lanes along the token axis: consecutive chunks of a head go
  // to consecutive lanes, i.e. to different channels first, then to different dies.
  const uint32_t lane = position_hint % ctx_.o.flash.lanes();
  uint32_t done = 0;
  while (done < ns.pages_per_chunk) {
    auto r = ctx_.blocks.allocate(lane, ns.pages_per_chunk - done, ++ctx_.program_stamp);
    if (!r.ok()) {
      // No free block: erase dead blocks (no copying) and retry once.
      if (erase_dead(1) == 0) return r.error();
      r = ctx_.blocks.allocate(lane, ns.pages_per_chunk - done, ++ctx_.program_stamp);
      if (!r.ok()) return r.error();
    }
    INSTINFER_TRY(ctx_.store->program(r->first_ppn, r->n_pages, src + uint64_t{done} * ns.geo.page_bytes));
    for (uint32_t i = 0; i < r->n_pages; ++i) {
      pages[done + i] = r->first_ppn + i;
      ctx_.program_page(r->first_ppn + i);
    }
    ctx_.stats.flash_pages_programmed += r->n_pages;
    done += r->n_pages;
  }
  ns.record_sums(chunk, src);
  ns.entry(chunk).on_flash = true;
  return {};
}

status token_ftl::move_to_dram(kv_namespace& ns, uint64_t chunk, std::byte* dst) {
  uint32_t* pages = ns.pages(chunk);
  // Everything is read and checked before any page is dropped: a failure leaves the chunk on flash.
  for (uint32_t p = 0; p < ns.pages_per_chunk; ++p) {
    INSTINFER_TRY(ctx_.store->read(pages[p], dst + uint64_t{p} * ns.geo.page_bytes));
    ctx_.note_read(pages[p]);
    INSTINFER_TRY(ns.verify_page(chunk, p, dst + uint64_t{p} * ns.geo.page_bytes));
  }
  for (uint32_t p = 0; p < ns.pages_per_chunk; ++p) {
    ctx_.blocks.invalidate(pages[p]);
    pages[p] = kNoPage;
  }
  ns.entry(chunk).on_flash = false;
  return {};
}

status token_ftl::read_chunk(const kv_namespace& ns, uint64_t chunk, std::byte* dst) {
  aligned_bytes tmp = alloc_aligned(ns.geo.page_bytes);  // O_DIRECT wants an aligned target
  if (!tmp) return {errc::kOutOfMemory, "read buffer"};
  const uint32_t* pages = ns.pages(chunk);
  for (uint32_t p = 0; p < ns.pages_per_chunk; ++p) {
    INSTINFER_TRY(ctx_.store->read(pages[p], tmp.get()));
    ctx_.note_read(pages[p]);
    INSTINFER_TRY(ns.verify_page(chunk, p, tmp.get()));
    std::memcpy(dst + uint64_t{p} * ns.geo.page_bytes, tmp.get(), ns.geo.page_bytes);
  }
  return {};
}

status token_ftl::program_striped(const std::byte* src, uint64_t page_bytes, uint32_t n_pages, uint64_t lane0,
                                  uint32_t* ppns) {
  const uint32_t lanes = ctx_.o.flash.lanes();
  for (uint32_t i = 0; i < n_pages; ++i) {
    const uint32_t lane = static_cast<uint32_t>((lane0 + i) % lanes);
    auto r = ctx_.blocks.allocate(lane, 1, ++ctx_.program_stamp);
    if (!r.ok() && erase_dead(1) > 0) r = ctx_.blocks.allocate(lane, 1, ++ctx_.program_stamp);
    status s = r.ok() ? ctx_.store->program(r->first_ppn, 1, src + uint64_t{i} * page_bytes) : r.error();
    if (!s.ok()) {
      if (r.ok()) ctx_.blocks.invalidate(r->first_ppn);
      for (uint32_t j = 0; j < i; ++j) ctx_.blocks.invalidate(ppns[j]), ppns[j] = kNoPage;
      return s;
    }
    ppns[i] = r->first_ppn;
    ctx_.program_page(r->first_ppn);
    ++ctx_.stats.flash_pages_programmed;
  }
  return {};
}

uint32_t token_ftl::erase_dead(uint64_t target) {
  return ctx_.blocks.erase_dead(target, [&](uint32_t gb) -> status {
    INSTINFER_TRY(ctx_.store->erase_block(gb * ctx_.o.flash.pages_per_block));
    ctx_.flash_done_at(ctx_.timeline.erase(gb / ctx_.o.flash.blocks_per_die, ctx_.cmd_start()));
    ctx_.stats.flash_pages_erased += ctx_.o.flash.pages_per_block;
    ++ctx_.stats.blocks_erased;
    return {};
  });
}

void token_ftl::set_position(kv_namespace& ns, uint64_t seq, uint32_t layer, uint32_t index, uint32_t chunk) {
  page_table& t = table(ns, seq, layer);
  if (t.size() <= index) t.resize(uint64_t{index} + 1, kNoChunk);
  t[index] = chunk;
}

}  // namespace instinfer::csd
