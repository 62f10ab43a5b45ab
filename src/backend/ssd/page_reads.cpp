#include "page_reads.hpp"

#include <algorithm>
#include <cstring>
#include <string>

namespace instinfer::ssd {

status page_reader::configure(ssd_io& io, const slot_allocator& slots, const group_buffers& buffers,
                              const chunk_sums* sums, const chunk_layout& layout, uint64_t max_read_bytes,
                              uint64_t merge_gap) {
  io_ = &io;
  sums_ = sums;
  slots_ = &slots;
  buffers_ = &buffers;
  layout_ = layout;
  max_read_bytes_ = max_read_bytes;
  merge_gap_ = merge_gap;
  auto h = io.add_handler(*this);
  if (!h.ok()) return h.error();
  handler_ = h.value();
  return {};
}

void page_reader::on_completion(const io::completion& c) noexcept {
  const uint64_t index = c.payload();
  if (index >= page_runs_.size()) return;  // a run of a call already returned
  auto& run = page_runs_[index];
  if (!run.done && pending_ > 0) --pending_;
  run.result = transfer_result(c);
  run.done = true;
}

status page_reader::validate(std::span<const page_read> reads, size_t& on_device) const noexcept {
  const uint32_t tpp = layout_.tokens(), n_pages = layout_.pages_per_chunk();
  if (reads.size() > UINT32_MAX) return {errc::kInvalidArgument, "read_pages: more than 2^32 reads in one batch"};
  const auto bad = [](size_t i, const std::string& why) -> status {
    return {errc::kInvalidArgument, "read_pages: read " + std::to_string(i) + ": " + why};
  };
  on_device = 0;
  for (size_t i = 0; i < reads.size(); ++i) {
    const auto& r = reads[i];
    if (!slots_->allocated(r.chunk)) return bad(i, "chunk " + std::to_string(r.chunk) + " is not allocated");
    if (!r.dst) return bad(i, "null destination");
    if (r.n_tokens > tpp)
      return bad(i, std::to_string(r.n_tokens) + " tokens exceed a chunk of " + std::to_string(tpp));
    if (r.page >= n_pages)
      return bad(
          i, "page " + std::to_string(r.page) + " >= " + std::to_string(n_pages) + " pages per chunk (2 x n_kv_heads)");
    on_device += buffers_->find(r.chunk) == nullptr;
  }
  return {};
}

void page_reader::plan_runs(std::span<const page_read> reads) noexcept {
  // Pages adjacent on the device (a chunk's K and V pages, or neighbouring chunks), or at most
  // merge_gap_ bytes apart, become one read of up to one request. O_DIRECT needs aligned ranges: a page smaller than
  // the device's alignment is read with its neighbours (a chunk is a multiple of it, so a page's aligned range never
  // leaves its chunk). Capacity was reserved for one run per page.
  std::sort(page_order_.begin(), page_order_.end(),
            [&](uint32_t a, uint32_t b) { return device_offset(reads[a]) < device_offset(reads[b]); });
  const uint64_t align = io_->file().offset_align, page_bytes = layout_.page.page_bytes;
  for (uint32_t j = 0; j < page_order_.size(); ++j) {
    const uint64_t off = device_offset(reads[page_order_[j]]);
    const uint64_t begin = off / align * align, end = (off + page_bytes + align - 1) / align * align;
    if (!page_runs_.empty()) {
      auto& run = page_runs_.back();
      const uint64_t run_end = run.offset + run.bytes;
      if (begin <= run_end + merge_gap_ && std::max(end, run_end) - run.offset <= max_read_bytes_) {
        run.bytes = static_cast<uint32_t>(std::max(end, run_end) - run.offset);
        ++run.count;
        continue;
      }
    }
    page_run run;
    run.offset = begin;
    run.bytes = static_cast<uint32_t>(end - begin);
    run.first = j;
    run.count = 1;
    page_runs_.push_back(run);
  }
}

uint32_t page_reader::place_round(uint32_t first) noexcept {
  // As many runs as the queue and the staging pool hold; returns the end of the round.
  const uint64_t pool_bytes = io_->staging_bytes();
  const uint64_t mem_align = std::max<uint64_t>(io_->file().mem_align, 1);
  const uint32_t depth = std::max<uint32_t>(io_->engine().queue_depth(), 1);
  const uint32_t n_runs = static_cast<uint32_t>(page_runs_.size());
  uint32_t end = first;
  uint64_t used = 0;
  while (end < n_runs && end - first < depth) {
    const uint64_t at = (used + mem_align - 1) / mem_align * mem_align;
    if (at + page_runs_[end].bytes > pool_bytes) break;  // a run is at most one request: the pool holds two
    page_runs_[end].staging = at;
    page_runs_[end].done = false;
    used = at + page_runs_[end].bytes;
    ++end;
  }
  return end;
}

status page_reader::read_round(std::span<const page_read> reads, uint32_t first, uint32_t end,
                               uint64_t& bytes_read) noexcept {
  std::byte* const pool = io_->staging();
  status failure;
  pending_ = 0;
  for (uint32_t r = first; r < end && failure.ok(); ++r) {
    failure = io_->queue(io::io_op::kRead, pool + page_runs_[r].staging, page_runs_[r].bytes, page_runs_[r].offset,
                         ssd_io::tag(handler_, r));
    if (failure.ok()) ++pending_;
  }
  if (failure.ok()) failure = io_->engine().submit();
  while (failure.ok() && pending_ > 0) failure = io_->reap();
  if (!failure.ok()) {
    io_->engine().drain();  // nothing of this round may land in the pool after we return
    return failure;
  }
  for (uint32_t r = first; r < end; ++r) {
    const auto& run = page_runs_[r];
    if (run.result < 0) {
      if (failure.ok())
        failure = result_status(run.result, "read_pages: reading " + std::to_string(run.bytes) + " bytes at offset " +
                                                std::to_string(run.offset) + " of '" + io_->path() + "'");
      continue;
    }
    bytes_read += run.bytes;
    for (uint32_t j = run.first; j < run.first + run.count; ++j) {
      const auto& page = reads[page_order_[j]];
      std::memcpy(page.dst, pool + run.staging + (device_offset(page) - run.offset), layout_.page.page_bytes);
      if (sums_ && failure.ok()) failure = sums_->verify_page(page.chunk, page.page, page.dst, io_->path());
    }
  }
  return failure;
}

status page_reader::read(std::span<const page_read> reads) noexcept {
  size_t on_device = 0;
  INSTINFER_TRY(validate(reads, on_device));
  try {
    page_order_.clear();
    page_order_.reserve(on_device);
    page_runs_.clear();
    page_runs_.reserve(on_device);
  } catch (...) {
    return {errc::kOutOfMemory, "read_pages: plan of " + std::to_string(on_device) + " page reads"};
  }

  // Chunks still in group buffers (tails, unwritten sealed chunks) come from host memory.
  const uint64_t page_bytes = layout_.page.page_bytes;
  for (uint32_t i = 0; i < reads.size(); ++i) {
    if (const std::byte* buffered = buffers_->find(reads[i].chunk))
      std::memcpy(reads[i].dst, buffered + reads[i].page * page_bytes, page_bytes);
    else
      page_order_.push_back(i);
  }
  if (page_order_.empty()) return {};

  io_->claim_staging();  // the staging pool is ours for this call
  plan_runs(reads);
  const uint32_t n_runs = static_cast<uint32_t>(page_runs_.size());
  uint64_t bytes_read = 0;
  status failure;
  for (uint32_t next = 0; next < n_runs && failure.ok();) {
    const uint32_t end = place_round(next);
    if (end == next) {
      failure = {errc::kInternal, "read_pages: a read of " + std::to_string(page_runs_[next].bytes) +
                                      " bytes does not fit the staging pool"};
      break;
    }
    failure = read_round(reads, next, end, bytes_read);
    next = end;
  }
  page_runs_.clear();  // stray completions must not match a later call's runs
  pending_ = 0;
  io_->bytes_read += bytes_read;
  return failure;
}

}  // namespace instinfer::ssd
