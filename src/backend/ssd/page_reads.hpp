// read_pages of the SSD backend: single pages of chunks (SparF's dual-step loading). Pages of
// buffered chunks are copied from host memory; the rest go out as one batch of direct reads
// (pages adjacent on the device merged into one read), in rounds that fit the queue depth and the
// staging pool. Reads complete through this component's own handler. Internal to src/backend/ssd.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "group_buffers.hpp"
#include "slot_allocator.hpp"
#include "ssd_io.hpp"

namespace instinfer::ssd {

class page_reader final : private io::completion_handler {
 public:
  page_reader() = default;
  page_reader(const page_reader&) = delete;
  page_reader& operator=(const page_reader&) = delete;

  // All three must outlive this; registers the read handler.
  // With `sums` (a persistent store) every page read from the device is checked against them.
  status configure(ssd_io& io, const slot_allocator& slots, const group_buffers& buffers, const chunk_sums* sums,
                   const chunk_layout& layout, uint64_t max_read_bytes);
  // Checks the whole batch first: an invalid read reads nothing.
  status read(std::span<const page_read> reads) noexcept;
  uint64_t memory_bytes() const noexcept {
    return page_order_.capacity() * sizeof(uint32_t) + page_runs_.capacity() * sizeof(page_run);
  }

 private:
  struct page_run {       // one device read covering adjacent pages
    uint64_t offset = 0;  // aligned device range [offset, offset + bytes)
    uint32_t bytes = 0;
    uint32_t first = 0;  // its pages: page_order_[first, first + count)
    uint32_t count = 0;
    uint64_t staging = 0;  // where it lands in the staging pool
    int32_t result = 0;
    bool done = false;
  };

  void on_completion(const io::completion& c) noexcept override;
  status validate(std::span<const page_read> reads, size_t& on_device) const noexcept;
  uint64_t device_offset(const page_read& r) const noexcept {
    return io_->chunk_offset(r.chunk) + r.page * layout_.page.page_bytes;
  }
  void plan_runs(std::span<const page_read> reads) noexcept;
  uint32_t place_round(uint32_t first) noexcept;
  status read_round(std::span<const page_read> reads, uint32_t first, uint32_t end, uint64_t& bytes_read) noexcept;

  ssd_io* io_ = nullptr;
  const slot_allocator* slots_ = nullptr;
  const group_buffers* buffers_ = nullptr;
  const chunk_sums* sums_ = nullptr;
  chunk_layout layout_{};
  uint64_t max_read_bytes_ = 0;
  uint32_t handler_ = 0;
  std::vector<uint32_t> page_order_;  // indices of the reads bound for the device, by device offset
  std::vector<page_run> page_runs_;
  uint32_t pending_ = 0;  // runs of the current round not yet completed
};

}  // namespace instinfer::ssd
