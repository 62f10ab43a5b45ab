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
//       &sqpoll=1&iopoll=1&single_issuer=0&register=0&preallocate=1&keep=1&persist=1"
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>

#include "instinfer/backend/backend.hpp"
#include "instinfer/backend/uri.hpp"

namespace instinfer {

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
  // Keep the store across processes (docs/persistence.md): PATH.meta beside the file holds the
  // committed page tables, every chunk written is checksummed and checked when read back; a
  // cache opened on the same path gets its named sequences back. Implies keep_file.
  bool persist = false;

  // read_pages merges pages whose gap on the device is at most this many bytes into one read
  // (the gap is read and dropped): a separate request costs about bandwidth / IOPS bytes of
  // transfer. kAutoReadGap: from the device probe's kind (page_reads.hpp, modelled_read_costs);
  // 0: adjacent pages only.
  static constexpr uint64_t kAutoReadGap = UINT64_MAX;
  uint64_t read_gap_bytes = kAutoReadGap;

  // Keys: queue_depth staging request capacity write_batch buffered sqpoll iopoll single_issuer
  // register preallocate keep persist read_gap. Unknown keys are an error.
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
  // This component was built (INSTINFER_SSD=ON: instinfer::ssd is linked).
  static constexpr bool compiled_in() noexcept {
#if defined(INSTINFER_WITH_SSD) && INSTINFER_WITH_SSD
    return true;
#else
    return false;
#endif
  }
  // io_uring can be set up by this process (kernel support, not disabled by policy).
#if defined(INSTINFER_WITH_SSD) && INSTINFER_WITH_SSD
  static bool available() noexcept;
#else
  static bool available() noexcept {
    return false;
  }
#endif

  explicit ssd_backend(ssd_backend_options options);
  ~ssd_backend() override;
  ssd_backend(const ssd_backend&) = delete;
  ssd_backend& operator=(const ssd_backend&) = delete;

  std::string_view name() const noexcept override {
    return kScheme;
  }
  uint32_t preferred_page_bytes() const noexcept override;
  status configure(const backend_config& config) override;

  uint64_t capacity_chunks() const noexcept override;
  uint64_t free_chunks() const noexcept override;
  result<chunk_id> allocate_chunk(const chunk_hint& hint) noexcept override;
  void release_chunk(chunk_id id) noexcept override;
  status write_tokens(chunk_id id, const chunk_hint& hint, uint32_t first, uint32_t n, const std::byte* k,
                      const std::byte* v) noexcept override;
  bool writes_whole_chunks() const noexcept override {
    return true;
  }
  status write_chunk(chunk_id id, const chunk_hint& hint, const std::byte* chunk) noexcept override;
  status copy_tokens(chunk_id dst, const chunk_hint& dst_hint, chunk_id src, uint32_t n) noexcept override;
  status read_chunk(chunk_id id, uint32_t n_tokens, std::byte* dst) noexcept override;
  // Pages of buffered chunks are copied from host memory; the rest go out as one batch of
  // direct reads (adjacent pages merged), in rounds that fit the queue depth and the staging ring.
  status read_pages(std::span<const page_read> reads) noexcept override;
  status attend(uint32_t layer, const attend_batch& batch) noexcept override;
  status attend_causal(uint32_t layer, const attend_batch& batch) noexcept override {
    return attend(layer, batch);
  }
  bool runs_causal() const noexcept override {
    return true;
  }
  status flush() noexcept override;
  void prefetch(uint32_t layer, const attend_batch& batch) noexcept override;
  void on_sequence_freed(seq_id seq) noexcept override;
  backend_stats stats() const noexcept override;
  // Non-null with persist=1 (after configure).
  persistent_store* persistence() noexcept override;

  // What the engine got (flags, registered buffers, fallbacks) and the storage layout, one line.
  std::string describe() const;
  // Host memory held now: staging + group buffers + metadata (bytes).
  uint64_t host_memory_bytes() const noexcept;
  // Chunks waiting in group buffers (open tails + sealed, not yet written).
  uint32_t buffered_chunks() const noexcept;
  // Byte offset of a chunk's slot in the file (0 before configure()).
  uint64_t chunk_offset(chunk_id id) const noexcept;
  // Largest decode read request (bytes; 0 before configure()).
  uint64_t request_bytes() const noexcept;
  uint32_t queue_depth() const noexcept;
  const std::string& path() const noexcept;
  // Arms the I/O engine's fault seam (after configure(); ignored before).
  void inject_fault(const ssd_fault& fault) noexcept;

 private:
  struct impl;  // src/backend/ssd/ssd_backend.cpp: the components and their wiring
  std::unique_ptr<impl> impl_;
};

// Build an SSD backend from "ssd:PATH?...": options parsed and checked; the file opens in configure().
#if defined(INSTINFER_WITH_SSD) && INSTINFER_WITH_SSD
result<std::unique_ptr<backend>> make_ssd_backend(const backend_uri& uri);
#else
inline result<std::unique_ptr<backend>> make_ssd_backend(const backend_uri& /*uri*/) {
  return status{errc::kUnsupported, "the ssd backend is not built into this instinfer (INSTINFER_SSD=OFF)"};
}
#endif

static_assert(kv_backend<ssd_backend>);

}  // namespace instinfer
