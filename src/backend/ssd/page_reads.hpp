// read_pages of the SSD backend: single pages of chunks (sparse decode's page loads). Pages of
// buffered chunks are copied from host memory; the rest go out as one batch of direct reads, in
// rounds that fit the queue depth and the staging pool. Pages closer on the device than the merge
// gap become one read (the gap is read and dropped): a separate request costs about 1 / IOPS
// seconds, a gap of G bytes G / bandwidth, so merging across gaps up to bandwidth / IOPS bytes
// never costs more than the separate reads, and a batch never costs more than reading its span.
// Reads complete through this component's own handler. Internal to src/backend/ssd.
#pragma once

#include <algorithm>
#include <cstdint>
#include <span>
#include <vector>

#include "group_buffers.hpp"
#include "instinfer/io/device_probe.hpp"
#include "slot_allocator.hpp"
#include "ssd_io.hpp"

namespace instinfer::ssd {

// A device's random-read rate and sequential bandwidth.
struct read_costs {
  double reads_per_s = 0;
  double bytes_per_s = 0;
};

// The probe measures no rates, so they are modelled from what it reports (kind, rotational):
// NVMe 500k reads/s at 3 GB/s; other non-rotational devices and files 80k reads/s at 0.5 GB/s
// (fio's 4 KiB random reads at queue depth 32 on this project's virtio disk, and the low end of its
// sequential rate, 0.45-2.7 GB/s from run to run, docs/benchmarks.md: a gap below the break-even
// only forgoes a saving, one above it costs); rotational 200 reads/s at 150 MB/s. No probe: the
// middle one.
// virtio disks ("vd*") report rotational whatever backs them (this project's is flash: 80k
// reads/s), so their flag is not believed. read_gap= in the URI overrides the model.
inline read_costs modelled_read_costs(const device_probe_result* probe) noexcept {
  if (probe && probe->kind == storage_kind::kNvme) return {500e3, 3e9};
  if (probe && probe->rotational && probe->block_device.rfind("vd", 0) != 0) return {200, 150e6};
  return {80e3, 0.5e9};
}

// The largest gap worth reading through: bandwidth / IOPS bytes, whole 4 KiB pages, at most 1 MiB.
inline uint64_t merge_gap_bytes(read_costs c) noexcept {
  if (!(c.reads_per_s > 0) || !(c.bytes_per_s > 0)) return 0;
  const double gap = std::min(c.bytes_per_s / c.reads_per_s, double(1 << 20));
  return static_cast<uint64_t>(gap) / 4096 * 4096;
}

class page_reader final : private io::completion_handler {
 public:
  page_reader() = default;
  page_reader(const page_reader&) = delete;
  page_reader& operator=(const page_reader&) = delete;

  // All three must outlive this; registers the read handler.
  // With `sums` (a persistent store) every page read from the device is checked against them.
  // merge_gap: pages at most this many bytes apart on the device share a read.
  status configure(ssd_io& io, const slot_allocator& slots, const group_buffers& buffers, const chunk_sums* sums,
                   const chunk_layout& layout, uint64_t max_read_bytes, uint64_t merge_gap = 0);
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
  uint64_t merge_gap_ = 0;
  uint32_t handler_ = 0;
  std::vector<uint32_t> page_order_;  // indices of the reads bound for the device, by device offset
  std::vector<page_run> page_runs_;
  uint32_t pending_ = 0;  // runs of the current round not yet completed
};

}  // namespace instinfer::ssd
