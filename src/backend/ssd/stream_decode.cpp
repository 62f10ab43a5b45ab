#include "stream_decode.hpp"

#include <algorithm>
#include <cstring>
#include <string>

#include "instinfer/attention/state.hpp"

namespace instinfer::ssd {

namespace {
constexpr uint8_t kSlotFree = 0, kSlotInFlight = 1, kSlotDone = 2;

// Tokens held by chunk `position` of an item: full chunks, except a partial last one.
uint32_t chunk_tokens(const attend_item& it, uint32_t position, uint32_t tokens_per_chunk) noexcept {
  const uint32_t n_chunks = static_cast<uint32_t>(it.chunks.size());
  return position + 1 == n_chunks ? it.n_tokens - (n_chunks - 1) * tokens_per_chunk : tokens_per_chunk;
}
}  // namespace

// ---- staging ring: configuration and completions ---------------------------------------------

status staging_ring::configure(ssd_io& io, const group_buffers& buffers, const chunk_layout& layout,
                               uint32_t request_chunks, uint32_t n_slots) {
  if (request_chunks == 0 || n_slots == 0) return {errc::kInvalidArgument, "ssd staging ring: empty ring"};
  io_ = &io;
  buffers_ = &buffers;
  tokens_per_chunk_ = layout.tokens();
  chunk_bytes_ = layout.chunk_bytes();
  request_chunks_ = request_chunks;
  n_slots_ = n_slots;
  if (uint64_t{n_slots} * request_bytes() > io.staging_bytes())
    return {errc::kInternal, "ssd staging ring: " + std::to_string(n_slots) + " slots do not fit the staging pool"};
  slots_.assign(n_slots_, ring_slot{});
  ptrs_.reserve(64);
  auto h = io.add_handler(*this);
  if (!h.ok()) return h.error();
  handler_ = h.value();
  io.set_staging_holder(this);
  return {};
}

void staging_ring::on_completion(const io::completion& c) noexcept {
  const uint64_t slot = c.payload();
  if (slot >= slots_.size()) return;
  slots_[slot].result = transfer_result(c);
  slots_[slot].state = kSlotDone;
}

uint64_t staging_ring::memory_bytes() const noexcept {
  return uint64_t{n_slots_} * request_bytes() + plan_.capacity() * sizeof(read_request) +
         prefetch_plan_.capacity() * sizeof(read_request);
}

bool staging_ring::any_in_flight() const noexcept {
  for (const auto& s : slots_)
    if (s.state == kSlotInFlight) return true;
  return false;
}

// ---- staging ring: planning, issuing, prefetch -----------------------------------------------

status staging_ring::plan_reads(const attend_batch& batch, std::vector<read_request>& out) noexcept {
  // Runs of contiguous stored slots of one item, at most request_chunks_ long; buffered chunks
  // (tails, unwritten sealed chunks) are not read. Two passes: count, reserve exactly, fill.
  const auto walk = [&](auto&& emit) {
    for (uint32_t b = 0; b < batch.size(); ++b) {
      const auto& it = batch[b];
      read_request cur{};
      for (uint32_t i = 0; i < it.chunks.size(); ++i) {
        const chunk_id id = it.chunks[i];
        const bool buffered = buffers_->find(id) != nullptr;
        if (cur.count && !buffered && id == cur.first + cur.count && cur.count < request_chunks_) {
          ++cur.count;
          continue;
        }
        if (cur.count) emit(cur);
        cur = buffered ? read_request{} : read_request{b, i, 1, id};
      }
      if (cur.count) emit(cur);
    }
  };
  size_t n = 0;
  walk([&](const read_request&) { ++n; });
  out.clear();
  try {
    out.reserve(n);
  } catch (...) {
    return {errc::kOutOfMemory, "attend: read plan of " + std::to_string(n) + " requests"};
  }
  walk([&](const read_request& r) { out.push_back(r); });
  return {};
}

status staging_ring::issue_reads(std::span<const read_request> plan, uint32_t& next) noexcept {
  // The ring's request r uses slot r % n_slots; r may go out once r - n_slots has been consumed.
  const uint32_t depth = std::min(n_slots_, io_->engine().queue_depth());
  uint32_t reads_in_flight = 0;
  for (const auto& s : slots_) reads_in_flight += s.state == kSlotInFlight;
  bool queued = false;
  while (next < plan.size() && reads_in_flight < depth) {
    const uint32_t slot = next % n_slots_;
    if (slots_[slot].state != kSlotFree) break;
    const auto& r = plan[next];
    INSTINFER_TRY(io_->queue(io::io_op::kRead, slot_data(slot), static_cast<uint32_t>(r.count * chunk_bytes_),
                             io_->chunk_offset(r.first), ssd_io::tag(handler_, slot)));
    slots_[slot].state = kSlotInFlight;
    ++reads_in_flight;
    ++next;
    queued = true;
  }
  if (queued) return io_->engine().submit();
  return {};
}

void staging_ring::cancel_prefetch() noexcept {
  while (any_in_flight()) {
    if (!io_->reap().ok()) {
      io_->engine().drain();
      break;
    }
  }
  for (auto& s : slots_) s.state = kSlotFree;
  prefetch_issued_ = 0;
  prefetch_layer_ = kNoPrefetch;
  holding_slot_ = false;
}

void staging_ring::prefetch(uint32_t layer, const attend_batch& batch) noexcept {
  cancel_prefetch();
  if (!plan_reads(batch, prefetch_plan_).ok()) return;
  uint32_t next = 0;
  const auto window =
      std::span<const read_request>(prefetch_plan_)
          .first(std::min<size_t>(prefetch_plan_.size(), std::min(n_slots_, io_->engine().queue_depth())));
  if (!issue_reads(window, next).ok()) {
    cancel_prefetch();
    return;
  }
  prefetch_issued_ = next;
  prefetch_layer_ = layer;
}

bool staging_ring::adopt_prefetch(uint32_t layer) noexcept {
  // Only when the prefetch read exactly the start of this plan: its requests are slots 0..n-1.
  bool match = prefetch_layer_ == static_cast<int64_t>(layer) && prefetch_issued_ <= plan_.size();
  for (uint32_t i = 0; match && i < prefetch_issued_; ++i)
    match = plan_[i].first == prefetch_plan_[i].first && plan_[i].count == prefetch_plan_[i].count;
  if (!match) return false;
  issued_ = prefetch_issued_;
  prefetch_issued_ = 0;
  prefetch_layer_ = kNoPrefetch;
  return true;
}

// ---- staging ring: the chunk source ----------------------------------------------------------

status staging_ring::open(uint32_t layer, const attend_batch& batch) noexcept {
  batch_ = batch;
  issued_ = 0;
  consumed_ = 0;
  holding_slot_ = false;
  buffered_item_ = buffers_->empty() ? static_cast<uint32_t>(batch.size()) : 0;
  buffered_position_ = 0;
  INSTINFER_TRY(plan_reads(batch, plan_));
  if (prefetch_issued_ > 0 && !adopt_prefetch(layer)) cancel_prefetch();
  return issue_reads(plan_, issued_);
}

bool staging_ring::next_buffered(chunk_run& out) noexcept {
  // Tails and unwritten sealed chunks come from host memory while the reads fly.
  for (; buffered_item_ < batch_.size(); ++buffered_item_, buffered_position_ = 0) {
    const auto& it = batch_[buffered_item_];
    while (buffered_position_ < it.chunks.size()) {
      const uint32_t position = buffered_position_++;
      buffered_chunk_ = buffers_->find(it.chunks[position]);
      if (!buffered_chunk_) continue;
      out.item = buffered_item_;
      out.position = position;
      out.chunks = std::span<const std::byte* const>(&buffered_chunk_, 1);
      out.last_tokens = chunk_tokens(it, position, tokens_per_chunk_);
      return true;
    }
  }
  return false;
}

status staging_ring::next_stored(chunk_run& out) noexcept {
  if (holding_slot_) {  // the previous run is consumed: its slot takes a later read
    slots_[consumed_ % n_slots_].state = kSlotFree;
    holding_slot_ = false;
    ++consumed_;
    INSTINFER_TRY(issue_reads(plan_, issued_));
  }
  if (consumed_ >= plan_.size()) return {};
  const uint32_t slot = consumed_ % n_slots_;
  while (slots_[slot].state == kSlotInFlight) INSTINFER_TRY(io_->reap());
  const auto& r = plan_[consumed_];
  if (slots_[slot].result < 0)
    return result_status(slots_[slot].result, "attend: reading chunks " + std::to_string(r.first) + ".." +
                                                  std::to_string(r.first + r.count - 1) + " of '" + io_->path() + "'");
  try {
    ptrs_.resize(r.count);
  } catch (...) {
    return {errc::kOutOfMemory, "attend: chunk pointers"};
  }
  const std::byte* base = slot_data(slot);
  for (uint32_t j = 0; j < r.count; ++j) ptrs_[j] = base + uint64_t{j} * chunk_bytes_;
  out.item = r.item;
  out.position = r.position;
  out.chunks = std::span<const std::byte* const>(ptrs_.data(), r.count);
  out.last_tokens = chunk_tokens(batch_[r.item], r.position + r.count - 1, tokens_per_chunk_);
  holding_slot_ = true;
  io_->bytes_read += r.count * chunk_bytes_;
  return {};
}

status staging_ring::next(chunk_run& out) noexcept {
  out = {};
  if (next_buffered(out)) return {};
  return next_stored(out);
}

// ---- compute: the decode kernel per KV head, partials merged by lse --------------------------

status decode_accumulator::configure(const backend_config& config, const chunk_layout& layout) {
  params_.layout = layout;
  params_.group_size = config.shape.group_size();
  params_.scale = config.scale;
  params_.softcap = config.softcap;
  INSTINFER_TRY(params_.validate());
  auto k = select_decode_kernel(best_cpu_isa(), params_);
  if (!k.ok()) return k.error();
  kernel_ = k.value();
  head_dim_ = config.shape.head_dim;
  n_q_heads_ = config.shape.n_q_heads;
  n_kv_heads_ = layout.n_kv_heads;
  tmp_o_.assign(size_t{params_.group_size} * head_dim_, 0.0f);
  tmp_stats_.assign(params_.group_size, softmax_stats{});
  return {};
}

status decode_accumulator::reset(size_t n_items) noexcept {
  try {
    acc_o_.resize(n_items * n_q_heads_ * size_t{head_dim_});
    acc_stats_.resize(n_items * n_q_heads_);
  } catch (...) {
    return {errc::kOutOfMemory, "attend: workspace for a batch of " + std::to_string(n_items)};
  }
  std::fill(acc_o_.begin(), acc_o_.end(), 0.0f);
  std::fill(acc_stats_.begin(), acc_stats_.end(), softmax_stats{});
  return {};
}

void decode_accumulator::add(const chunk_run& run, const attend_item& it) noexcept {
  const uint32_t g = params_.group_size, d = head_dim_;
  const auto count = static_cast<uint32_t>(run.chunks.size());
  for (uint32_t h = 0; h < n_kv_heads_; ++h) {
    kernel_(params_, run.chunks.data(), count, run.last_tokens, h, it.q + size_t{h} * g * d, tmp_o_.data(),
            tmp_stats_.data());
    for (uint32_t j = 0; j < g; ++j) {
      const size_t qh = size_t{run.item} * n_q_heads_ + h * g + j;
      merge_state(acc_stats_[qh], acc_o_.data() + qh * d, tmp_stats_[j], tmp_o_.data() + size_t{j} * d, d);
    }
  }
}

void decode_accumulator::finish(const attend_batch& batch) noexcept {
  const uint32_t d = head_dim_;
  for (uint32_t b = 0; b < batch.size(); ++b) {
    const auto& it = batch[b];
    for (uint32_t h = 0; h < n_q_heads_; ++h) {
      const size_t qh = size_t{b} * n_q_heads_ + h;
      float* o = acc_o_.data() + qh * d;
      normalize_state(acc_stats_[qh], o, d);
      std::memcpy(it.out + size_t{h} * d, o, size_t{d} * sizeof(float));
      if (it.lse) it.lse[h] = state_lse(acc_stats_[qh]);
    }
  }
}

// ---- the two joined --------------------------------------------------------------------------

status stream_decode::configure(ssd_io& io, const group_buffers& buffers, const backend_config& config,
                                const chunk_layout& layout, uint32_t request_chunks, uint32_t n_slots) {
  INSTINFER_TRY(accumulator_.configure(config, layout));
  return ring_.configure(io, buffers, layout, request_chunks, n_slots);
}

status stream_decode::attend(uint32_t layer, const attend_batch& batch) noexcept {
  status failure = accumulator_.reset(batch.size());
  if (failure.ok()) failure = ring_.open(layer, batch);
  chunk_run run;
  while (failure.ok()) {
    failure = ring_.next(run);
    if (!failure.ok() || run.chunks.empty()) break;
    accumulator_.add(run, batch[run.item]);
  }
  if (!failure.ok()) {
    ring_.abort();  // waits for this call's reads too
    return failure;
  }
  accumulator_.finish(batch);
  return {};
}

}  // namespace instinfer::ssd
