#include "stream_decode.hpp"

#include <algorithm>
#include <string>

namespace instinfer::ssd {

namespace {
// Split only when it helps load balance (never, with one worker; the driver's defaults).
constexpr uint32_t kItemsPerWorker = 4;
constexpr uint32_t kMinItemTokens = 512;

decode_sequence_shape shape_of(const attend_item& it) noexcept {
  return {static_cast<uint32_t>(it.chunks.size()), it.n_tokens};
}
}  // namespace

// ---- staging ring: configuration and completions ---------------------------------------------

status staging_ring::configure(ssd_io& io, const group_buffers& buffers, const chunk_sums* sums,
                               const chunk_layout& layout, uint32_t request_chunks, uint32_t n_slots,
                               const decode_plan_options& prefetch_plan) {
  if (request_chunks == 0 || n_slots == 0) return {errc::kInvalidArgument, "ssd staging ring: empty ring"};
  io_ = &io;
  buffers_ = &buffers;
  sums_ = sums;
  layout_ = layout;
  chunk_bytes_ = layout.chunk_bytes();
  request_chunks_ = request_chunks;
  n_slots_ = n_slots;
  prefetch_options_ = prefetch_plan;
  if (uint64_t{n_slots} * request_bytes() > io.staging_bytes())
    return {errc::kInternal, "ssd staging ring: " + std::to_string(n_slots) + " slots do not fit the staging pool"};
  slots_.assign(n_slots_, ring_slot{});
  window_ptrs_.assign(request_chunks_, nullptr);
  auto h = io.add_handler(*this);
  if (!h.ok()) return h.error();
  handler_ = h.value();
  io.set_staging_holder(this);
  return {};
}

void staging_ring::on_completion(const io::completion& c) noexcept {
  const uint64_t slot = c.payload();
  if (slot >= slots_.size() || slots_[slot].pending == 0) return;
  ring_slot& s = slots_[slot];
  const int32_t res = transfer_result(c);
  if (res < 0 && s.result == 0) s.result = res;
  --s.pending;
  --in_flight_;
}

uint64_t staging_ring::memory_bytes() const noexcept {
  const auto plan_bytes = [](const ring_plan& p) {
    return p.windows.capacity() * sizeof(ring_window) + p.reads.capacity() * sizeof(read_run);
  };
  return uint64_t{n_slots_} * request_bytes() + plan_bytes(plan_) + plan_bytes(prefetch_) +
         window_ptrs_.capacity() * sizeof(const std::byte*) + prefetch_items_.items().size() * sizeof(decode_work_item);
}

// ---- staging ring: planning and issuing ------------------------------------------------------

status staging_ring::plan_windows(std::span<const decode_work_item> items, const attend_batch& batch,
                                  ring_plan& out) noexcept {
  // The driver's windows: each item's chunks from chunk_begin in steps of request_chunks_. A
  // window's stored chunks are read into its slot at their place in the window, one read per run
  // of contiguous device slots; its buffered chunks are served from their group buffers.
  try {
    out.windows.clear();
    out.reads.clear();
    uint32_t ticket = 0;
    for (const decode_work_item& item : items) {
      const attend_item& it = batch[item.seq];
      for (uint32_t c = item.chunk_begin; c < item.chunk_end(); c += request_chunks_) {
        ring_window w{item.seq, c, std::min(request_chunks_, item.chunk_end() - c), ticket, 0, 0};
        for (uint32_t j = 0; j < w.count; ++j) {
          const chunk_id id = it.chunks[c + j];
          if (buffers_->find(id) != nullptr) continue;
          ++w.stored;
          read_run* last = out.reads.empty() ? nullptr : &out.reads.back();
          if (last != nullptr && last->ticket == ticket && last->offset + last->count == j &&
              last->first + last->count == id) {
            ++last->count;
          } else {
            out.reads.push_back({id, 1, j, ticket});
          }
        }
        w.end_read = static_cast<uint32_t>(out.reads.size());
        ticket += w.stored > 0;
        out.windows.push_back(w);
      }
    }
  } catch (const std::bad_alloc&) {
    return {errc::kOutOfMemory, "attend: read plan of a batch of " + std::to_string(batch.size())};
  }
  return {};
}

status staging_ring::issue_reads(std::span<const read_run> reads) noexcept {
  // Ticket t may read into slot t % n_slots once ticket t - n_slots has been released.
  const uint32_t depth = io_->engine().queue_depth();
  bool queued = false;
  status failure;
  while (issued_ < reads.size() && in_flight_ < depth) {
    const read_run& r = reads[issued_];
    if (r.ticket >= released_ + n_slots_) break;
    const uint32_t slot = r.ticket % n_slots_;
    failure = io_->queue(io::io_op::kRead, slot_data(r.ticket) + uint64_t{r.offset} * chunk_bytes_,
                         static_cast<uint32_t>(r.count * chunk_bytes_), io_->chunk_offset(r.first),
                         ssd_io::tag(handler_, slot));
    if (!failure.ok()) break;
    ++slots_[slot].pending;
    ++in_flight_;
    ++issued_;
    queued = true;
  }
  if (queued) {
    status submitted = io_->engine().submit();
    if (failure.ok()) failure = std::move(submitted);
  }
  return failure;
}

status staging_ring::wait_landed(const ring_window& w) noexcept {
  const ring_slot& s = slots_[w.ticket % n_slots_];
  for (;;) {
    INSTINFER_TRY(issue_reads(plan_.reads));
    if (issued_ >= w.end_read && s.pending == 0) break;
    if (in_flight_ == 0) return {errc::kInternal, "ssd staging ring: a window's reads cannot be issued"};
    INSTINFER_TRY(io_->reap());
  }
  if (s.result < 0)
    return result_status(s.result, "attend: reading chunks [" + std::to_string(w.first) + ", " +
                                       std::to_string(w.first + w.count) + ") of batch item " + std::to_string(w.seq) +
                                       " from '" + io_->path() + "'");
  return {};
}

// ---- staging ring: prefetch ------------------------------------------------------------------

void staging_ring::cancel_prefetch() noexcept {
  while (in_flight_ > 0) {
    if (!io_->reap().ok()) {
      io_->engine().drain();
      break;
    }
  }
  std::fill(slots_.begin(), slots_.end(), ring_slot{});
  in_flight_ = 0;
  issued_ = 0;
  released_ = 0;
  cursor_ = 0;
  prefetch_layer_ = kNoPrefetch;
  failure_ = {};
}

void staging_ring::prefetch(uint32_t layer, const attend_batch& batch) noexcept {
  cancel_prefetch();
  const auto shape = [&batch](uint32_t s) noexcept { return shape_of(batch[s]); };
  if (!prefetch_items_.build(static_cast<uint32_t>(batch.size()), shape, prefetch_options_).ok()) return;
  if (!plan_windows(prefetch_items_.items(), batch, prefetch_).ok()) return;
  if (!issue_reads(prefetch_.reads).ok()) {
    cancel_prefetch();
    return;
  }
  prefetch_layer_ = layer;
}

bool staging_ring::adopt_prefetch() const noexcept {
  // Only when the prefetch read exactly the start of this plan (same chunks, slots and places).
  if (prefetch_layer_ != static_cast<int64_t>(layer_) || issued_ > plan_.reads.size() ||
      issued_ > prefetch_.reads.size())
    return false;
  return std::equal(prefetch_.reads.begin(), prefetch_.reads.begin() + issued_, plan_.reads.begin());
}

// ---- staging ring: the chunk source ----------------------------------------------------------

status staging_ring::prepare(const decode_plan& plan, uint32_t n_workers) noexcept {
  if (n_workers != 1 || batch_ == nullptr)
    return {errc::kInternal, "ssd staging ring: serves one worker, windows in plan order"};
  const bool had_prefetch = prefetch_layer_ != kNoPrefetch;
  status planned = plan_windows(plan.items(), *batch_, plan_);
  if (!planned.ok() || !had_prefetch || !adopt_prefetch())
    cancel_prefetch();
  else
    io_->prefetched_requests += issued_;
  INSTINFER_TRY(std::move(planned));
  prefetch_layer_ = kNoPrefetch;
  cursor_ = 0;
  released_ = 0;
  return issue_reads(plan_.reads);
}

result<chunk_window> staging_ring::acquire(uint32_t, const decode_work_item& item, uint32_t first,
                                           uint32_t n) noexcept {
  if (!failure_.ok()) return std::move(failure_);
  if (cursor_ >= plan_.windows.size() || plan_.windows[cursor_].seq != item.seq ||
      plan_.windows[cursor_].first != first || plan_.windows[cursor_].count != n)
    return status{errc::kInternal, "ssd staging ring: a window out of plan order"};
  const ring_window& w = plan_.windows[cursor_];
  if (w.stored > 0) {
    INSTINFER_TRY(wait_landed(w));
    io_->bytes_read += uint64_t{w.stored} * chunk_bytes_;
  }
  // Group buffers change only in calls (their completions just mark writes done), so the chunks
  // buffered now are the ones the plan did not read; the others are at their place in the slot.
  const std::byte* base = slot_data(w.ticket);
  const attend_item& it = (*batch_)[w.seq];
  for (uint32_t j = 0; j < w.count; ++j) {
    const chunk_id id = it.chunks[w.first + j];
    const std::byte* buffered = buffers_->find(id);
    window_ptrs_[j] = buffered != nullptr ? buffered : base + uint64_t{j} * chunk_bytes_;
    if (buffered == nullptr && sums_ != nullptr) INSTINFER_TRY(sums_->verify_chunk(id, window_ptrs_[j], io_->path()));
  }
  return chunk_window{window_ptrs_.data(), item.kv_head_begin};
}

void staging_ring::release(uint32_t, const decode_work_item&, const chunk_window&) noexcept {
  if (cursor_ >= plan_.windows.size()) return;
  const ring_window& w = plan_.windows[cursor_++];
  if (w.stored == 0) return;
  slots_[w.ticket % n_slots_] = ring_slot{};
  ++released_;
  if (status s = issue_reads(plan_.reads); !s.ok() && failure_.ok()) failure_ = std::move(s);
}

// ---- the driver over the ring ----------------------------------------------------------------

status stream_decode::configure(ssd_io& io, const group_buffers& buffers, const chunk_sums* sums,
                                const backend_config& config, const chunk_layout& layout, uint32_t request_chunks,
                                uint32_t n_slots) {
  decode_params params;
  params.layout = layout;
  params.group_size = config.shape.group_size();
  params.scale = config.scale;
  params.softcap = config.softcap;
  params.int8_query_dot = config.int8_query_dot;
  auto kernel = select_decode_heads_kernel(best_cpu_isa(), params);  // validates params
  if (!kernel.ok()) return kernel.error();
  decode_driver_options options;
  options.n_threads = 1;  // the calling thread: the only one that touches the engine
  options.items_per_worker = kItemsPerWorker;
  options.min_item_tokens = kMinItemTokens;
  options.kv_heads_per_item = 0;  // every kv head: one sweep per chunk
  auto driver = decode_driver::create(params, kernel.value(), options);
  if (!driver.ok()) return driver.error();
  auto rows = select_decode_rows_kernel(best_cpu_isa(), params);
  if (rows.ok()) driver.value()->set_rows_kernel(rows.value());
  driver_ = std::move(driver).value();
  const decode_plan_options plan{layout.tokens(),          layout.n_kv_heads,       options.n_threads,
                                 options.items_per_worker, options.min_item_tokens, options.kv_heads_per_item};
  return ring_.configure(io, buffers, sums, layout, request_chunks, n_slots, plan);
}

status stream_decode::attend(uint32_t layer, const attend_batch& batch) noexcept {
  try {
    if (sequences_.size() < batch.size()) sequences_.resize(batch.size());
  } catch (const std::bad_alloc&) {
    ring_.abort();
    return {errc::kOutOfMemory, "attend: workspace for a batch of " + std::to_string(batch.size())};
  }
  for (uint32_t b = 0; b < batch.size(); ++b) {
    const attend_item& it = batch[b];
    sequences_[b] = {
        static_cast<uint32_t>(it.chunks.size()), it.n_tokens, it.q, it.out, it.lse, it.n_rows, it.first_pos};
  }
  ring_.bind(layer, &batch);
  status s = driver_->run(std::span<const decode_sequence>(sequences_.data(), batch.size()), ring_);
  ring_.bind(layer, nullptr);
  if (!s.ok()) ring_.abort();  // waits for this call's reads too
  return s;
}

}  // namespace instinfer::ssd
