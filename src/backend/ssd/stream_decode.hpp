// Decode attention of the SSD backend, in two separate parts:
//
//   staging_ring        a chunk source. A batch's stored chunks are planned into requests of up
//                       to `request_chunks` contiguous slots, read into a ring of staging slots
//                       (the engine's staging pool) and handed out, in plan order, as each lands
//                       while later reads are in flight. Buffered chunks (tails, unwritten sealed
//                       chunks) are handed out first, straight from their group buffers.
//                       prefetch() starts the next layer's reads; open() adopts them when they are
//                       exactly the start of its plan.
//   decode_accumulator  the compute: the decode kernel per KV head over a run of chunks, partials
//                       merged by lse per query head, normalised at the end.
//
// stream_decode::attend() joins the two. A shared decode driver can take the ring as one of its
// chunk sources (open / next / abort) and bring its own compute. Internal to src/backend/ssd.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "group_buffers.hpp"
#include "instinfer/attention/decode.hpp"
#include "ssd_io.hpp"

namespace instinfer::ssd {

// Consecutive chunks of one batch item, in host memory and ready for compute.
struct chunk_run {
  uint32_t item = 0;      // index in the batch
  uint32_t position = 0;  // the first chunk's position in the item's page table
  std::span<const std::byte* const> chunks;
  uint32_t last_tokens = 0;  // tokens held by the run's last chunk
};

class staging_ring final : private io::completion_handler, private staging_holder {
 public:
  staging_ring() = default;
  staging_ring(const staging_ring&) = delete;
  staging_ring& operator=(const staging_ring&) = delete;

  // `io` and `buffers` must outlive this. The ring is n_slots requests of request_chunks chunks
  // at the start of the staging pool. Registers the read handler and holds the staging pool.
  status configure(ssd_io& io, const group_buffers& buffers, const chunk_layout& layout, uint32_t request_chunks,
                   uint32_t n_slots);

  // Start streaming `batch` (checked by the caller) of `layer`: plan, adopt the prefetch, issue.
  status open(uint32_t layer, const attend_batch& batch) noexcept;
  // The next run: buffered chunks first, then stored runs in plan order as they land (blocking).
  // The run stays valid until the next call; out.chunks empty: the batch is done.
  status next(chunk_run& out) noexcept;
  // Wait for (or drop) every read in flight and free the ring: after a failure, or before another
  // user of the staging pool.
  void abort() noexcept { cancel_prefetch(); }

  // Start reading `batch` (checked by the caller) for a later open() of `layer`.
  void prefetch(uint32_t layer, const attend_batch& batch) noexcept;
  void cancel_prefetch() noexcept;
  // A slot a prefetch may have read was released from another thread: never adopt it.
  void poison_prefetch() noexcept { prefetch_layer_ = kPoisoned; }

  uint32_t n_slots() const noexcept { return n_slots_; }
  uint64_t request_bytes() const noexcept { return uint64_t{request_chunks_} * chunk_bytes_; }
  uint64_t memory_bytes() const noexcept;

 private:
  struct read_request {
    uint32_t item = 0;      // index in the batch
    uint32_t position = 0;  // first chunk position in the item's page table
    uint32_t count = 0;     // chunks (contiguous slots)
    chunk_id first = kInvalidChunk;
  };
  struct ring_slot {
    int32_t result = 0;
    uint8_t state = 0;  // kSlotFree, kSlotInFlight, kSlotDone
  };
  static constexpr int64_t kNoPrefetch = -1, kPoisoned = -2;

  void on_completion(const io::completion& c) noexcept override;
  void release_staging() noexcept override { cancel_prefetch(); }
  status plan_reads(const attend_batch& batch, std::vector<read_request>& out) noexcept;
  status issue_reads(std::span<const read_request> plan, uint32_t& next) noexcept;
  bool adopt_prefetch(uint32_t layer) noexcept;
  bool any_in_flight() const noexcept;
  bool next_buffered(chunk_run& out) noexcept;
  status next_stored(chunk_run& out) noexcept;
  std::byte* slot_data(uint32_t slot) noexcept { return io_->staging() + uint64_t{slot} * request_bytes(); }

  ssd_io* io_ = nullptr;
  const group_buffers* buffers_ = nullptr;
  uint32_t tokens_per_chunk_ = 0;
  uint64_t chunk_bytes_ = 0;
  uint32_t request_chunks_ = 1;
  uint32_t n_slots_ = 0;
  uint32_t handler_ = 0;
  std::vector<ring_slot> slots_;
  std::vector<read_request> plan_;
  std::vector<read_request> prefetch_plan_;
  uint32_t prefetch_issued_ = 0;  // requests of prefetch_plan_ in the ring (slots 0..n-1)
  int64_t prefetch_layer_ = kNoPrefetch;

  // The open batch: where next() is.
  attend_batch batch_{};
  uint32_t issued_ = 0;         // requests of plan_ sent to the device
  uint32_t consumed_ = 0;       // requests of plan_ handed out and released
  bool holding_slot_ = false;   // the last run handed out is slot consumed_ % n_slots_
  uint32_t buffered_item_ = 0;  // the buffered-chunk walk
  uint32_t buffered_position_ = 0;
  const std::byte* buffered_chunk_ = nullptr;
  std::vector<const std::byte*> ptrs_;
};

class decode_accumulator {
 public:
  status configure(const backend_config& config, const chunk_layout& layout);
  // Zeroed partials for a batch of n_items.
  status reset(size_t n_items) noexcept;
  // Attend the item's query over a run of chunks and merge the partials in.
  void add(const chunk_run& run, const attend_item& item) noexcept;
  // Normalise and write out, lse, for every item.
  void finish(const attend_batch& batch) noexcept;

 private:
  decode_chunks_fn kernel_ = nullptr;
  decode_params params_{};
  uint32_t head_dim_ = 0;
  uint32_t n_q_heads_ = 0;
  uint32_t n_kv_heads_ = 0;
  std::vector<float> acc_o_;  // [item][n_q_heads][head_dim]
  std::vector<softmax_stats> acc_stats_;
  std::vector<float> tmp_o_;  // one KV head's group
  std::vector<softmax_stats> tmp_stats_;
};

class stream_decode {
 public:
  status configure(ssd_io& io, const group_buffers& buffers, const backend_config& config, const chunk_layout& layout,
                   uint32_t request_chunks, uint32_t n_slots);
  // `batch` is checked by the caller (page tables of allocated chunks, n_tokens, q and out set).
  status attend(uint32_t layer, const attend_batch& batch) noexcept;
  staging_ring& ring() noexcept { return ring_; }
  const staging_ring& ring() const noexcept { return ring_; }

 private:
  staging_ring ring_;
  decode_accumulator accumulator_;
};

}  // namespace instinfer::ssd
