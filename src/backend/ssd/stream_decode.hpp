// Decode attention of the SSD backend: the staging ring is a chunk source of the shared decode
// driver (attention/decode_driver.hpp), which runs the kernel, merges and normalises.
//
//   staging_ring   the chunk source. prepare() turns the driver's plan into windows of up to
//                  `request_chunks` chunks (the driver's window size) in plan order; each window
//                  with stored chunks takes the next ring ticket (slot = ticket % n_slots) and its
//                  stored chunks are read into that slot at their place in the window, one read
//                  per run of contiguous device slots; buffered chunks (tails, unwritten sealed
//                  chunks) are served from their group buffers. The first ring's worth goes out in
//                  prepare(); acquire() reaps until the window's slot has landed (later reads stay
//                  in flight, so compute overlaps I/O); release() frees the slot and issues more.
//                  prefetch() starts the next layer's reads; prepare() adopts them when they are
//                  exactly the start of its reads.
//   stream_decode  a one-worker decode driver over the ring, on the calling thread: the backend's
//                  single-issuer rule (one thread touches the engine) holds by construction.
// Internal to src/backend/ssd.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "group_buffers.hpp"
#include "instinfer/attention/decode_driver.hpp"
#include "ssd_io.hpp"

namespace instinfer::ssd {

class staging_ring final : private io::completion_handler, private staging_holder {
 public:
  staging_ring() = default;
  staging_ring(const staging_ring&) = delete;
  staging_ring& operator=(const staging_ring&) = delete;

  // `io` and `buffers` must outlive this. The ring is n_slots slots of request_chunks chunks at
  // the start of the staging pool. `prefetch_plan` plans a prefetched batch the way the driver
  // will (same options, so that its reads can be adopted). Registers the read handler and holds
  // the staging pool.
  // With `sums` (a persistent store) every chunk read from the device is checked before the
  // driver sees it.
  status configure(ssd_io& io, const group_buffers& buffers, const chunk_sums* sums, const chunk_layout& layout,
                   uint32_t request_chunks, uint32_t n_slots, const decode_plan_options& prefetch_plan);

  // The next prepare() serves `batch` (checked by the caller) of `layer`; null after the run.
  void bind(uint32_t layer, const attend_batch* batch) noexcept {
    layer_ = layer;
    batch_ = batch;
  }

  // chunk_source (one worker, windows in plan order).
  chunk_layout layout() const noexcept { return layout_; }
  uint32_t max_window_chunks() const noexcept { return request_chunks_; }
  status prepare(const decode_plan& plan, uint32_t n_workers) noexcept;
  result<chunk_window> acquire(uint32_t worker, const decode_work_item& item, uint32_t first, uint32_t n) noexcept;
  void release(uint32_t worker, const decode_work_item& item, const chunk_window& window) noexcept;

  // Wait for (or drop) every read in flight and free the ring: after a failure, or before another
  // user of the staging pool.
  void abort() noexcept { cancel_prefetch(); }

  // Start reading `batch` (checked by the caller) for a later attend of `layer`.
  void prefetch(uint32_t layer, const attend_batch& batch) noexcept;
  void cancel_prefetch() noexcept;
  // A slot a prefetch may have read was released from another thread: never adopt it.
  void poison_prefetch() noexcept { prefetch_layer_ = kPoisoned; }

  uint32_t n_slots() const noexcept { return n_slots_; }
  uint64_t request_bytes() const noexcept { return uint64_t{request_chunks_} * chunk_bytes_; }
  uint64_t memory_bytes() const noexcept;

 private:
  struct ring_window {      // one window the driver acquires, in plan order
    uint32_t seq = 0;       // the item's sequence (index in the batch)
    uint32_t first = 0;     // first chunk position in the sequence's page table
    uint32_t count = 0;     // chunks
    uint32_t ticket = 0;    // ring ticket (slot = ticket % n_slots), if it reads anything
    uint32_t end_read = 0;  // reads [.., end_read) are this window's and earlier ones'
    uint32_t stored = 0;    // chunks read from the device (0: all buffered, no ticket)
  };
  struct read_run {  // contiguous device slots into one ring slot
    chunk_id first = kInvalidChunk;
    uint32_t count = 0;
    uint32_t offset = 0;  // chunk index in the slot
    uint32_t ticket = 0;
    bool operator==(const read_run&) const noexcept = default;
  };
  struct ring_plan {
    std::vector<ring_window> windows;
    std::vector<read_run> reads;
  };
  struct ring_slot {
    uint32_t pending = 0;  // reads in flight
    int32_t result = 0;    // first failed read's result (< 0), else 0
  };
  static constexpr int64_t kNoPrefetch = -1, kPoisoned = -2;

  void on_completion(const io::completion& c) noexcept override;
  void release_staging() noexcept override { cancel_prefetch(); }
  status plan_windows(std::span<const decode_work_item> items, const attend_batch& batch, ring_plan& out) noexcept;
  status issue_reads(std::span<const read_run> reads) noexcept;
  status wait_landed(const ring_window& w) noexcept;
  bool adopt_prefetch() const noexcept;
  std::byte* slot_data(uint32_t ticket) noexcept {
    return io_->staging() + uint64_t{ticket % n_slots_} * request_bytes();
  }

  ssd_io* io_ = nullptr;
  const group_buffers* buffers_ = nullptr;
  const chunk_sums* sums_ = nullptr;
  chunk_layout layout_{};
  uint64_t chunk_bytes_ = 0;
  uint32_t request_chunks_ = 1;
  uint32_t n_slots_ = 0;
  uint32_t handler_ = 0;
  decode_plan_options prefetch_options_{};
  std::vector<ring_slot> slots_;
  uint32_t in_flight_ = 0;                     // reads sent and not completed
  std::vector<const std::byte*> window_ptrs_;  // the acquired window's chunks

  // The reads of the ring: plan_ while a run is open, prefetch_ after a prefetch.
  ring_plan plan_;
  ring_plan prefetch_;
  decode_plan prefetch_items_;
  uint32_t issued_ = 0;    // reads of the current plan sent to the device
  uint32_t released_ = 0;  // tickets handed out and released
  uint32_t cursor_ = 0;    // the next window acquire() serves
  int64_t prefetch_layer_ = kNoPrefetch;
  status failure_;  // a release() that could not issue: returned by the next acquire()

  uint32_t layer_ = 0;
  const attend_batch* batch_ = nullptr;
};

class stream_decode {
 public:
  status configure(ssd_io& io, const group_buffers& buffers, const chunk_sums* sums, const backend_config& config,
                   const chunk_layout& layout, uint32_t request_chunks, uint32_t n_slots);
  // `batch` is checked by the caller (page tables of allocated chunks, n_tokens, q and out set).
  status attend(uint32_t layer, const attend_batch& batch) noexcept;
  staging_ring& ring() noexcept { return ring_; }
  const staging_ring& ring() const noexcept { return ring_; }

 private:
  staging_ring ring_;
  std::unique_ptr<decode_driver> driver_;
  std::vector<decode_sequence> sequences_;  // grows to the largest batch seen
};

}  // namespace instinfer::ssd
