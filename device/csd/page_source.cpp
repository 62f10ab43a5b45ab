#include "page_source.hpp"

#include <algorithm>
#include <new>

namespace instinfer::csd {

status page_chunk_source::prepare(const decode_plan&, uint32_t n_workers) noexcept {
  const int64_t cpu0 = thread_cpu_ns();
  if (n_workers > workers_.size()) return {errc::kInternal, "attend: more driver workers than drive cores"};
  const uint64_t half = uint64_t{window_} * 2 * ns_.geo.page_bytes;  // window_ x [K][V]
  status s;
  try {
    lanes_.assign(n_workers, lane{});
    for (uint32_t w = 0; w < n_workers && s.ok(); ++w) {
      attend_worker& ws = workers_[w];
      s = ws.ensure_reader(store_, 2 * window_ * 2);
      if (s.ok() && !reserve_aligned(ws.staging, ws.staging_bytes, 2 * half))
        s = {errc::kOutOfMemory, "attend staging buffer"};
      if (!s.ok()) break;
      ws.ptrs.resize(window_);
      lanes_[w].buf[0] = ws.staging.get();
      lanes_[w].buf[1] = ws.staging.get() + half;
    }
  } catch (const std::bad_alloc&) {
    s = {errc::kOutOfMemory, "attend worker"};
  }
  prepare_cpu_ = thread_cpu_ns() - cpu0;
  return s;
}

// Chunks [first, first + n) of the item's head into dst: copies from DRAM, queued flash reads.
status page_chunk_source::queue_window(uint32_t worker, const decode_work_item& item, uint32_t first, uint32_t n,
                                       std::byte* dst) noexcept {
  attend_worker& ws = workers_[worker];
  const page_table& tab = *tables_[item.seq];
  const uint64_t pair = 2 * uint64_t{ns_.geo.page_bytes};
  for (uint32_t ci = first; ci < first + n; ++ci)
    INSTINFER_TRY(ws.stage_head(ns_, tab[ci], item.kv_head_begin, dst + uint64_t{ci - first} * pair));
  return ws.reader->submit();
}

result<chunk_window> page_chunk_source::acquire(uint32_t worker, const decode_work_item& item, uint32_t first,
                                                uint32_t n) noexcept {
  lane& l = lanes_[worker];
  if (l.cpu0 < 0) l.cpu0 = thread_cpu_ns();
  attend_worker& ws = workers_[worker];
  std::byte* buf = l.buf[l.next];
  const bool queued = l.queued_item == &item && l.queued_first == first && l.queued_n == n;
  l.queued_item = nullptr;
  status s = queued ? status{} : queue_window(worker, item, first, n, buf);
  if (s.ok()) s = ws.reader->wait_all();
  const uint32_t after = first + n;
  if (s.ok() && after < item.chunk_end()) {  // the item's next window, into the other buffer
    const uint32_t m = std::min(window_, item.chunk_end() - after);
    s = queue_window(worker, item, after, m, l.buf[1 - l.next]);
    if (s.ok()) {
      l.queued_item = &item;
      l.queued_first = after;
      l.queued_n = m;
    }
  }
  if (!s.ok()) {
    (void)ws.reader->wait_all();  // no read may land in a buffer after this
    l.queued_item = nullptr;
    return s;
  }
  const uint64_t pair = 2 * uint64_t{ns_.geo.page_bytes};
  if (ns_.persist) {  // pages read from flash are checked before the kernel sees them
    const page_table& tab = *tables_[item.seq];
    const uint32_t h = item.kv_head_begin;
    for (uint32_t j = 0; j < n; ++j) {
      const uint32_t chunk = tab[first + j];
      if (ns_.resident(chunk)) continue;
      s = ns_.verify_page(chunk, h, buf + j * pair);
      if (s.ok()) s = ns_.verify_page(chunk, ns_.cfg.n_kv_heads + h, buf + j * pair + ns_.geo.page_bytes);
      if (!s.ok()) {
        (void)ws.reader->wait_all();
        l.queued_item = nullptr;
        return s;
      }
    }
  }
  for (uint32_t j = 0; j < n; ++j) ws.ptrs[j] = buf + j * pair;
  l.next = 1 - l.next;
  return chunk_window{ws.ptrs.data(), 0};
}

void page_chunk_source::release(uint32_t worker, const decode_work_item&, const chunk_window&) noexcept {
  lanes_[worker].cpu = thread_cpu_ns() - lanes_[worker].cpu0;
}

uint64_t page_chunk_source::cpu_ns() const noexcept {
  int64_t total = prepare_cpu_;
  for (const lane& l : lanes_) total += l.cpu;
  return static_cast<uint64_t>(std::max<int64_t>(total, 0));
}

}  // namespace instinfer::csd
