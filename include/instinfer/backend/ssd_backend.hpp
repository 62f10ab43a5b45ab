// The SSD backend: KV chunks in a file or block device, read and written from user space with
// io_uring and O_DIRECT (no page cache), attention on the host over a bounded staging ring.
//
// Storage: chunk slot i lives at byte offset i * chunk_bytes. Slots are handed out per
// (sequence, layer) stream from extents, so one layer's chunks of a sequence are contiguous on
// the device and a decode step reads them with few large requests.
//
// Writes (the paper's flash-aware KV management): a chunk that is still filling (the tail) lives
// in a host-memory group buffer and reaches storage only when it is sealed (full), in batches of
// up to `write_batch` chunks, or on flush(). A sealed chunk is never written again. A chunk whose
// write failed stays in its buffer (readable, retried by the next batch): nothing is lost.
//
// Decode: a batch's stored chunks are planned into requests of up to `request` bytes (runs of
// contiguous slots), submitted together and streamed through the staging ring; the decode kernel
// consumes each request as it lands while later reads are in flight, and partials merge by lse.
// Tails come straight from their group buffers. prefetch(layer) starts the next layer's reads.
//
// Compute runs on the calling thread (the decode kernel is far faster than the device here);
// backend_config::n_threads is not used.
//
// Host memory: staging ring + group buffers (one per open tail, plus at most write_batch sealed
// ones) + page-table-sized metadata; it does not grow with context length.
//
// URI: "ssd:PATH?queue_depth=32&staging=8M&request=256K&capacity=16G&write_batch=32&buffered=1
//       &sqpoll=1&iopoll=1&single_issuer=0&register=0&preallocate=1&keep=1"
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include <sys/uio.h>

#include "instinfer/attention/decode.hpp"
#include "instinfer/backend/backend.hpp"
#include "instinfer/backend/uri.hpp"

namespace instinfer {

namespace io {
class uring_engine;
struct storage_file;
}  // namespace io

struct ssd_backend_options {
  std::string path;                       // file (created if missing) or block device
  uint32_t queue_depth = 32;              // requests in flight
  uint64_t staging_bytes = 8ull << 20;    // staging ring; raised to two requests if smaller
  uint64_t request_bytes = 256ull << 10;  // largest read request (rounded to whole chunks, >= 1 chunk)
  uint64_t capacity_bytes = 0;            // 0: the cache's capacity, else min(64 GiB, 90% of free space)
  uint32_t write_batch = 0;               // sealed chunks gathered per batched write; 0: queue_depth
  bool buffered = false;                  // explicit opt-in to page-cache I/O when O_DIRECT is refused
  bool sqpoll = false;
  bool iopoll = false;        // falls back (reported) when the device has no poll queues
  bool single_issuer = true;  // SINGLE_ISSUER | DEFER_TASKRUN: drive from one thread
  bool register_buffers = true;
  bool preallocate = false;  // fallocate the whole capacity up front (no ENOSPC later)
  bool keep_file = false;    // keep a file this backend created (default: unlink at close)

  // Keys: queue_depth staging request capacity write_batch buffered sqpoll iopoll single_issuer
  // register preallocate keep. Unknown keys are an error.
  static result<ssd_backend_options> from_uri(const backend_uri& uri);
};

// Test seam: fail the nth read / write / fsync from now on (1-based) with an errno, or (errno 0)
// let it reach the device and report only `short_bytes` bytes.
struct ssd_fault {
  enum class op : uint8_t { kRead = 0, kWrite = 1, kFsync = 2 };
  op kind = op::kRead;
  uint64_t nth = 1;
  int error_errno = 5;  // EIO
  uint32_t short_bytes = 0;
};

class ssd_backend final : public backend {
 public:
  static constexpr std::string_view kScheme = "ssd";
  static constexpr bool compiled_in() noexcept { return true; }
  // io_uring can be set up by this process (kernel support, not disabled by policy).
  static bool available() noexcept;

  explicit ssd_backend(ssd_backend_options options);
  ~ssd_backend() override;
  ssd_backend(const ssd_backend&) = delete;
  ssd_backend& operator=(const ssd_backend&) = delete;

  std::string_view name() const noexcept override { return kScheme; }
  uint32_t preferred_page_bytes() const noexcept override;
  status configure(const backend_config& config) override;

  uint64_t capacity_chunks() const noexcept override { return capacity_chunks_; }
  uint64_t free_chunks() const noexcept override { return free_count_; }
  result<chunk_id> allocate_chunk(const chunk_hint& hint) noexcept override;
  void release_chunk(chunk_id id) noexcept override;
  status write_tokens(chunk_id id, const chunk_hint& hint, uint32_t first, uint32_t n, const std::byte* k,
                      const std::byte* v) noexcept override;
  status copy_tokens(chunk_id dst, const chunk_hint& dst_hint, chunk_id src, uint32_t n) noexcept override;
  status read_chunk(chunk_id id, uint32_t n_tokens, std::byte* dst) noexcept override;
  // Pages of buffered chunks are copied from host memory; the rest go out as one batch of
  // direct reads (adjacent pages merged), in rounds that fit the queue depth and the staging ring.
  status read_pages(std::span<const page_read> reads) noexcept override;
  status attend(uint32_t layer, std::span<const attend_item> batch) noexcept override;
  status flush() noexcept override;
  void prefetch(uint32_t layer, std::span<const attend_item> batch) noexcept override;
  void on_sequence_freed(seq_id seq) noexcept override;
  backend_stats stats() const noexcept override;

  // What the engine got (flags, registered buffers, fallbacks) and the storage layout, one line.
  std::string describe() const;
  // Host memory held now: staging + group buffers + metadata (bytes).
  uint64_t host_memory_bytes() const noexcept;
  // Chunks waiting in group buffers (open tails + sealed, not yet written).
  uint32_t buffered_chunks() const noexcept { return static_cast<uint32_t>(buffer_of_.size()); }
  uint64_t chunk_offset(chunk_id id) const noexcept { return uint64_t{id} * chunk_bytes_; }
  uint64_t request_bytes() const noexcept { return request_chunks_ * chunk_bytes_; }
  uint32_t queue_depth() const noexcept { return options_.queue_depth; }
  const std::string& path() const noexcept { return options_.path; }
  void inject_fault(const ssd_fault& fault) noexcept;

 private:
  struct group_buffer {
    std::byte* data = nullptr;
    chunk_id id = kInvalidChunk;
    uint32_t n_tokens = 0;
    uint32_t durable_tokens = 0;  // tokens already on the device (flush of a partial tail)
    bool sealed = false;
    int32_t write_result = 0;  // completion of the batched write in flight
    bool writing = false;
  };
  struct stream {
    uint32_t extent = UINT32_MAX;
    uint32_t next = 0;  // next slot index inside the extent
  };
  struct read_request {
    uint32_t item = 0;      // index in the batch
    uint32_t position = 0;  // first chunk position in the item's page table
    uint32_t count = 0;     // chunks (contiguous slots)
    chunk_id first = kInvalidChunk;
  };
  struct write_run {
    uint32_t first = 0;  // index into write_order_ / iovecs_
    uint32_t count = 0;
  };
  struct page_run {       // read_pages: one device read covering adjacent pages
    uint64_t offset = 0;  // aligned device range [offset, offset + bytes)
    uint32_t bytes = 0;
    uint32_t first = 0;  // its pages: page_order_[first, first + count)
    uint32_t count = 0;
    uint64_t staging = 0;  // where it lands in the staging pool
    int32_t result = 0;
    bool done = false;
  };
  struct ring_slot {
    int32_t result = 0;
    uint8_t state = 0;  // 0 free, 1 in flight, 2 done
  };

  status check_chunk(chunk_id id, const char* what) const noexcept;
  status check_thread() const noexcept;
  status reserve_extent(uint32_t extent) noexcept;
  result<uint32_t> get_buffer(chunk_id id) noexcept;
  void free_buffer(uint32_t index) noexcept;
  status write_sealed_batch() noexcept;
  status write_buffers(std::span<const uint32_t> indices, bool whole_tail) noexcept;
  status queue_io(int op, void* buf, uint32_t len, uint64_t offset, uint64_t user_data) noexcept;
  status reap(uint32_t min_complete) noexcept;
  status read_sync(void* dst, uint32_t len, uint64_t offset) noexcept;
  status plan_reads(std::span<const attend_item> batch, std::vector<read_request>& out) noexcept;
  status issue_reads(std::span<const read_request> plan, uint32_t& next) noexcept;
  void cancel_prefetch() noexcept;
  void compute(uint32_t item, const attend_item& it, const std::byte* const* ptrs, uint32_t count,
               uint32_t last_tokens) noexcept;
  status validate_batch(std::span<const attend_item> batch) const noexcept;
  std::byte* slot_data(uint32_t slot) const noexcept;

  ssd_backend_options options_;
  backend_config config_{};
  chunk_layout layout_{};
  uint64_t chunk_bytes_ = 0;
  uint32_t request_chunks_ = 1;
  uint32_t n_slots_ = 0;
  uint32_t write_batch_ = 0;
  mutable uint32_t preferred_page_ = 0;
  std::unique_ptr<io::storage_file> file_;
  std::unique_ptr<io::uring_engine> engine_;
  uint32_t file_handle_ = 0;
  bool configured_ = false;

  // Slot allocation: extents of extent_chunks_ slots handed to (seq, layer) streams.
  uint64_t capacity_chunks_ = 0;
  uint64_t free_count_ = 0;
  uint32_t extent_chunks_ = 1;
  std::vector<uint8_t> allocated_;        // per slot
  std::vector<uint32_t> extent_used_;     // allocated slots per extent
  std::vector<uint8_t> extent_owned_;     // held by a stream
  std::vector<uint8_t> extent_reserved_;  // blocks allocated (fallocate) in the file
  bool fallocate_ok_ = true;
  std::vector<uint32_t> free_extents_;            // wholly free, not held (stack)
  uint32_t scan_extent_ = 0;                      // where the slot-by-slot fallback resumes
  std::unordered_map<uint64_t, stream> streams_;  // key: seq * 2^16 + layer... (see key())

  // Group buffers.
  std::vector<group_buffer> buffers_;
  std::vector<uint32_t> free_buffers_;  // allocated, unused
  std::vector<uint32_t> dead_buffers_;  // entries whose memory was given back
  std::unordered_map<chunk_id, uint32_t> buffer_of_;
  std::vector<uint32_t> sealed_pending_;  // buffer indices, in sealing order
  uint64_t buffer_bytes_ = 0;
  std::vector<uint32_t> write_order_;  // the batch being written, by slot
  std::vector<iovec> iovecs_;
  std::vector<write_run> write_runs_;  // completions name a run

  // Decode.
  decode_chunks_fn kernel_ = nullptr;
  decode_params params_{};
  std::vector<ring_slot> slots_;
  std::vector<read_request> plan_;
  std::vector<read_request> prefetch_plan_;
  uint32_t prefetch_issued_ = 0;  // requests of prefetch_plan_ in the ring (slots 0..n-1)
  int64_t prefetch_layer_ = -1;
  std::vector<float> acc_o_;
  std::vector<softmax_stats> acc_stats_;
  std::vector<float> tmp_o_;
  std::vector<softmax_stats> tmp_stats_;
  std::vector<const std::byte*> ptrs_;

  // read_pages.
  std::vector<uint32_t> page_order_;  // indices of the reads bound for the device, by device offset
  std::vector<page_run> page_runs_;
  uint32_t page_pending_ = 0;  // runs of the current round not yet completed
  int32_t sync_result_ = 0;
  bool sync_done_ = false;

  backend_stats stats_{};
};

// Build an SSD backend from "ssd:PATH?...": options parsed and checked; the file opens in configure().
result<std::unique_ptr<backend>> make_ssd_backend(const backend_uri& uri);

static_assert(kv_backend<ssd_backend>);

}  // namespace instinfer
