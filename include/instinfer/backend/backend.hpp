// The backend concept: where KV chunks live and where decode attention runs.
//
// The KV manager (kv/kv_cache.hpp) is the control plane: sequences, page tables, refcounts,
// fork and truncation. A backend is the data plane: it allocates chunk ids, stores token rows
// into chunks, and runs attention for a batch of sequences of one layer. Models: host (RAM +
// host SIMD), ssd (io_uring + O_DIRECT, staged decode), csd (commands to an emulated drive that
// computes attention next to its flash), cuda (VRAM + CUDA kernels).
//
// Contracts every model keeps:
//  * a chunk is written append-only: write_tokens(first, n) with first == tokens already written;
//    once first + n == tokens_per_page the chunk is *sealed* and never written again (the
//    manager copies a sealed or shared chunk before appending to it: no read-modify-write);
//  * a failed call leaves every chunk it did not allocate exactly as it was;
//  * hot-path calls are noexcept and report through `status`.
#pragma once

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>

#include "instinfer/backend/uri.hpp"
#include "instinfer/core/status.hpp"
#include "instinfer/layout/chunk_layout.hpp"
#include "instinfer/layout/kv_shape.hpp"

namespace instinfer {

struct sparf_params;
struct sparf_counters;

using chunk_id = uint32_t;
inline constexpr chunk_id kInvalidChunk = UINT32_MAX;
using seq_id = uint64_t;

// What a chunk holds. Each (seq, layer, stream) is its own placement stream: a storage backend
// keeps a stream's chunks together and apart from the other streams of the same (seq, layer).
enum class chunk_stream : uint8_t {
  kTokens = 0,   // token-indexed K and V rows (chunk_layout): the page table's chunks
  kColumns = 1,  // SparF's channel-indexed K copy: a sealed column block's pages packed into
                 // chunk pages (src/sparf), written once, read back page by page (read_pages)
};

// Where a chunk sits: lets storage backends place a layer's chunks of a sequence contiguously.
struct chunk_hint {
  seq_id seq = 0;
  uint32_t layer = 0;
  uint32_t index = 0;  // position of the chunk in its stream of (seq, layer)
  chunk_stream stream = chunk_stream::kTokens;
};

// Everything a backend needs to know, fixed at cache creation.
struct backend_config {
  kv_shape shape{};
  page_geometry page{};
  uint64_t capacity_bytes = 0;  // 0: the backend's default
  uint32_t n_threads = 0;       // host-side compute threads; 0: hardware concurrency
  float scale = 0.0f;           // logit scale; 0: 1/sqrt(head_dim)
  float softcap = 0.0f;         // logit soft-cap; <= 0: off
  // SparF is enabled (cache_options::sparf): a backend that runs SparF itself (runs_sparf())
  // keeps the channel-indexed K copy, with column pages of this many channels (resolved, > 0).
  bool sparf = false;
  uint32_t sparf_channels_per_page = 0;

  chunk_layout layout() const noexcept { return chunk_layout::make(page, shape.n_kv_heads); }
};

// One sequence of an attend call.
struct attend_item {
  seq_id seq = 0;
  std::span<const chunk_id> chunks;  // the (seq, layer) page table, in token order
  uint32_t n_tokens = 0;             // tokens of this layer: fill of the last chunk follows
  const float* q = nullptr;          // [n_q_heads][head_dim]
  float* out = nullptr;              // [n_q_heads][head_dim]
  float* lse = nullptr;              // [n_q_heads] or null
};

// One page of a chunk to read (SparF's dual-step loading reads only the pages holding selected
// tokens). page: chunk_layout::page_index(kind, kv_head); dst: page_bytes of host memory.
struct page_read {
  chunk_id chunk = kInvalidChunk;
  uint32_t n_tokens = 0;  // tokens the chunk holds (as read_chunk's n_tokens)
  uint32_t page = 0;
  std::byte* dst = nullptr;
};

// Counters; fields a backend has no notion of stay zero.
struct backend_stats {
  uint64_t capacity_chunks = 0;
  uint64_t used_chunks = 0;
  uint64_t kv_bytes_appended = 0;     // K+V bytes handed to write_tokens
  uint64_t device_bytes_written = 0;  // bytes that reached storage (write amplification numerator)
  uint64_t device_bytes_read = 0;
  uint64_t link_bytes_host_to_device = 0;  // CSD / GPU: bytes over the host link
  uint64_t link_bytes_device_to_host = 0;
  uint64_t flash_pages_read = 0;
  uint64_t flash_pages_programmed = 0;
  uint64_t flash_pages_erased = 0;
  double modelled_device_seconds = 0.0;  // CSD: from the flash and link models, not wall-clock

  double write_amplification() const noexcept {
    return kv_bytes_appended ? static_cast<double>(device_bytes_written) / static_cast<double>(kv_bytes_appended) : 0.0;
  }
};

class backend {
 public:
  virtual ~backend() = default;

  virtual std::string_view name() const noexcept = 0;
  // Page bytes this backend prefers (device write granularity); used when the user passes 0.
  virtual uint32_t preferred_page_bytes() const noexcept { return page_geometry::kDefaultPageBytes; }
  // Called once, before anything else; the configuration is final.
  virtual status configure(const backend_config& config) = 0;

  virtual uint64_t capacity_chunks() const noexcept = 0;
  virtual uint64_t free_chunks() const noexcept = 0;
  virtual result<chunk_id> allocate_chunk(const chunk_hint& hint) noexcept = 0;
  virtual void release_chunk(chunk_id id) noexcept = 0;

  // Store tokens [first, first + n) of a chunk. k, v: [n][n_kv_heads][head_dim] in the cache dtype.
  virtual status write_tokens(chunk_id id, const chunk_hint& hint, uint32_t first, uint32_t n, const std::byte* k,
                              const std::byte* v) noexcept = 0;
  // Fill the fresh chunk `dst` with the first n tokens of `src` (fork of a partial tail; copy-on-write).
  virtual status copy_tokens(chunk_id dst, const chunk_hint& dst_hint, chunk_id src, uint32_t n) noexcept = 0;
  // Read the first n tokens of a chunk into host memory laid out as a chunk (chunk_bytes() bytes).
  virtual status read_chunk(chunk_id id, uint32_t n_tokens, std::byte* dst) noexcept = 0;

  // Read single pages of chunks, as one batch. kUnsupported: the caller falls back to read_chunk
  // (the default). A failure leaves the destinations unspecified and the cache unchanged.
  virtual status read_pages(std::span<const page_read> /*reads*/) noexcept {
    return {errc::kUnsupported, "this backend reads whole chunks only"};
  }

  // Host address of a chunk's bytes when the backend keeps chunks in this process's memory
  // (host backend); null otherwise (callers then use read_chunk).
  virtual const std::byte* chunk_address(chunk_id /*id*/) const noexcept { return nullptr; }
  // chunk_address is non-null for every chunk (the manager then keeps SparF's column copy in host
  // memory too; elsewhere it stores sealed column blocks as chunks of this backend).
  virtual bool host_addressable() const noexcept { return false; }

  // Decode attention of one layer for a batch of sequences.
  virtual status attend(uint32_t layer, std::span<const attend_item> batch) noexcept = 0;

  // SparF next to the data: a backend that returns true keeps the channel-indexed K copy and the V
  // running means itself (from write_tokens, through forks and truncations) and answers
  // attend_sparse; the manager then keeps no host-side index. Others: the manager runs SparF on
  // the host, reading the pages it needs through chunk_address / read_pages / read_chunk.
  virtual bool runs_sparf() const noexcept { return false; }
  // SparF decode attention of one layer (attention/sparf.hpp; same inputs and outputs as attend).
  // params are validated by the caller; counters (optional) receive what the algorithm read.
  virtual status attend_sparse(uint32_t /*layer*/, std::span<const attend_item> /*batch*/,
                               const sparf_params& /*params*/, sparf_counters* /*counters*/) noexcept {
    return {errc::kUnsupported, "this backend does not run SparF itself"};
  }

  // Make every written token durable on the device (storage backends); no-op elsewhere.
  virtual status flush() noexcept { return {}; }
  // Hint: `layer` of these sequences will be attended next (storage backends start reads).
  virtual void prefetch(uint32_t /*layer*/, std::span<const attend_item> /*batch*/) noexcept {}
  // The manager forgot a sequence (backends that mirror page tables drop theirs).
  virtual void on_sequence_freed(seq_id /*seq*/) noexcept {}

  virtual backend_stats stats() const noexcept = 0;
};

// A backend model: derives from `backend` and says, at compile time and at run time, whether it
// can be used (xsimd-style compiled_in / available).
template <class B>
concept kv_backend = std::derived_from<B, backend> && requires {
  { B::kScheme } -> std::convertible_to<std::string_view>;
  { B::compiled_in() } -> std::same_as<bool>;
  { B::available() } -> std::same_as<bool>;
};

// Build a backend from a URI ("host", "ssd:/path?queue_depth=32", "csd:/path", "cuda:0").
result<std::unique_ptr<backend>> make_backend(std::string_view uri);

// Schemes compiled into this build and usable on this machine, for diagnostics.
std::string describe_backends();

}  // namespace instinfer
