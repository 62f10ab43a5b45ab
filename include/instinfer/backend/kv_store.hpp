// The storage half of a backend: where chunks live.
//
// A kv_store hands out chunk ids, stores token rows into chunks, copies and reads them back, and
// makes them durable. It knows nothing about attention (attention_engine.hpp) nor about sequences
// beyond placement hints (the manager, kv/kv_cache.hpp, owns page tables and refcounts).
//
// Contracts every store keeps:
//  * a chunk is written append-only: write_tokens(first, n) with first == tokens already written;
//    once first + n == tokens_per_page the chunk is *sealed* and never written again (the
//    manager copies a sealed or shared chunk before appending to it: no read-modify-write);
//  * write ranges follow chunk_layout::fits; rows move with chunk_layout's scatter/gather;
//  * a failed call leaves every chunk it did not allocate exactly as it was;
//  * hot-path calls are noexcept and report through `status`.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

#include "instinfer/backend/attend_batch.hpp"
#include "instinfer/backend/persistence.hpp"
#include "instinfer/core/status.hpp"

namespace instinfer {

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

// One page of a chunk to read (SparF's dual-step loading reads only the pages holding selected
// tokens). page: chunk_layout::page_index(kind, kv_head); dst: page_bytes of host memory.
struct page_read {
  chunk_id chunk = kInvalidChunk;
  uint32_t n_tokens = 0;  // tokens the chunk holds (as read_chunk's n_tokens)
  uint32_t page = 0;
  std::byte* dst = nullptr;
};

// Chunks resident in this process's memory, at base + id * chunk_bytes (the host backend's pool).
// Empty (base == null) for every other store: callers then read through read_pages / read_chunk.
struct host_chunk_view {
  const std::byte* base = nullptr;
  uint64_t chunk_bytes = 0;

  explicit constexpr operator bool() const noexcept { return base != nullptr; }
  constexpr const std::byte* chunk(chunk_id id) const noexcept { return base + uint64_t{id} * chunk_bytes; }
};

class kv_store {
 public:
  virtual ~kv_store() = default;

  virtual uint64_t capacity_chunks() const noexcept = 0;
  virtual uint64_t free_chunks() const noexcept = 0;
  virtual result<chunk_id> allocate_chunk(const chunk_hint& hint) noexcept = 0;
  virtual void release_chunk(chunk_id id) noexcept = 0;

  // Store tokens [first, first + n) of a chunk. k, v: [n][n_kv_heads][head_dim] in the cache dtype.
  virtual status write_tokens(chunk_id id, const chunk_hint& hint, uint32_t first, uint32_t n, const std::byte* k,
                              const std::byte* v) noexcept = 0;
  // Store a fresh chunk's bytes whole (chunk_bytes(): every page in full, the tail a page's token
  // rows leave included) and seal it, for side data that is not token rows: SparF's column pages
  // of a quantized cache, whose rows do not fill a page. Read back with read_pages, or whole with
  // read_chunk(id, tokens_per_page, ...), page tails included. Stores that
  // answer writes_whole_chunks() false refuse it (kUnsupported, the default).
  virtual bool writes_whole_chunks() const noexcept { return false; }
  virtual status write_chunk(chunk_id /*id*/, const chunk_hint& /*hint*/, const std::byte* /*chunk*/) noexcept {
    return {errc::kUnsupported, "this backend does not store whole chunks"};
  }
  // Fill the fresh chunk `dst` with the first n tokens of `src` (fork of a partial tail; copy-on-write).
  virtual status copy_tokens(chunk_id dst, const chunk_hint& dst_hint, chunk_id src, uint32_t n) noexcept = 0;
  // Read the first n tokens of a chunk into host memory laid out as a chunk (chunk_bytes() bytes).
  virtual status read_chunk(chunk_id id, uint32_t n_tokens, std::byte* dst) noexcept = 0;

  // Read single pages of chunks, as one batch. kUnsupported: the caller falls back to read_chunk
  // (the default). A failure leaves the destinations unspecified and the cache unchanged.
  virtual status read_pages(std::span<const page_read> /*reads*/) noexcept {
    return {errc::kUnsupported, "this backend reads whole chunks only"};
  }

  // The chunks in this process's memory, for in-place use (host backend); empty elsewhere.
  virtual host_chunk_view host_view() const noexcept { return {}; }

  // Make every written token durable on the device (storage backends); no-op elsewhere.
  virtual status flush() noexcept { return {}; }
  // Hint: `layer` of these sequences will be attended next (storage backends start reads).
  virtual void prefetch(uint32_t /*layer*/, const attend_batch& /*batch*/) noexcept {}

  // The store's persistence (backend/persistence.hpp) when it was opened to persist, else null.
  virtual persistent_store* persistence() noexcept { return nullptr; }
};

}  // namespace instinfer
